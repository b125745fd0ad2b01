"""Lifecycle: the server (start, serve, shut down), workers, the event loop, logging, the health
check.
"""
