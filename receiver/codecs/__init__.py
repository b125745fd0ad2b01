"""Codecs: encoded audio in, 16-bit PCM out, and the names of formats."""
