"""Sequencing (RFC 3550 A.1): which packet is due, which wait for it, which are late, duplicate
or lost, and when the sender restarted its sequence numbers.

Works in extended (never wrapping) sequence numbers of the current run. A packet ahead of the one
due is held until the gap fills or the oldest held packet has waited the jitter window; then the
missing numbers are declared lost and the held packets are released in order. Sequencing knows
nothing of timestamps: what a released packet means is the caller's (`release`).

Decisions the rules leave open:

* Late and duplicate are told apart by remembering the sequence numbers declared lost (bounded),
  not the released ones: a packet behind the release point is late if it was declared lost (or
  precedes the run's first packet), otherwise a duplicate.
* A number far from the expected one (RFC 3550's "bad_seq") is held as a probe; if the next
  packet follows it, the sender restarted its sequence (`restart`), otherwise the probe is counted
  `out_of_range` and dropped.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from receiver.rtp.packet import RtpPacket
from receiver.rtp.timeline.hot_state import HotState
from receiver.rtp.timeline.stats import TimelineStats

# RFC 3550 A.1: how far ahead a sequence number may jump and how far behind it may reorder before
# it counts as "out of range" (two consecutive such packets mean the sender restarted).
MAX_DROPOUT = 3000
MAX_MISORDER = 100
MAX_HELD = 512


@dataclass(slots=True, eq=False)
class Sequencer:
    # Settings
    jitter_window: float  # seconds a gap waits for its packets
    max_held: int  # packets held behind a gap before the gap is given up early

    # Shared: `hot.next` (the extended sequence number due) and the counters in `stats`
    hot: HotState
    stats: TimelineStats
    note_arrival: Callable[[RtpPacket, float], None]  # each packet accepted, in arrival order
    release: Callable[[RtpPacket], None]  # each packet, in sequence order
    restart: Callable[[RtpPacket, float], None]  # a confirmed sequence reset, from this packet

    # State of the current run
    start: int = field(default=0, init=False)  # the run's first packet
    # Packets ahead of the one due, by extended sequence number; insertion order is arrival order.
    held: dict[int, tuple[RtpPacket, float]] = field(default_factory=dict, init=False)
    held_max: int = field(default=0, init=False)  # the largest key of `held`, while not empty
    lost: set[int] = field(default_factory=set, init=False)
    lost_order: deque[int] = field(default_factory=deque, init=False)
    probe: tuple[RtpPacket, float] | None = field(default=None, init=False)  # "bad_seq"

    @property
    def due(self) -> float:
        """When the oldest held packet has waited the jitter window (inf if none is held)."""
        for _, arrival in self.held.values():
            return arrival + self.jitter_window
        return float("inf")

    def start_run(self, sequence: int) -> None:
        self.start = self.hot.next = sequence
        self.lost.clear()
        self.lost_order.clear()

    def sequence(self, packet: RtpPacket, arrival: float) -> None:
        hot = self.hot
        delta = (packet.sequence - hot.next) & 0xFFFF
        if delta == 0:
            if self.held:
                self.stats.reordered += 1
            self.note_arrival(packet, arrival)
            hot.next += 1
            self.release(packet)
            if self.held:
                self._drain()
        elif delta < MAX_DROPOUT:
            self._hold(packet, arrival, hot.next + delta)
        elif delta > 0x10000 - MAX_MISORDER:
            self._behind(hot.next + delta - 0x10000)
        else:
            self._out_of_range(packet, arrival)

    def expire(self, now: float) -> None:
        """Give up on gaps whose oldest held packet has waited the jitter window."""
        held = self.held
        while held:
            oldest = next(iter(held))
            if now - held[oldest][1] < self.jitter_window:
                return
            self._release_through(oldest)

    def release_all(self) -> None:
        """Release everything held, in order, declaring the gaps lost."""
        if self.held:
            self._release_through(max(self.held))

    def drop_probe(self) -> None:
        """The run ends: an unconfirmed out-of-range packet stays out of range."""
        if self.probe is not None:
            self.stats.out_of_range += 1
            self.probe = None

    def _hold(self, packet: RtpPacket, arrival: float, ext: int) -> None:
        held = self.held
        if ext in held:
            self.stats.duplicate += 1
            return
        # Held packets are released in ascending order, so the largest leaves last.
        if held and ext < self.held_max:
            self.stats.reordered += 1
        else:
            self.held_max = ext
        self.note_arrival(packet, arrival)
        held[ext] = (packet, arrival)
        if len(held) > self.max_held:
            self._release_through(min(held))

    def _behind(self, ext: int) -> None:
        if ext in self.lost:
            self.lost.discard(ext)  # a second copy is then a duplicate
            self.stats.late += 1
        elif ext < self.start:
            self.stats.late += 1
        else:
            self.stats.duplicate += 1

    def _out_of_range(self, packet: RtpPacket, arrival: float) -> None:
        probe = self.probe
        if probe is not None and packet.sequence == (probe[0].sequence + 1) & 0xFFFF:
            self.probe = None
            self.stats.sequence_resets += 1
            self.restart(probe[0], probe[1])
            self.sequence(packet, arrival)
            return
        if probe is not None:
            self.stats.out_of_range += 1
        self.probe = (packet, arrival)

    def _release_through(self, limit: int) -> None:
        held, hot = self.held, self.hot
        for ext in sorted(key for key in held if key <= limit):
            packet = held.pop(ext)[0]
            if ext > hot.next:
                self._declare_lost(hot.next, ext)
            hot.next = ext + 1
            self.release(packet)
        self._drain()

    def _drain(self) -> None:
        held, hot = self.held, self.hot
        while hot.next in held:
            packet = held.pop(hot.next)[0]
            hot.next += 1
            self.release(packet)

    def _declare_lost(self, first: int, end: int) -> None:
        self.stats.lost += end - first
        # Only the last MAX_MISORDER can still arrive as "late" rather than out of range.
        for ext in range(max(first, end - MAX_MISORDER), end):
            if len(self.lost_order) >= MAX_MISORDER:
                self.lost.discard(self.lost_order.popleft())
            self.lost_order.append(ext)
            self.lost.add(ext)
