"""RtpTimeline: one stream's packets in, contiguous audio, silence and sidecar events out.

It composes the pieces of the package: a packet of the current SSRC goes to sequencing; what
sequencing releases goes, by payload type, to placement (audio), to the telephone events (DTMF)
or is counted; a packet of another SSRC is stale, or on probation until its SSRC takes over and
starts a new run, as does a confirmed sequence reset. `push` handles the in-order audio case
inline, on the hot record alone.
"""

from __future__ import annotations

from receiver.codecs.encoding import Encoding
from receiver.codecs.opus_packet import OpusPacketError, packet_samples
from receiver.rtp.packet import (
    AUDIO_CODECS,
    DEFAULT_TELEPHONE_EVENT_PT,
    PT_COMFORT_NOISE,
    RtpPacket,
)
from receiver.rtp.timeline.dtmf import TelephoneEvents
from receiver.rtp.timeline.hot_state import HotState
from receiver.rtp.timeline.placement import Placement, TimelineOutput
from receiver.rtp.timeline.sequencing import MAX_HELD, Sequencer
from receiver.rtp.timeline.ssrc import SsrcHistory, SsrcProbation
from receiver.rtp.timeline.stats import InterarrivalJitter, TimelineStats, ssrc_hex


def opus_ticks(payload: bytes) -> int:
    """An Opus payload's duration at its 48 kHz RTP clock; 0 for one that is no Opus packet
    (the tap's output counts it, and the gap to the next packet is concealed)."""
    try:
        return packet_samples(payload)
    except OpusPacketError:
        return 0


class RtpTimeline:
    """Turns one stream's RTP packets into contiguous audio, silence and sidecar events."""

    __slots__ = (
        "_audio_codecs",
        "_clock_rate",
        "_dtmf",
        "_emit_audio",
        "_held",
        "_hot",
        "_last_payload_type",
        "_output",
        "_place",
        "_placement",
        "_probation",
        "_samples_of",
        "_sequencer",
        "_ssrcs",
        "_stats",
    )

    def __init__(
        self,
        output: TimelineOutput,
        *,
        clock_rate: int = 8000,
        jitter_window: float = 0.2,
        max_gap: float = 30.0,
        dtmf_payload_type: int = DEFAULT_TELEPHONE_EVENT_PT,
        max_held: int = MAX_HELD,
        ssrc_timeout: float = 2.0,
        audio_codecs: dict[int, Encoding] | None = None,
    ) -> None:
        """`jitter_window` and `max_gap` in seconds; `ssrc_timeout`: see ssrc.py;
        `audio_codecs`: the payload types recorded as audio (all of one RTP clock and output
        rate; default: the static ones, G.711 and G.722)."""
        # Settings
        self._output = output
        self._clock_rate = clock_rate
        self._audio_codecs = codecs = AUDIO_CODECS if audio_codecs is None else audio_codecs
        # A payload's duration in clock ticks: its length (G.711, G.722), or an Opus TOC's
        self._samples_of = samples_of = (
            opus_ticks if any(c.is_packetized for c in codecs.values()) else len
        )

        # State shared by the pieces, and what they count
        self._hot = hot = HotState()
        self._stats = stats = TimelineStats(clock_rate=clock_rate)
        self._last_payload_type = -1

        # The pieces
        self._placement = placement = Placement(
            clock_rate, round(max_gap * clock_rate), jitter_window, output, hot, stats, samples_of
        )
        self._sequencer = Sequencer(
            jitter_window,
            max_held,
            hot,
            stats,
            note_arrival=InterarrivalJitter(clock_rate, codecs, hot, stats, samples_of).note,
            release=self._release,
            restart=self._sequence_reset,
        )
        self._dtmf = TelephoneEvents(dtmf_payload_type, clock_rate, output, hot, placement, stats)
        self._ssrcs = SsrcHistory(ssrc_timeout, hot, stats)
        self._probation = SsrcProbation(stats)

        # For push's inlined case
        self._held = self._sequencer.held
        self._place = placement.place
        self._emit_audio = output.audio

    @property
    def audio_codecs(self) -> dict[int, Encoding]:
        return self._audio_codecs

    @property
    def clock_rate(self) -> int:
        return self._clock_rate

    @property
    def position(self) -> int:
        """Samples emitted so far (audio plus silence)."""
        return self._hot.position

    @property
    def waiting(self) -> bool:
        """Packets are held behind a sequence gap: the caller should `poll()` this timeline."""
        return bool(self._held)

    @property
    def due(self) -> float:
        """When the oldest held packet has waited the jitter window (inf if none is held)."""
        return self._sequencer.due

    @property
    def stats(self) -> TimelineStats:
        stats, hot = self._stats, self._hot
        stats.received = hot.received
        stats.interarrival_jitter = hot.interarrival_jitter
        if stats.first_timestamp is not None:
            stats.last_timestamp = hot.audio_ts
        return stats

    def push(self, packet: RtpPacket, arrival: float) -> None:
        """Take one packet; `arrival` is monotonic seconds (also the clock for the window)."""
        hot = self._hot
        if (
            packet.marker
            or packet.payload_type != hot.payload_type
            or packet.ssrc != hot.ssrc
            or packet.sequence != hot.next & 0xFFFF
            or self._held
        ):
            self._push(packet, arrival)
            return
        # The in-order audio case (the one fast_lane.FastLane takes over when armed): _push,
        # Sequencer.sequence, InterarrivalJitter.note and Placement.release_audio inlined.
        hot.received += 1
        hot.last_seen = arrival
        hot.next += 1
        timestamp = packet.timestamp
        previous = hot.audio_arrival
        if previous is not None:
            advance = ((timestamp - hot.audio_ts + 0x80000000) & 0xFFFFFFFF) - 0x80000000
            d = (arrival - previous) * self._clock_rate - advance
            hot.interarrival_jitter += (abs(d) - hot.interarrival_jitter) / 16.0
        elif self._stats.first_timestamp is None:
            self._stats.first_timestamp = timestamp
        hot.audio_arrival = arrival
        hot.audio_ts = timestamp
        payload = packet.payload
        hot.audio_length = samples = self._samples_of(payload)
        ref = hot.ref_ts
        ext = ref + ((timestamp - ref + 0x80000000) & 0xFFFFFFFF) - 0x80000000
        hot.ref_ts = ext
        if ext + hot.offset != hot.position or not hot.anchored:
            self._place(ext, samples, packet)
        self._emit_audio(hot.codec, payload)
        hot.position += samples

    def hot_state(self) -> HotState | None:
        """The hot record, while the next packet may take push's inlined case (the state
        fast_lane.FastLane takes over: it writes the fields back into this record); None
        otherwise."""
        hot = self._hot
        if (
            self._held
            or not hot.anchored
            or hot.payload_type < 0
            or hot.ssrc < 0
            or hot.audio_arrival is None
            or self._clock_rate != 8000
        ):
            return None
        return hot

    def poll(self, now: float) -> None:
        """Give up on gaps whose oldest held packet has waited the jitter window."""
        if self._held:
            self._sequencer.expire(now)

    def flush(self) -> None:
        """End of stream: release everything held, in order, filling the gaps."""
        self._sequencer.release_all()
        self._dtmf.finish()
        self._sequencer.drop_probe()
        self._probation.drop()

    def _push(self, packet: RtpPacket, arrival: float) -> None:
        self._hot.received += 1
        if self._held:
            self._sequencer.expire(arrival)
        if packet.ssrc != self._hot.ssrc:
            self._push_other_ssrc(packet, arrival)
        else:
            self._accept(packet, arrival)

    def _accept(self, packet: RtpPacket, arrival: float) -> None:
        """A packet of the current SSRC."""
        if packet.payload_type != self._last_payload_type:
            self._note_payload_type(packet.payload_type)
        self._hot.last_seen = arrival
        self._sequencer.sequence(packet, arrival)

    def _release(self, packet: RtpPacket) -> None:
        """A packet sequencing released, by payload type."""
        payload_type = packet.payload_type
        codec = self._audio_codecs.get(payload_type)
        if codec is not None:
            self._placement.release_audio(codec, packet)
        elif payload_type == self._dtmf.payload_type:
            self._dtmf.release(packet)
        elif payload_type == PT_COMFORT_NOISE:
            # Zero-length: the silence up to the next audio packet comes from its timestamp.
            self._stats.comfort_noise += 1
            self._placement.anchor_at(packet.timestamp)
        else:
            self._stats.unknown_payload_type += 1

    def _note_payload_type(self, payload_type: int) -> None:
        self._last_payload_type = payload_type
        codec = self._audio_codecs.get(payload_type)
        self._hot.payload_type = payload_type if codec is not None else -1
        self._hot.codec = codec or Encoding.PCMU
        if payload_type not in self._stats.payload_types:
            self._stats.payload_types.append(payload_type)

    # Runs: the first packet, SSRC changes and sequence resets

    def _push_other_ssrc(self, packet: RtpPacket, arrival: float) -> None:
        stats = self._stats
        if self._hot.ssrc < 0:
            self._start_run(packet, arrival, 0)
            self._accept(packet, arrival)
        elif self._ssrcs.is_stale(packet.ssrc, arrival):
            stats.stale_ssrc += 1
            if packet.payload_type in self._audio_codecs:
                self._ssrcs.stale_audio(packet)
        elif packet.payload_type not in self._audio_codecs:
            stats.ssrc_probation_dropped += 1  # only audio may start or continue a streak
        else:
            streak = self._probation.offer(packet, arrival)
            if streak is not None:
                self._take_over(streak)

    def _take_over(self, streak: list[tuple[RtpPacket, float]]) -> None:
        """A new SSRC passed probation: its streak starts a new run."""
        first, arrival = streak[0]
        self._sequencer.drop_probe()
        self._close_run()
        self._ssrcs.change(first.ssrc)  # after the close: what the old run accounted for is final
        self._new_run(first, arrival, "ssrc_change")
        for packet, at in streak:
            self._accept(packet, at)

    def _sequence_reset(self, packet: RtpPacket, arrival: float) -> None:
        self._close_run()
        self._new_run(packet, arrival, "sequence_reset")
        self._sequencer.sequence(packet, arrival)

    def _close_run(self) -> None:
        self._sequencer.release_all()
        self._dtmf.finish()

    def _new_run(self, packet: RtpPacket, arrival: float, kind: str) -> None:
        """Continue the timeline with a new run starting at `packet` (the caller sequences it),
        after the pause the sender made, and say so."""
        pause, skipped = self._placement.pause_before(arrival)
        if kind == "ssrc_change":
            event: dict[str, object] = {
                "type": kind,
                "from": ssrc_hex(self._hot.ssrc),
                "to": ssrc_hex(packet.ssrc),
            }
        else:
            event = {"type": kind, "ssrc": ssrc_hex(packet.ssrc), "sequence": packet.sequence}
        event["at"] = self._hot.position / self._clock_rate
        event["pause"] = pause / self._clock_rate
        self._output.event(event)
        if skipped:
            self._placement.discontinuity(skipped, packet)
        self._start_run(packet, arrival, pause)

    def _start_run(self, packet: RtpPacket, arrival: float, pause: int) -> None:
        """A run of `packet`'s SSRC starting at its sequence number (not yet sequenced)."""
        hot = self._hot
        self._placement.start_run(arrival, pause)
        hot.ssrc = packet.ssrc
        self._ssrcs.note(packet.ssrc)
        hot.last_seen = arrival
        hot.audio_arrival = None
        self._sequencer.start_run(packet.sequence)
        self._dtmf.start_run()
