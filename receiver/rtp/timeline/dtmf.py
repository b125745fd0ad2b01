"""RFC 4733 telephone events (DTMF): sidecar events placed on the output timeline, never audio.

An event's packets share its start timestamp and grow its duration; it is emitted once, when
its end bit is first seen (retransmitted end packets are recognised by their start timestamp).
An event that never ends is emitted when the next event (a different start timestamp) begins, at
`finish()` (end of stream, SSRC change, sequence reset), with `"ended": False`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from receiver.rtp.packet import RtpPacket, RtpParseError, TelephoneEvent
from receiver.rtp.timeline.hot_state import HotState
from receiver.rtp.timeline.placement import Placement, TimelineOutput
from receiver.rtp.timeline.stats import MAX_EVENTS, TimelineStats, ssrc_hex

DTMF_HISTORY = 32  # start timestamps of ended events remembered per run


@dataclass(slots=True, eq=False)
class TelephoneEvents:
    # Settings
    payload_type: int
    clock_rate: int
    output: TimelineOutput

    # Shared: the current SSRC in `hot`, positions from `placement`, counters in `stats`
    hot: HotState
    placement: Placement
    stats: TimelineStats

    # State
    pending: tuple[int, int, TelephoneEvent] | None = field(default=None, init=False)
    # (extended timestamp, output start, the event) of an event not yet ended
    done: deque[int] = field(default_factory=lambda: deque(maxlen=DTMF_HISTORY), init=False)

    def start_run(self) -> None:
        self.done.clear()

    def release(self, packet: RtpPacket) -> None:
        try:
            event = TelephoneEvent.parse(packet.payload)
        except RtpParseError:
            self.stats.bad_telephone_event += 1
            return
        ext = self.placement.anchor_at(packet.timestamp)
        if ext in self.done:
            return  # a retransmitted end packet
        pending = self.pending
        if pending is not None and pending[0] != ext:
            self._emit(pending[1], pending[2])
            pending = None
        start = pending[1] if pending is not None else ext + self.hot.offset
        if event.end:
            self.pending = None
            self.done.append(ext)
            self._emit(start, event)
        else:
            self.pending = (ext, start, event)

    def finish(self) -> None:
        """Emit an event still pending (unended)."""
        pending = self.pending
        if pending is not None:
            self.pending = None
            self._emit(pending[1], pending[2])

    def _emit(self, start: int, event: TelephoneEvent) -> None:
        record: dict[str, object] = {
            "type": "dtmf",
            "digit": event.digit,
            "start": start / self.clock_rate,
            "duration": event.duration / self.clock_rate,
            "volume": event.volume,
            "ssrc": ssrc_hex(self.hot.ssrc),
            "ended": event.end,
        }
        if len(self.stats.dtmf) < MAX_EVENTS:
            self.stats.dtmf.append(record)
        self.output.event(record)
