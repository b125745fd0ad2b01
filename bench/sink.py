"""The limit to compare with: a bare uvloop UDP sink that only counts datagrams.

    python -m bench.sink --port 5004

Same socket setup as the receiver (open_udp_socket, its default rtp_recv_buffer), same event
loop, no parsing. On SIGTERM it
prints {"datagrams": N} and exits; it answers nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from typing import Any

import uvloop

from receiver.config import from_argv
from receiver.rtp.sockets import open_udp_socket

DEFAULT_RECV_BUFFER = from_argv([], {}).rtp.recv_buffer


class Counter(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.datagrams = 0

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.datagrams += 1


async def serve(host: str, port: int, recv_buffer: int) -> int:
    sock, _ = open_udp_socket(host, port, recv_buffer)  # the same socket as the receiver's
    counter = Counter()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: counter, sock=sock)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"ready": sock.getsockname()[1]}), flush=True)
    await stop.wait()
    transport.close()
    return counter.datagrams


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--recv-buffer", type=int, default=DEFAULT_RECV_BUFFER)
    args = parser.parse_args(argv)
    count = uvloop.run(serve(args.host, args.port, args.recv_buffer))
    print(json.dumps({"datagrams": count}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
