"""One RTP stream's timeline: sample n of the output is sample n of the sender's timeline.

Audio is placed by RTP timestamp, never by arrival time. Packets are released in sequence order
through a time-based jitter window; anything the sender's timestamps say is missing (loss, silence
suppression, comfort noise) becomes digital silence of exactly that duration, up to `max_gap`.
SSRC changes and sequence restarts continue the same timeline.

Decisions the rules leave open:

* A packet whose timestamp places it before the current end is never overwritten or reordered:
  the timeline is rebased so it plays at the current end. A partial overlap (the packet still ends
  past the current end, e.g. a sender stepping its clock by less than the payload length) is
  counted in `stats.overlaps` without an event, since such senders do it on every packet; a packet
  that lies entirely before the current end emits a `timestamp_jump` event.
* DTMF is emitted when the end bit is first seen; an event that never ends is emitted when the
  next event (a different start timestamp) begins, at `flush()`, or at an SSRC change/sequence
  reset, with `"ended": False`.
* The timeline is anchored by the first audio, comfort-noise or telephone-event packet of each
  run; packets of unknown payload types never position anything.
* A previously seen SSRC is stale only while the current SSRC is alive (it sent a packet within
  `ssrc_timeout`); after that, the old SSRC coming back is treated as another SSRC change.
* The SSRC-change pause is measured from the end of the old SSRC's last *audio* packet (arrival
  plus duration); a pause longer than `max_gap` is not inserted but reported as a discontinuity.
* Late and duplicate are told apart by remembering the sequence numbers declared lost (bounded),
  not the released ones: a packet behind the release point is late if it was declared lost (or
  precedes the run's first packet), otherwise a duplicate.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from receiver.codecs.encoding import Encoding
from receiver.rtp.packet import (
    AUDIO_CODECS,
    DEFAULT_TELEPHONE_EVENT_PT,
    PT_COMFORT_NOISE,
    RtpPacket,
    RtpParseError,
    TelephoneEvent,
)

# RFC 3550 A.1: how far ahead a sequence number may jump and how far behind it may reorder before
# it counts as "out of range" (two consecutive such packets mean the sender restarted).
MAX_DROPOUT = 3000
MAX_MISORDER = 100
MAX_HELD = 512
DTMF_HISTORY = 32


MAX_SSRCS = 64  # SSRCs kept by name (a hostile sender may use a new one per packet)
MAX_EVENTS = 1000  # DTMF digits and discontinuities kept in the stats; the rest are counted


class TimelineOutput(Protocol):
    def audio(self, codec: Encoding, payload: bytes) -> None: ...

    def silence(self, samples: int) -> None: ...

    def event(self, event: dict[str, object]) -> None: ...


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
    stale_ssrc: int = 0
    out_of_range: int = 0  # far from the expected sequence and never confirmed as a restart
    bad_telephone_event: int = 0
    overlaps: int = 0
    timestamp_jumps: int = 0
    sequence_resets: int = 0
    jitter: float = 0.0  # RFC 3550 A.8 interarrival jitter, in timestamp units
    ssrcs: list[int] = field(default_factory=list)
    ssrcs_not_listed: int = 0  # SSRCs beyond the first MAX_SSRCS
    first_timestamp: int | None = None  # of the first audio packet received
    last_timestamp: int | None = None  # of the last audio packet received
    payload_types: list[int] = field(default_factory=list)
    dtmf: list[dict[str, object]] = field(default_factory=list)
    discontinuities: list[dict[str, object]] = field(default_factory=list)

    @property
    def jitter_ms(self) -> float:
        return self.jitter * 1000.0 / self.clock_rate

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


# The fields of `RtpTimeline.hot_state`, in order ("second": the payload type of push's inlined
# case; "next": the extended sequence number due).
HOT_INTS = (
    "second",
    "ssrc",
    "next",
    "ref_ts",
    "offset",
    "position",
    "audio_ts",
    "audio_length",
    "received",
)
HOT_FLOATS = ("audio_arrival", "jitter", "last_seen")


class RtpTimeline:
    """Turns one stream's RTP packets into contiguous audio, silence and sidecar events."""

    __slots__ = (
        "_anchored",
        "_audio_arrival",
        "_audio_length",
        "_audio_ts",
        "_clock_rate",
        "_dtmf_done",
        "_dtmf_payload_type",
        "_dtmf_pending",
        "_emit_audio",
        "_fast_codec",
        "_fast_type",
        "_first_arrival",
        "_held",
        "_held_max",
        "_jitter",
        "_jitter_window",
        "_last_payload_type",
        "_last_seen",
        "_lost",
        "_lost_order",
        "_max_gap",
        "_max_held",
        "_next",
        "_offset",
        "_output",
        "_pending_pause",
        "_position",
        "_probe",
        "_ref_ts",
        "_retired",
        "_ssrc",
        "_ssrc_timeout",
        "_ssrcs_seen",
        "_start",
        "_stats",
    )

    def __init__(
        self,
        output: TimelineOutput,
        *,
        clock_rate: int = 8000,
        jitter: float = 0.2,
        max_gap: float = 30.0,
        dtmf_payload_type: int = DEFAULT_TELEPHONE_EVENT_PT,
        max_held: int = MAX_HELD,
        ssrc_timeout: float = 2.0,
    ) -> None:
        self._output = output
        self._emit_audio = output.audio
        self._clock_rate = clock_rate
        self._jitter_window = jitter
        self._max_gap = round(max_gap * clock_rate)
        self._dtmf_payload_type = dtmf_payload_type
        self._max_held = max_held
        self._ssrc_timeout = ssrc_timeout
        self._stats = TimelineStats(clock_rate=clock_rate)

        self._ssrc: int | None = None
        self._retired: set[int] = set()
        self._ssrcs_seen: set[int] = set()
        self._last_seen = 0.0
        self._first_arrival: float | None = None  # for the wall-clock budget of silence
        self._last_payload_type = -1
        self._fast_type = -1  # the current payload type if it is audio (push's inlined case)
        self._fast_codec = Encoding.PCMU  # meaningful only while _fast_type >= 0

        # Sequencing, in extended (never wrapping) sequence numbers of the current run.
        self._next = 0  # due for release
        self._start = 0  # the run's first packet
        self._held: dict[int, tuple[RtpPacket, float]] = {}  # insertion order = arrival order
        self._held_max = 0  # the largest key of _held, while it is not empty
        self._lost: set[int] = set()
        self._lost_order: deque[int] = deque()
        self._probe: tuple[RtpPacket, float] | None = None  # RFC 3550 A.1 "bad_seq" candidate

        # Placement: output position = extended timestamp + offset.
        self._anchored = False
        self._ref_ts = 0  # extended timestamp of the last released audio packet
        self._offset = 0
        self._position = 0
        self._pending_pause = 0  # silence owed before the run's first sample

        # Arrival of the last accepted audio packet: jitter, and the pause at an SSRC change.
        self._audio_arrival: float | None = None
        self._audio_ts = 0
        self._audio_length = 0
        self._jitter = 0.0

        self._dtmf_pending: tuple[int, int, TelephoneEvent] | None = None  # ext ts, start, event
        self._dtmf_done: deque[int] = deque(maxlen=DTMF_HISTORY)

    @property
    def position(self) -> int:
        """Samples emitted so far (audio plus silence)."""
        return self._position

    @property
    def waiting(self) -> bool:
        """Packets are held behind a sequence gap: the caller should `poll()` this timeline."""
        return bool(self._held)

    @property
    def due(self) -> float:
        """When the oldest held packet has waited the jitter window (inf if none is held)."""
        for _, arrival in self._held.values():
            return arrival + self._jitter_window
        return float("inf")

    @property
    def stats(self) -> TimelineStats:
        stats = self._stats
        stats.jitter = self._jitter
        if stats.first_timestamp is not None:
            stats.last_timestamp = self._audio_ts
        return stats

    def push(self, packet: RtpPacket, arrival: float) -> None:
        """Take one packet; `arrival` is monotonic seconds (also the clock for the window)."""
        if (
            packet.marker
            or packet.payload_type != self._fast_type
            or packet.ssrc != self._ssrc
            or packet.sequence != self._next & 0xFFFF
            or self._held
        ):
            self._push(packet, arrival)
            return
        # The in-order audio case (the one fast_lane.FastLane takes over when armed):
        # _push, _sequence, _note_arrival and _release inlined.
        self._stats.received += 1
        self._last_seen = arrival
        self._next += 1
        timestamp = packet.timestamp
        previous = self._audio_arrival
        if previous is not None:
            advance = ((timestamp - self._audio_ts + 0x80000000) & 0xFFFFFFFF) - 0x80000000
            d = (arrival - previous) * self._clock_rate - advance
            self._jitter += (abs(d) - self._jitter) / 16.0
        elif self._stats.first_timestamp is None:
            self._stats.first_timestamp = timestamp
        self._audio_arrival = arrival
        self._audio_ts = timestamp
        payload = packet.payload
        self._audio_length = samples = len(payload)
        ref = self._ref_ts
        ext = ref + ((timestamp - ref + 0x80000000) & 0xFFFFFFFF) - 0x80000000
        self._ref_ts = ext
        if ext + self._offset != self._position or not self._anchored:
            self._place(ext, samples, packet)
        self._emit_audio(self._fast_codec, payload)
        self._position += samples

    def hot_state(self) -> tuple[Encoding, list[int], list[float]] | None:
        """(codec, HOT_INTS, HOT_FLOATS) while the next packet may take push's inlined case, i.e.
        the state fast_lane.FastLane takes over; None otherwise."""
        if (
            self._held
            or not self._anchored
            or self._fast_type < 0
            or self._ssrc is None
            or self._audio_arrival is None
            or self._clock_rate != 8000
        ):
            return None
        ints = [
            self._fast_type,
            self._ssrc,
            self._next,
            self._ref_ts,
            self._offset,
            self._position,
            self._audio_ts,
            self._audio_length,
            self._stats.received,
        ]
        return self._fast_codec, ints, [self._audio_arrival, self._jitter, self._last_seen]

    def set_hot_state(self, ints: list[int], floats: list[float]) -> None:
        """Take back the fields of `hot_state`, in its order (the first two and `offset` cannot
        have changed meanwhile)."""
        (_, _, self._next, self._ref_ts, _, self._position, self._audio_ts, self._audio_length,
         self._stats.received) = ints  # fmt: skip
        self._audio_arrival, self._jitter, self._last_seen = floats

    def _push(self, packet: RtpPacket, arrival: float) -> None:
        self._stats.received += 1
        if self._held:
            self._expire(arrival)
        if packet.payload_type != self._last_payload_type:
            self._note_payload_type(packet.payload_type)
        if packet.ssrc != self._ssrc:
            self._push_other_ssrc(packet, arrival)
            return
        self._last_seen = arrival
        self._sequence(packet, arrival)

    def poll(self, now: float) -> None:
        """Give up on gaps whose oldest held packet has waited the jitter window."""
        if self._held:
            self._expire(now)

    def flush(self) -> None:
        """End of stream: release everything held, in order, filling the gaps."""
        self._release_all()
        self._finish_dtmf()
        if self._probe is not None:
            self._stats.out_of_range += 1
            self._probe = None

    # Sequencing

    def _sequence(self, packet: RtpPacket, arrival: float) -> None:
        delta = (packet.sequence - self._next) & 0xFFFF
        if delta == 0:
            if self._held:
                self._stats.reordered += 1
            self._note_arrival(packet, arrival)
            self._next += 1
            self._release(packet)
            if self._held:
                self._drain()
        elif delta < MAX_DROPOUT:
            self._hold(packet, arrival, self._next + delta)
        elif delta > 0x10000 - MAX_MISORDER:
            self._behind(self._next + delta - 0x10000)
        else:
            self._out_of_range(packet, arrival)

    def _hold(self, packet: RtpPacket, arrival: float, ext: int) -> None:
        held = self._held
        if ext in held:
            self._stats.duplicate += 1
            return
        # Held packets are released in ascending order, so the largest leaves last.
        if held and ext < self._held_max:
            self._stats.reordered += 1
        else:
            self._held_max = ext
        self._note_arrival(packet, arrival)
        held[ext] = (packet, arrival)
        if len(held) > self._max_held:
            self._release_through(min(held))

    def _behind(self, ext: int) -> None:
        if ext in self._lost:
            self._lost.discard(ext)  # a second copy is then a duplicate
            self._stats.late += 1
        elif ext < self._start:
            self._stats.late += 1
        else:
            self._stats.duplicate += 1

    def _out_of_range(self, packet: RtpPacket, arrival: float) -> None:
        probe = self._probe
        if probe is not None and packet.sequence == (probe[0].sequence + 1) & 0xFFFF:
            self._probe = None
            self._stats.sequence_resets += 1
            self._restart(probe[0], probe[1], "sequence_reset")
            self._sequence(packet, arrival)
            return
        if probe is not None:
            self._stats.out_of_range += 1
        self._probe = (packet, arrival)

    def _expire(self, now: float) -> None:
        held = self._held
        while held:
            oldest = next(iter(held))
            if now - held[oldest][1] < self._jitter_window:
                return
            self._release_through(oldest)

    def _release_through(self, limit: int) -> None:
        held = self._held
        for ext in sorted(key for key in held if key <= limit):
            packet = held.pop(ext)[0]
            if ext > self._next:
                self._declare_lost(self._next, ext)
            self._next = ext + 1
            self._release(packet)
        self._drain()

    def _release_all(self) -> None:
        if self._held:
            self._release_through(max(self._held))

    def _drain(self) -> None:
        held = self._held
        while self._next in held:
            packet = held.pop(self._next)[0]
            self._next += 1
            self._release(packet)

    def _declare_lost(self, first: int, end: int) -> None:
        self._stats.lost += end - first
        # Only the last MAX_MISORDER can still arrive as "late" rather than out of range.
        for ext in range(max(first, end - MAX_MISORDER), end):
            if len(self._lost_order) >= MAX_MISORDER:
                self._lost.discard(self._lost_order.popleft())
            self._lost_order.append(ext)
            self._lost.add(ext)

    # Streams: SSRC changes and sequence restarts

    def _push_other_ssrc(self, packet: RtpPacket, arrival: float) -> None:
        if self._ssrc is None:
            self._start_run(packet, arrival, 0)
            return
        if packet.ssrc in self._retired and arrival - self._last_seen < self._ssrc_timeout:
            self._stats.stale_ssrc += 1
            return
        if len(self._retired) >= MAX_SSRCS:
            self._retired.clear()  # a flood of SSRCs: forget the old ones rather than grow
        self._retired.add(self._ssrc)
        self._retired.discard(packet.ssrc)
        if self._probe is not None:
            self._stats.out_of_range += 1
            self._probe = None
        self._restart(packet, arrival, "ssrc_change")

    def _restart(self, packet: RtpPacket, arrival: float, kind: str) -> None:
        """Close the current run and continue the timeline with `packet` as a new run."""
        self._release_all()
        self._finish_dtmf()
        old_ssrc = self._ssrc
        assert old_ssrc is not None
        pause = self._pause_before(arrival)
        at = self._position / self._clock_rate
        skipped = 0
        if pause > self._max_gap:
            skipped, pause = pause, 0
        if kind == "ssrc_change":
            event: dict[str, object] = {
                "type": kind,
                "from": ssrc_hex(old_ssrc),
                "to": ssrc_hex(packet.ssrc),
            }
        else:
            event = {"type": kind, "ssrc": ssrc_hex(packet.ssrc), "sequence": packet.sequence}
        event["at"] = at
        event["pause"] = pause / self._clock_rate
        self._output.event(event)
        if skipped:
            self._discontinuity(skipped, packet)
        self._start_run(packet, arrival, pause)

    def _pause_before(self, arrival: float) -> int:
        """Wall-clock silence between the old run's last audio and `arrival`, if beyond jitter."""
        if self._audio_arrival is None:
            return 0
        pause = arrival - self._audio_arrival - self._audio_length / self._clock_rate
        if pause <= self._jitter_window:
            return 0
        return round(pause * self._clock_rate)

    def _start_run(self, packet: RtpPacket, arrival: float, pause: int) -> None:
        if self._first_arrival is None:
            self._first_arrival = arrival
        self._ssrc = packet.ssrc
        stats = self._stats
        if packet.ssrc not in self._ssrcs_seen:
            # Bounded: a hostile sender may use a new SSRC on every packet.
            if len(self._ssrcs_seen) < MAX_SSRCS:
                self._ssrcs_seen.add(packet.ssrc)
                stats.ssrcs.append(packet.ssrc)
            else:
                stats.ssrcs_not_listed += 1
        self._last_seen = arrival
        self._start = self._next = packet.sequence
        self._lost.clear()
        self._lost_order.clear()
        self._anchored = False
        self._pending_pause = pause
        self._audio_arrival = None
        self._dtmf_done.clear()
        self._sequence(packet, arrival)

    # Placement

    def _note_arrival(self, packet: RtpPacket, arrival: float) -> None:
        if packet.payload_type not in AUDIO_CODECS:
            # DTMF carries its event's start timestamp, which would read as huge jitter.
            return
        timestamp = packet.timestamp
        previous = self._audio_arrival
        if previous is not None:
            advance = ((timestamp - self._audio_ts + 0x80000000) & 0xFFFFFFFF) - 0x80000000
            d = (arrival - previous) * self._clock_rate - advance
            self._jitter += (abs(d) - self._jitter) / 16.0
        elif self._stats.first_timestamp is None:
            self._stats.first_timestamp = timestamp
        self._audio_arrival = arrival
        self._audio_ts = timestamp
        self._audio_length = len(packet.payload)

    def _extend_timestamp(self, timestamp: int) -> int:
        ref = self._ref_ts
        return ref + ((timestamp - ref + 0x80000000) & 0xFFFFFFFF) - 0x80000000

    def _release(self, packet: RtpPacket) -> None:
        codec = AUDIO_CODECS.get(packet.payload_type)
        if codec is None:
            self._release_non_audio(packet)
            return
        ref = self._ref_ts
        ext = ref + ((packet.timestamp - ref + 0x80000000) & 0xFFFFFFFF) - 0x80000000
        self._ref_ts = ext
        payload = packet.payload
        if ext + self._offset != self._position or not self._anchored:
            self._place(ext, len(payload), packet)
        self._emit_audio(codec, payload)
        self._position += len(payload)

    def _anchor(self, ext: int) -> None:
        self._offset = self._position + self._pending_pause - ext
        self._pending_pause = 0
        self._ref_ts = ext
        self._anchored = True

    def _place(self, ext: int, samples: int, packet: RtpPacket) -> None:
        """Move the current end to where an audio packet at `ext` belongs (or rebase)."""
        if not self._anchored:
            self._anchor(ext)
        gap = ext + self._offset - self._position
        if gap > self._max_gap:
            self._discontinuity(gap, packet)
            self._offset -= gap
        elif gap > 0:
            if self._position + gap > self._wall_clock_budget():
                # More silence than time has passed (plus max_gap): a sender that jumps its
                # timestamps ahead again and again must not make us write hours per second.
                self._discontinuity(gap, packet)
                self._offset -= gap
                return
            self._output.silence(gap)
            self._position += gap
        elif gap < 0:
            if gap + samples > 0:
                self._stats.overlaps += 1
            else:
                self._stats.timestamp_jumps += 1
                self._output.event(
                    {
                        "type": "timestamp_jump",
                        "at": self._position / self._clock_rate,
                        "jump": gap / self._clock_rate,
                        "ssrc": ssrc_hex(packet.ssrc),
                        "sequence": packet.sequence,
                    }
                )
            self._offset -= gap

    def _wall_clock_budget(self) -> int:
        """The furthest the timeline may reach: the time since the first packet, plus max_gap."""
        first = self._first_arrival if self._first_arrival is not None else self._last_seen
        return round((self._last_seen - first) * self._clock_rate) + self._max_gap

    def _discontinuity(self, gap: int, packet: RtpPacket) -> None:
        event: dict[str, object] = {
            "type": "discontinuity",
            "at": self._position / self._clock_rate,
            "skipped": gap / self._clock_rate,
            "ssrc": ssrc_hex(packet.ssrc),
            "sequence": packet.sequence,
        }
        if len(self._stats.discontinuities) < MAX_EVENTS:
            self._stats.discontinuities.append(event)
        self._output.event(event)

    def _release_non_audio(self, packet: RtpPacket) -> None:
        payload_type = packet.payload_type
        if payload_type == self._dtmf_payload_type:
            self._release_telephone_event(packet)
        elif payload_type == PT_COMFORT_NOISE:
            # Zero-length: the silence up to the next audio packet comes from its timestamp.
            self._stats.comfort_noise += 1
            if not self._anchored:
                self._anchor(self._extend_timestamp(packet.timestamp))
        else:
            self._stats.unknown_payload_type += 1

    # DTMF (RFC 4733)

    def _release_telephone_event(self, packet: RtpPacket) -> None:
        try:
            event = TelephoneEvent.parse(packet.payload)
        except RtpParseError:
            self._stats.bad_telephone_event += 1
            return
        ext = self._extend_timestamp(packet.timestamp)
        if not self._anchored:
            self._anchor(ext)
        if ext in self._dtmf_done:
            return  # a retransmitted end packet
        pending = self._dtmf_pending
        if pending is not None and pending[0] != ext:
            self._emit_dtmf(pending[1], pending[2])
            pending = None
        start = pending[1] if pending is not None else ext + self._offset
        if event.end:
            self._dtmf_pending = None
            self._dtmf_done.append(ext)
            self._emit_dtmf(start, event)
        else:
            self._dtmf_pending = (ext, start, event)

    def _finish_dtmf(self) -> None:
        pending = self._dtmf_pending
        if pending is not None:
            self._dtmf_pending = None
            self._emit_dtmf(pending[1], pending[2])

    def _emit_dtmf(self, start: int, event: TelephoneEvent) -> None:
        assert self._ssrc is not None
        record: dict[str, object] = {
            "type": "dtmf",
            "digit": event.digit,
            "start": start / self._clock_rate,
            "duration": event.duration / self._clock_rate,
            "volume": event.volume,
            "ssrc": ssrc_hex(self._ssrc),
            "ended": event.end,
        }
        if len(self._stats.dtmf) < MAX_EVENTS:
            self._stats.dtmf.append(record)
        self._output.event(record)

    def _note_payload_type(self, payload_type: int) -> None:
        self._last_payload_type = payload_type
        codec = AUDIO_CODECS.get(payload_type)
        self._fast_type = payload_type if codec is not None else -1  # -1: never a payload type
        self._fast_codec = codec or Encoding.PCMU
        if payload_type not in self._stats.payload_types:
            self._stats.payload_types.append(payload_type)
