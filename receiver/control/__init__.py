"""The control plane: registrations and SignalWire status callbacks, completion webhooks."""
