"""Placement: where released audio goes on the output, by RTP timestamp, never by arrival.

Output position = extended timestamp + offset. A run (one SSRC, one sequence) is anchored by its
first audio, comfort-noise or telephone-event packet; after that, a gap in the timestamps becomes
silence of exactly its length, up to `max_gap` and the wall-clock budget, beyond which it is a
discontinuity: reported, not filled.

Decisions the rules leave open:

* Packets of unknown payload types never position anything.
* A packet whose timestamp places it before the current end is never overwritten or reordered:
  the timeline is rebased so it plays at the current end. A partial overlap (the packet still ends
  past the current end, e.g. a sender stepping its clock by less than the payload length) is
  counted in `overlaps` without an event, since such senders do it on every packet; a packet that
  lies entirely before the current end emits a `timestamp_jump` event.
* The pause before a new run (SSRC change, sequence reset) is measured from the end of the old
  run's last *audio* packet (arrival plus duration); one within the jitter window is not inserted,
  one longer than `max_gap` is reported as a discontinuity instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from receiver.codecs.encoding import Encoding
from receiver.rtp.packet import RtpPacket
from receiver.rtp.timeline.hot_state import HotState
from receiver.rtp.timeline.stats import MAX_EVENTS, TimelineStats, ssrc_hex


class TimelineOutput(Protocol):
    def audio(self, codec: Encoding, payload: bytes) -> None: ...

    def silence(self, samples: int) -> None: ...

    def event(self, event: dict[str, object]) -> None: ...


@dataclass(slots=True, eq=False)
class Placement:
    # Settings
    clock_rate: int
    max_gap: int  # samples: the longest gap filled with silence
    jitter_window: float  # seconds: a shorter pause before a new run is not inserted
    output: TimelineOutput
    emit_audio: Callable[[Encoding, bytes], None] = field(init=False)  # output.audio

    # Shared: in `hot`, the state `ref_ts`, `offset`, `position`, `anchored`, read `last_seen`
    # and the last audio packet; the counters in `stats`
    hot: HotState
    stats: TimelineStats

    # A payload's duration in clock ticks: its length for G.711 and G.722, an Opus packet's TOC
    samples_of: Callable[[bytes], int] = len

    # State
    first_arrival: float | None = field(default=None, init=False)  # for the wall-clock budget
    pending_pause: int = field(default=0, init=False)  # silence owed before the run's first sample

    def __post_init__(self) -> None:
        self.emit_audio = self.output.audio

    def start_run(self, arrival: float, pause: int) -> None:
        """A new run starts at `arrival`, `pause` samples after the current end."""
        if self.first_arrival is None:
            self.first_arrival = arrival
        self.hot.anchored = False
        self.pending_pause = pause

    def pause_before(self, arrival: float) -> tuple[int, int]:
        """(silence to insert, samples skipped as a discontinuity) before a run starting at
        `arrival`: the wall-clock time since the old run's last audio, if beyond the window."""
        hot = self.hot
        if hot.audio_arrival is None:
            return 0, 0
        pause = arrival - hot.audio_arrival - hot.audio_length / self.clock_rate
        if pause <= self.jitter_window:
            return 0, 0
        samples = round(pause * self.clock_rate)
        return (0, samples) if samples > self.max_gap else (samples, 0)

    def extend(self, timestamp: int) -> int:
        ref = self.hot.ref_ts
        return ref + ((timestamp - ref + 0x80000000) & 0xFFFFFFFF) - 0x80000000

    def anchor_at(self, timestamp: int) -> int:
        """Anchor the run at `timestamp` if it is not yet; its extended value."""
        ext = self.extend(timestamp)
        if not self.hot.anchored:
            self._anchor(ext)
        return ext

    def release_audio(self, codec: Encoding, packet: RtpPacket) -> None:
        hot = self.hot
        ref = hot.ref_ts
        ext = ref + ((packet.timestamp - ref + 0x80000000) & 0xFFFFFFFF) - 0x80000000
        hot.ref_ts = ext
        payload = packet.payload
        samples = self.samples_of(payload)
        if ext + hot.offset != hot.position or not hot.anchored:
            self.place(ext, samples, packet)
        self.emit_audio(codec, payload)
        hot.position += samples

    def place(self, ext: int, samples: int, packet: RtpPacket) -> None:
        """Move the current end to where an audio packet at `ext` belongs (or rebase)."""
        hot = self.hot
        if not hot.anchored:
            self._anchor(ext)
        gap = ext + hot.offset - hot.position
        if gap > self.max_gap:
            self.discontinuity(gap, packet)
            hot.offset -= gap
        elif gap > 0:
            if hot.position + gap > self._wall_clock_budget():
                # More silence than time has passed (plus max_gap): a sender that jumps its
                # timestamps ahead again and again must not make us write hours per second.
                self.discontinuity(gap, packet)
                hot.offset -= gap
                return
            self.output.silence(gap)
            hot.position += gap
        elif gap < 0:
            if gap + samples > 0:
                self.stats.overlaps += 1
            else:
                self.stats.timestamp_jumps += 1
                self.output.event(
                    {
                        "type": "timestamp_jump",
                        "at": hot.position / self.clock_rate,
                        "jump": gap / self.clock_rate,
                        "ssrc": ssrc_hex(packet.ssrc),
                        "sequence": packet.sequence,
                    }
                )
            hot.offset -= gap

    def discontinuity(self, gap: int, packet: RtpPacket) -> None:
        event: dict[str, object] = {
            "type": "discontinuity",
            "at": self.hot.position / self.clock_rate,
            "skipped": gap / self.clock_rate,
            "ssrc": ssrc_hex(packet.ssrc),
            "sequence": packet.sequence,
        }
        if len(self.stats.discontinuities) < MAX_EVENTS:
            self.stats.discontinuities.append(event)
        self.output.event(event)

    def _anchor(self, ext: int) -> None:
        hot = self.hot
        hot.offset = hot.position + self.pending_pause - ext
        self.pending_pause = 0
        hot.ref_ts = ext
        hot.anchored = True

    def _wall_clock_budget(self) -> int:
        """The furthest the timeline may reach: the time since the first packet, plus max_gap."""
        last_seen = self.hot.last_seen
        first = self.first_arrival if self.first_arrival is not None else last_seen
        return round((last_seen - first) * self.clock_rate) + self.max_gap
