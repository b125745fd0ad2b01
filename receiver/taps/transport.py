"""What the server asks of a transport (the WebSocket endpoint, the RTP receiver).

The server knows transports only through this interface: duration limits, the free-space
guard, shutdown, `/healthz` and `/metrics` are loops over them. Each transport ends its own
taps (flushing what it still holds for them first), as uvicorn's server asks each connection to
shut itself down instead of reaching into it.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Protocol

from receiver.taps.tap import Tap


class Transport(Protocol):
    #: The `transport` of its taps and its section in /healthz: "websocket" or "rtp".
    name: str

    def gather(self, taps: Collection[Tap] | None = None) -> None:
        """Hand every tap (or only `taps`) the audio the transport still holds for it (before
        buffers are measured or taken)."""

    def stop_tap(
        self, tap: Tap, reason: str, *, drop_rest: bool = False, close_code: int = 1000
    ) -> bool:
        """End `tap` now: what it received so far is finalized with `reason`, and its sender
        is told (a WebSocket is closed with `close_code`, 1000 unless the tap cannot be
        recorded: 1011). With `drop_rest`, what the sender still sends is dropped until it
        stops (an RTP stream: until it goes idle) instead of starting a new recording. False if
        the tap is not this transport's."""

    async def end_all(self, reason: str, close_code: int, message: str, timeout: float) -> None:
        """End every tap (low disk space, shutdown): finalized with `reason`, WebSocket peers
        closed with `close_code` and `message`; within `timeout` seconds."""

    def stop_receiving(self) -> None:
        """Shutdown: take in what has arrived, then accept nothing more."""

    def live_stats(self, tap: Tap) -> dict[str, Any] | None:
        """Counters of a tap that is recording, for the inspection API (RTP: its `rtp` block,
        up to date), or None."""

    def stats(self) -> dict[str, Any]:
        """Its section of /healthz."""

    def metrics(self) -> dict[str, Any]:
        """Its counters for /metrics (see receiver.http.metrics for the names)."""
