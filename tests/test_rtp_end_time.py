"""An RTP recording ends when its audio does: `ended_at` is the arrival of the last packet, not
the moment the idle timeout noticed the silence (that is recorded apart, as
`idle_timeout_seconds`), whichever path (the fast lane or the general one) took the packets."""

from __future__ import annotations

import socket
import time
from datetime import datetime
from typing import Any

import numpy as np

from receiver.rtp.packet import RtpPacket
from tests.helpers import wait_for_sidecar

IDLE_TIMEOUT = 4.0


def stamp(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def send_paced(port: int, packets: int, reorder_last: bool) -> tuple[str, float, float]:
    """`packets` 20 ms PCMU packets at real time; the source's tap name, and the wall-clock
    times of the first and the last send."""
    payload = bytes(np.random.default_rng(5).integers(0, 256, 160, dtype=np.uint8))
    order = list(range(packets))
    if reorder_last:  # the last two swapped: the general path, not only the fast lane
        order[-2], order[-1] = order[-1], order[-2]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        name = f"rtp-127.0.0.1-{sock.getsockname()[1]}"
        start = time.monotonic()
        first = time.time()
        for slot, n in enumerate(order):
            delay = start + slot * 0.02 - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing: a real-time sender
            packet = RtpPacket(0, n == 0, 1000 + n, 8000 + 160 * n, 0xE17D, payload)
            sock.sendto(packet.serialize(), ("127.0.0.1", port))
        last = time.time()
    return name, first, last


def test_ended_at_is_the_last_packet_not_the_idle_timeout(make_server: Any) -> None:
    server = make_server("--rtp-idle-timeout", str(IDLE_TIMEOUT), "--no-auth")
    for reorder_last in (False, True):
        name, first, last = send_paced(server.rtp_port, 50, reorder_last)
        sidecar = wait_for_sidecar(server.recordings, name)
        assert sidecar["end_reason"] == "idle timeout"
        assert sidecar["idle_timeout_seconds"] == IDLE_TIMEOUT
        assert sidecar["frames_written"] == 50 * 160
        started, ended = stamp(sidecar["started_at"]), stamp(sidecar["ended_at"])
        # the last packet's arrival: after it was sent (sidecar times are whole milliseconds),
        # and long before the idle timeout could have ended the tap
        assert last - 0.002 <= ended < last + IDLE_TIMEOUT / 2, (last, sidecar)
        assert first - 0.002 <= started <= ended
