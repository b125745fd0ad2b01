"""Which SSRC a stream's audio comes from: when another one takes over, which were seen (listed
in the sidecar), and which are retired (their late packets are dropped as stale).

A new SSRC on a source takes over only after probation, as RFC 3550 A.1 admits a new source:
MIN_SEQUENTIAL audio packets of it in a row, each with the sequence number after the previous
one. Until then its packets are held, not played; when it passes, they start the new run (so a
real switch loses nothing); a streak that is broken or never completed is dropped and counted
`ssrc_probation_dropped`, as is every packet of another SSRC that is not audio (telephone
events, comfort noise, unknown payload types never start or continue a streak). One stray
packet, whatever it carries, therefore never moves the timeline. (A stream's first SSRC needs
no probation: its first packet is what started the stream.)

A retired SSRC is stale only while the current SSRC is alive (it sent a packet within
`ssrc_timeout`); its packets are then dropped and counted `stale_ssrc`, and its audio also
`lost`, since it is not in the recording, unless its run had already released it or declared it
lost (a straggler). After that, the old SSRC coming back is a new SSRC like any other. What is
remembered is bounded: a hostile sender may use a new SSRC on every packet.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from receiver.rtp.packet import RtpPacket
from receiver.rtp.timeline.hot_state import HotState
from receiver.rtp.timeline.stats import TimelineStats

MAX_SSRCS = 64  # SSRCs kept by name, and retired SSRCs remembered
MIN_SEQUENTIAL = 2  # RFC 3550 A.1's value: a streak of two in-sequence audio packets


@dataclass(slots=True, eq=False)
class SsrcHistory:
    # Settings
    ssrc_timeout: float  # seconds of silence after which the current SSRC no longer counts

    # Shared: the current SSRC and when it was last seen in `hot`, the list in `stats`
    hot: HotState
    stats: TimelineStats

    # State
    retired: dict[int, int] = field(default_factory=dict, init=False)  # SSRC -> the sequence
    # number after the last one its run accounted for (released or declared lost)
    seen: set[int] = field(default_factory=set, init=False)

    def is_stale(self, ssrc: int, arrival: float) -> bool:
        """A retired SSRC, while the current one is alive."""
        return ssrc in self.retired and arrival - self.hot.last_seen < self.ssrc_timeout

    def stale_audio(self, packet: RtpPacket) -> None:
        """Count a stale audio packet lost, unless its run already accounted for it."""
        due = self.retired[packet.ssrc]
        if (packet.sequence - due) & 0xFFFF < 0x8000:  # at or after `due`
            self.retired[packet.ssrc] = (packet.sequence + 1) & 0xFFFF
            self.stats.lost += 1

    def change(self, new: int) -> None:
        """The current SSRC, its run closed, is retired in favour of `new`."""
        if len(self.retired) >= MAX_SSRCS:
            self.retired.clear()  # a flood of SSRCs: forget the old ones rather than grow
        self.retired[self.hot.ssrc] = self.hot.next & 0xFFFF
        self.retired.pop(new, None)

    def note(self, ssrc: int) -> None:
        """`ssrc` starts a run: list it in the stats (the first MAX_SSRCS of them)."""
        if ssrc not in self.seen:
            if len(self.seen) < MAX_SSRCS:
                self.seen.add(ssrc)
                self.stats.ssrcs.append(ssrc)
            else:
                self.stats.ssrcs_not_listed += 1


@dataclass(slots=True, eq=False)
class SsrcProbation:
    """The one candidate to take over from the current SSRC, and its streak so far."""

    # Shared: the counter in `stats`
    stats: TimelineStats

    # State
    streak: list[tuple[RtpPacket, float]] = field(default_factory=list, init=False)

    def offer(self, packet: RtpPacket, arrival: float) -> list[tuple[RtpPacket, float]] | None:
        """An audio packet of an SSRC other than the current one (and not stale): its streak,
        in arrival order, once it has passed probation; None while it has not."""
        streak = self.streak
        if streak:
            last = streak[-1][0]
            if packet.ssrc != last.ssrc or packet.sequence != (last.sequence + 1) & 0xFFFF:
                self.drop()
        streak.append((packet, arrival))
        if len(streak) < MIN_SEQUENTIAL:
            return None
        self.streak = []
        return streak

    def drop(self) -> None:
        """Give up on the candidate (its streak broke, or the stream ends)."""
        self.stats.ssrc_probation_dropped += len(self.streak)
        self.streak.clear()
