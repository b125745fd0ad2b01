"""WebSocket taps: the endpoint, the dialects spoken on it, and the track timeline of JSON media
streams.
"""
