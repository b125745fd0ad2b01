"""HTTP building blocks shared by every route: the application, tokens, JSON errors, metrics."""
