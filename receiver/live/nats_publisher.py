"""Live audio on NATS (`live_nats`, with `nats_url`): every recording tap's decoded audio,
published for consumers elsewhere.

One more subscriber of the tap's LiveFeed (the same bounded queue as a WebSocket listener's,
subscriber.py), created when the tap starts recording; a task of its own per tap takes its
messages and publishes them:

- subject `tap-receiver.live.<instance>.<tap id>`, the tap id with each `.` made `_` (a NATS
  subject's tokens are split at `.`; the exact id and file name are in the headers). The
  subject follows the tap id: a tap renamed while it records goes on under its new id.
  `tap-receiver.live.>` is every instance's audio, `tap-receiver.live.<instance>.*` one
  instance's.
- headers: `position` (frame index, on the WAV's timeline, of the message's first frame),
  `frames`, `sample_rate`, `channels`, `format: s16le`, `tap_id`, `name` (the WAV's base name,
  the tap id until the writer has reserved it).
- body: the audio, 16-bit little-endian PCM, channels interleaved: one message per
  `live_interval` (0.2 s by default) with what the tap's timeline placed in that time.
- at the tap's end: a message with an empty body and the header `end: <reason>` (`position`:
  the frame after the last one).

Audio that is not published is dropped, never waited for: what the queue cannot hold
(`live_queue_seconds`), and every message while NATS is unreachable or while more than
PENDING_LIMIT bytes wait in the client for the socket. A drop shows as a jump of `position`
(the next message's position is more than the previous one's plus its frames).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from receiver.live.subscriber import Subscriber
from receiver.taps.tap import Tap

log = logging.getLogger("receiver.live")

SUBJECT_PREFIX = "tap-receiver.live"
SAMPLE_FORMAT = "s16le"
PENDING_LIMIT = 8 * 1024 * 1024  # bytes waiting in the NATS client beyond which audio is dropped
STOP_TIMEOUT = 1.0


class NatsOutlet(Protocol):
    """Where the messages go: the fleet's NATS connection (receiver.fleet.nats_fleet)."""

    instance: str

    def can_publish(self, size: int, limit: int) -> bool:
        """Connected, and fewer than `limit` bytes wait in the client with these `size`."""
        ...

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str]) -> None: ...


def live_subject(instance: str, tap_id: str) -> str:
    return f"{SUBJECT_PREFIX}.{instance}.{tap_id.replace('.', '_')}"


@dataclass
class NatsLiveStats:
    taps: int = 0  # publishing now
    messages: int = 0  # published (audio and end messages)
    bytes: int = 0  # of audio published
    dropped_frames: int = 0  # not published: queue full, NATS unreachable or behind
    dropped_ends: int = 0  # end messages not published (NATS unreachable)

    def as_dict(self) -> dict[str, Any]:
        return {
            "taps": self.taps,
            "messages": self.messages,
            "bytes": self.bytes,
            "dropped_frames": self.dropped_frames,
            "dropped_ends": self.dropped_ends,
        }


class NatsPublisher(Subscriber):
    """A feed's subscriber that publishes on NATS instead of a WebSocket. Its drops are its own
    (`NatsLiveStats`), not the listeners'."""

    def __init__(self, tap: Tap, outlet: NatsOutlet, stats: NatsLiveStats, max_frames: int,
                 position: int) -> None:  # fmt: skip
        super().__init__(max_frames, None, {"type": "start", "position": position})
        self.tap = tap
        self.outlet = outlet
        self.stats = stats
        self.frame_bytes = 2 * tap.channels

    def offer(self, frames: np.ndarray, data: bytes, position: int) -> int:
        self.stats.dropped_frames += super().offer(frames, data, position)
        return 0

    async def run(self) -> None:
        position = 0
        while True:
            message = self.pop()
            if message is None:
                if self.ended:
                    return
                await self.wake.wait()
                continue
            if isinstance(message, bytes):
                await self._send(message, position)
                position += len(message) // self.frame_bytes
            elif message["type"] == "end":
                await self._send(b"", message["position"], message["reason"])
            else:  # start, gap: where the audio (goes on)
                position = message["position"]

    async def _send(self, body: bytes, position: int, end: str | None = None) -> None:
        tap = self.tap
        frames = len(body) // self.frame_bytes
        headers = {
            "position": str(position),
            "frames": str(frames),
            "sample_rate": str(tap.sample_rate),
            "channels": str(tap.channels),
            "format": SAMPLE_FORMAT,
            "tap_id": tap.tap_id,
            "name": tap.name or tap.tap_id,
        }
        if end is not None:
            headers["end"] = end
        try:
            if not self.outlet.can_publish(len(body) + 512, PENDING_LIMIT):
                raise ConnectionError("NATS is unreachable or behind")
            await self.outlet.publish(live_subject(self.outlet.instance, tap.tap_id), body,
                                      headers)  # fmt: skip
        except Exception as exc:
            log.debug("live audio of %s not published on NATS: %s", tap.tap_id, exc)
            self.stats.dropped_frames += frames
            self.stats.dropped_ends += end is not None
            return
        self.stats.messages += 1
        self.stats.bytes += len(body)


class NatsLive:
    """The NATS publishers of every recording tap, and their counters."""

    def __init__(self, outlet: NatsOutlet, queue_seconds: float) -> None:
        self.outlet = outlet
        self.queue_seconds = queue_seconds
        self.stats = NatsLiveStats()
        self._tasks: set[asyncio.Task[None]] = set()

    def publisher(self, tap: Tap, position: int) -> NatsPublisher:
        """A publisher for `tap` whose audio begins at `position`, its task started."""
        max_frames = max(1, round(self.queue_seconds * tap.sample_rate))
        publisher = NatsPublisher(tap, self.outlet, self.stats, max_frames, position)
        task = asyncio.create_task(self._run(publisher), name=f"live-nats {tap.tap_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return publisher

    async def _run(self, publisher: NatsPublisher) -> None:
        self.stats.taps += 1
        try:
            await publisher.run()
        except Exception:  # a bug: live audio must never stop the server
            log.exception("live audio of %s on NATS failed", publisher.tap.tap_id)
        finally:
            self.stats.taps -= 1

    async def stop(self) -> None:
        """Shutdown, once the taps have ended: their last messages go out (at most
        STOP_TIMEOUT), then whatever still waits is given up."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=STOP_TIMEOUT)
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True),
                                   STOP_TIMEOUT)  # fmt: skip

    def health(self) -> dict[str, Any]:
        return {"subject": f"{SUBJECT_PREFIX}.{self.outlet.instance}", **self.stats.as_dict()}
