"""UDP sockets for RTP: the shared `rtp_port` and the per-tap pool ports, bound with a large
receive buffer (see the README's table of limits: the buffer must hold the traffic of a stall)."""

from __future__ import annotations

import platform
import socket
import sys

# Python's socket module does not export it: 33 in Linux's asm-generic/socket.h (x86, ARM, ...).
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", None) or (
    33 if sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64", "i686") else None
)


def open_udp_socket(
    host: str, port: int, recv_buffer: int, *, reuse_port: bool = False
) -> tuple[socket.socket, int]:
    """A bound UDP socket with SO_RCVBUF raised; returns it and what the kernel granted.

    `reuse_port` is for the shared port under `--workers N` (bound by the parent); pool ports are
    bound without it, so two workers can never both own one."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, recv_buffer)
        granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)  # Linux: 2x, if allowed
        if granted < 2 * recv_buffer and SO_RCVBUFFORCE is not None:
            try:  # with CAP_NET_ADMIN (root, outside a container) past net.core.rmem_max
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, recv_buffer)
                granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            except OSError:
                pass
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock, granted
