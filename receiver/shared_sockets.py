"""Listening sockets opened once by the parent of `--workers N`, handed to each worker.

The parent binds one UDP and one TCP socket per worker on the same ports with SO_REUSEPORT before
it forks, so the kernel's group of sockets is complete before the first packet: a UDP source
(hashed by its 4-tuple) always lands on the same worker. Each worker `give`s its own pair here;
the listeners `take` it instead of binding a new socket.
"""

from __future__ import annotations

import socket

_sockets: dict[tuple[str, int], socket.socket] = {}


def give(kind: str, port: int, sock: socket.socket) -> None:
    """Make `sock` the socket for the next listener of `kind` ("udp"/"tcp") on `port`."""
    _sockets[(kind, port)] = sock


def take(kind: str, port: int) -> socket.socket | None:
    """The socket given for this port (once), or None: then bind as usual."""
    return _sockets.pop((kind, port), None) if port else None
