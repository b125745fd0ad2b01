"""What a timeline counts (the sidecar's `rtp` block), and the RFC 3550 A.8 interarrival jitter."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from receiver.codecs.encoding import Encoding
from receiver.rtp.packet import RtpPacket
from receiver.rtp.timeline.hot_state import HotState

MAX_EVENTS = 1000  # DTMF digits and discontinuities kept in the stats; the rest are counted


def ssrc_hex(ssrc: int) -> str:
    return f"0x{ssrc:08x}"


@dataclass(slots=True)
class TimelineStats:
    clock_rate: int = 8000
    received: int = 0
    lost: int = 0
    late: int = 0
    duplicate: int = 0
    reordered: int = 0
    comfort_noise: int = 0
    unknown_payload_type: int = 0
    stale_ssrc: int = 0  # packets of a retired SSRC while the current one is alive
    ssrc_probation_dropped: int = 0  # packets of another SSRC that did not take over (ssrc.py)
    out_of_range: int = 0  # far from the expected sequence and never confirmed as a restart
    bad_telephone_event: int = 0
    overlaps: int = 0
    timestamp_jumps: int = 0
    sequence_resets: int = 0
    interarrival_jitter: float = 0.0  # RFC 3550 A.8, in timestamp units
    ssrcs: list[int] = field(default_factory=list)
    ssrcs_not_listed: int = 0  # SSRCs beyond the first MAX_SSRCS
    first_timestamp: int | None = None  # of the first audio packet received
    last_timestamp: int | None = None  # of the last audio packet received
    payload_types: list[int] = field(default_factory=list)
    dtmf: list[dict[str, object]] = field(default_factory=list)
    discontinuities: list[dict[str, object]] = field(default_factory=list)

    @property
    def jitter_ms(self) -> float:
        """The interarrival jitter in milliseconds (the sidecar's `jitter_ms`)."""
        return self.interarrival_jitter * 1000.0 / self.clock_rate

    def to_dict(self) -> dict[str, object]:
        return {
            "received": self.received,
            "lost": self.lost,
            "late": self.late,
            "duplicate": self.duplicate,
            "reordered": self.reordered,
            "comfort_noise": self.comfort_noise,
            "unknown_payload_type": self.unknown_payload_type,
            "stale_ssrc": self.stale_ssrc,
            "ssrc_probation_dropped": self.ssrc_probation_dropped,
            "out_of_range": self.out_of_range,
            "bad_telephone_event": self.bad_telephone_event,
            "overlaps": self.overlaps,
            "timestamp_jumps": self.timestamp_jumps,
            "sequence_resets": self.sequence_resets,
            "jitter_ms": round(self.jitter_ms, 3),
            "ssrcs": [ssrc_hex(ssrc) for ssrc in self.ssrcs],
            "first_timestamp": self.first_timestamp,
            "last_timestamp": self.last_timestamp,
            "payload_types": sorted(self.payload_types),
            "dtmf": list(self.dtmf),
            "discontinuities": list(self.discontinuities),
        }


@dataclass(slots=True, eq=False)
class InterarrivalJitter:
    """RFC 3550 A.8: J += (|D| - J) / 16, D the difference between two audio packets' spacing in
    arrival time and in timestamp, taken in arrival order. Its state (the last audio packet's
    timestamp, length and arrival, and J) is in the hot record: the in-order case updates it
    inline (`RtpTimeline.push`, `FastLane.process`) with exactly these float operations."""

    # Settings
    clock_rate: int
    audio_codecs: dict[int, Encoding]  # the stream's audio payload types
    # Shared: state in `hot`, the first audio timestamp in `stats`
    hot: HotState
    stats: TimelineStats
    samples_of: Callable[[bytes], int] = len  # a payload's duration in clock ticks

    def note(self, packet: RtpPacket, arrival: float) -> None:
        if packet.payload_type not in self.audio_codecs:
            # DTMF carries its event's start timestamp, which would read as huge jitter.
            return
        hot = self.hot
        timestamp = packet.timestamp
        previous = hot.audio_arrival
        if previous is not None:
            advance = ((timestamp - hot.audio_ts + 0x80000000) & 0xFFFFFFFF) - 0x80000000
            d = (arrival - previous) * self.clock_rate - advance
            hot.interarrival_jitter += (abs(d) - hot.interarrival_jitter) / 16.0
        elif self.stats.first_timestamp is None:
            self.stats.first_timestamp = timestamp
        hot.audio_arrival = arrival
        hot.audio_ts = timestamp
        hot.audio_length = self.samples_of(packet.payload)
