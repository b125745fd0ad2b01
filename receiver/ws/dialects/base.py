"""What every WebSocket dialect shares: starting its tap once the format is known, counting and
logging bad input (once per tap and kind), and ending cleanly."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from receiver.codecs.encoding import Encoding
from receiver.codecs.formats import AudioFormat
from receiver.codecs.opus_packet import OpusPacketError, packet_samples, samples_at
from receiver.config import WsSettings
from receiver.taps.audio_buffer import AudioBuffer, ChannelBuffer
from receiver.taps.naming import websocket_key
from receiver.taps.tap import MAX_EVENTS, Tap

log = logging.getLogger("receiver.ws")


@dataclass(frozen=True, slots=True)
class SessionContext:
    tap_id: str
    remote: str | None
    settings: WsSettings
    start: Callable[[Tap], None]  # makes a tap live (its name, its files): the endpoint's
    subprotocol: str | None = None
    extra: dict[str, Any] | None = None  # sidecar fields from the URI (a call's leg)


class Session:
    """One WebSocket connection's recording. Subclasses parse their dialect's frames."""

    dialect = "raw"

    def __init__(self, ctx: SessionContext) -> None:
        self.ctx = ctx
        self.tap: Tap | None = None
        self._early_counters: dict[str, int] = {}
        self._early_events: list[dict[str, Any]] = []
        self.warned: set[str] = set()
        self.ended = False  # set by the endpoint once the tap is finished
        self._partial = b""  # the start of a frame split across binary messages
        self._packet_frames = 0  # the last good packet's frames (a corrupt one conceals as many)
        self._first_audio: float | None = None  # when its first audio arrived (monotonic)

    # -- hooks --------------------------------------------------------------------------------

    def text(self, data: str) -> None:
        self.count("text_frames_ignored")

    def binary(self, data: bytes) -> None:
        self.bad_input("unexpected_binary", "binary frame in a text-only dialect")

    def default_format(self) -> AudioFormat:
        return AudioFormat(Encoding.PCMU)

    # -- shared -------------------------------------------------------------------------------

    def start_tap(
        self,
        fmt: AudioFormat,
        *,
        buffer: AudioBuffer | ChannelBuffer | None = None,
        track_files: list[str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> Tap:
        tap = Tap(
            self.ctx.tap_id,
            "websocket",
            fmt.encoding,
            fmt.sample_rate,
            fmt.channels,
            self.ctx.remote,
            key=websocket_key(self.ctx.tap_id),
        )
        if buffer is not None:
            tap.buffer = buffer
        tap.track_files = track_files
        tap.extra["dialect"] = self.dialect
        tap.extra["content_type"] = fmt.mime
        if self.ctx.subprotocol:
            tap.extra["subprotocol"] = self.ctx.subprotocol
        tap.extra.update(extra or {})
        tap.extra.update(self.ctx.extra or {})
        for name, n in self._early_counters.items():
            tap.count(name, n)
        for event in self._early_events:
            tap.add_event(event)
        self._early_counters.clear()
        self._early_events.clear()
        if self._first_audio is not None:
            tap.first_audio_monotonic = self._first_audio
        self.tap = tap
        self.ctx.start(tap)
        return tap

    def heard(self) -> None:
        """Audio arrived (the first time counts): where the tap begins on a call's timeline
        (receiver.calls), not when it began, which a format frame or a start event may precede
        by any time."""
        if self._first_audio is None:
            self._first_audio = time.monotonic()
            if self.tap is not None:
                self.tap.first_audio_monotonic = self._first_audio

    def append_frames(self, fmt: AudioFormat, data: bytes) -> None:
        """Binary audio in arrival order, whole frames only: a frame (an L16 sample, or one per
        channel) split across messages waits for the rest in `_partial`."""
        if data:
            self.heard()
        tap = self.tap or self.start_tap(fmt)
        tap.count("frames_received")
        tap.count("bytes_received", len(data))
        frame = fmt.frame_bytes
        if frame > 1:
            data = self._partial + data
            whole = len(data) - len(data) % frame
            data, self._partial = data[:whole], data[whole:]
        self.stream_buffer().append(fmt.encoding, data)

    def append_packet(self, fmt: AudioFormat, packet: bytes) -> None:
        """One Opus packet (a binary message). One that is not an Opus packet is counted and
        concealed for as long as the packet before it played (20 ms if none)."""
        self.heard()
        tap = self.tap or self.start_tap(fmt)
        tap.count("frames_received")
        tap.count("bytes_received", len(packet))
        buffer = self.stream_buffer()
        try:
            frames = samples_at(packet_samples(packet), fmt.sample_rate)
        except OpusPacketError as exc:
            self.bad_input("corrupt_packets", f"not an Opus packet: {exc}; concealed")
            buffer.append_lost(fmt.encoding, self._packet_frames or fmt.sample_rate // 50)
            return
        self._packet_frames = frames
        buffer.append_packet(fmt.encoding, packet, frames)

    def flush(self) -> None:
        """End of stream: release anything held back. A partial frame cannot be recorded."""
        if self._partial:
            self.count("bytes_discarded", len(self._partial))
            self._partial = b""

    def stream_buffer(self) -> AudioBuffer:
        """The tap's single buffer (every dialect but two-track Media Streams has one)."""
        assert self.tap is not None and isinstance(self.tap.buffer, AudioBuffer)
        return self.tap.buffer

    def count(self, name: str, n: int = 1) -> None:
        if self.tap is not None:
            self.tap.count(name, n)
        else:
            self._early_counters[name] = self._early_counters.get(name, 0) + n

    def event(self, event: dict[str, Any]) -> None:
        if self.tap is not None:
            self.tap.add_event(event)
        elif len(self._early_events) < MAX_EVENTS:
            self._early_events.append(event)

    def bad_input(self, name: str, detail: str) -> None:
        """Count it; log the first of each kind per tap; carry on with the rest of the tap."""
        self.count(name)
        self.count("errors")
        if name not in self.warned:
            self.warned.add(name)
            log.warning("tap %s: %s (%s); further ones are only counted", self.ctx.tap_id,
                        detail, name)  # fmt: skip

    def end(self) -> Tap:
        """The connection closed: flush, and make sure there is a recording (maybe empty)."""
        self.flush()
        if self.tap is None:
            self.start_tap(self.default_format())
        assert self.tap is not None
        return self.tap
