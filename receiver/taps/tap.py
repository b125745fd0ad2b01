"""A tap: one recording in progress, whatever transport feeds it (lives on the event loop)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Hashable
from datetime import UTC, datetime
from typing import Any, Protocol

from receiver.redaction import redact
from receiver.storage.sidecar import TapState
from receiver.storage.writer import Sink
from receiver.taps.audio_buffer import AudioBuffer, ChannelBuffer

_serial = itertools.count(1)

MAX_EVENTS = 1000  # events kept per tap (DTMF, marks, SSRC changes, discontinuities, ...)


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class LiveOutput(Protocol):
    """Where a tap's audio goes live while it is recorded (receiver.live.feed.LiveFeed): read
    from its buffer, so it must catch up before each `take` (the registry sees to it)."""

    def catch_up(self) -> None: ...

    def end(self, reason: str) -> None: ...


class Tap:
    """State of one tap. The transport appends audio to `buffer`; the registry batches it out."""

    def __init__(
        self,
        tap_id: str,
        transport: str,
        codec: str,
        sample_rate: int = 8000,
        channels: int = 1,
        remote: str | None = None,
        key: Hashable = None,
        ahead_allowance: float = 10.0,
    ) -> None:
        self.serial = next(_serial)
        self.tap_id = tap_id
        self.transport = transport
        # What the control plane knows the tap by before and after it starts (naming.py): a
        # WebSocket tap's URI id, an RTP stream's pool port or source address.
        self.key = key
        self.codec = codec
        self.sample_rate = sample_rate
        self.channels = channels
        self.remote = remote
        self.state = TapState.RECORDING
        self.started_at = utc_now_iso()
        self.ended_at: str | None = None
        self.started_monotonic = time.monotonic()
        # When its first audio arrived (an RTP stream: its first packet's kernel timestamp): where
        # it begins on a call's timeline (receiver.calls).
        self.first_audio_monotonic = self.started_monotonic
        # Seconds its audio may lead the wall clock since it began (see BufferGuard).
        self.ahead_allowance = ahead_allowance
        self.buffer: AudioBuffer | ChannelBuffer = AudioBuffer(channels)
        self.track_files: list[str] | None = None  # also one mono WAV per named track
        self.sink: Sink | None = None  # set by the registry; the writer's (read `sink.info`)
        self.counters: dict[str, int] = {}
        self.events: list[dict[str, Any]] = []
        self.extra: dict[str, Any] = {}  # transport-specific sidecar fields
        self.end_reason: str | None = None
        self.segment_start_frames = 0  # buffer.frames when the current file began
        self.live: LiveOutput | None = None  # while someone listens (receiver.live)

    @property
    def segment_seconds(self) -> float:
        """Audio in the current file (written or pending), in seconds."""
        return (self.buffer.frames - self.segment_start_frames) / self.sample_rate

    def dropped_frames(self) -> dict[str, int]:
        """Frames its buffer guard dropped: `ahead` of the wall clock, `overflow` (silenced)."""
        guard = self.buffer.guard
        if guard is None:
            return {}
        return {
            k: v for k, v in (("ahead", guard.dropped_ahead), ("overflow", guard.overflow)) if v
        }

    def ahead_seconds(self) -> float:
        """How far its audio leads the wall clock since it began."""
        return self.buffer.ahead_seconds(time.monotonic())

    def add_event(self, event: dict[str, Any]) -> None:
        """Record a sidecar event; past MAX_EVENTS they are only counted (`events_dropped`), so
        a sender cannot grow the sidecar, the API answer and the webhook without bound."""
        if len(self.events) < MAX_EVENTS:
            self.events.append(event)
        else:
            self.count("events_dropped")

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    @property
    def name(self) -> str | None:
        """The file base name once the writer has reserved it (may carry a .N suffix)."""
        return self.sink.info.name if self.sink else None

    def describe(self) -> dict[str, Any]:
        """The sidecar's view of this tap (built on the event loop; files fields added later).
        What senders and the control plane gave it is redacted: no token leaves in it."""
        return {
            "tap_id": self.tap_id,
            "transport": self.transport,
            "codec": self.codec,
            "sample_rate": self.sample_rate,
            "channels": self.channels,
            "remote": self.remote,
            "state": self.state,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "end_reason": self.end_reason,
            "counters": {
                **self.counters,
                **{f"dropped_{k}_frames": v for k, v in self.dropped_frames().items()},
            },
            "events": redact(self.events),
            **redact(self.extra),
            **self._codec_check(),
        }

    def _codec_check(self) -> dict[str, Any]:
        """What the writer found in its first seconds of G.711 (receiver.codecs.law_check)."""
        mismatch = self.sink.info.codec_mismatch if self.sink is not None else None
        return {"codec_mismatch": mismatch} if mismatch is not None else {}
