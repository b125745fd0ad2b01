"""One RTP stream: the packets of one source on one socket, its timeline and its tap; and the
sockets streams arrive on.

While its timeline is in the in-order case, the stream is *armed* in the fast lane
(`receiver.rtp.fast_lane`), which then holds the newest copy of the timeline's hot state and the
stream's latest audio. Everything that reads or changes the stream goes through this class,
which brings the timeline up to date first (`sync`), so no caller has to remember to.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Hashable
from typing import Any

from receiver.codecs.encoding import Encoding
from receiver.codecs.opus_packet import OpusPacketError, packet_samples
from receiver.rtp.fast_lane import FastLane
from receiver.rtp.packet import RtpPacket
from receiver.rtp.timeline import RtpTimeline
from receiver.taps.audio_buffer import AudioBuffer
from receiver.taps.tap import Tap


class TapOutput:
    """Connects a timeline's output to a tap: audio and silence go to its buffer. The timeline
    counts in RTP clock ticks (`clock_rate`), the buffer in samples of the tap's rate: G.722's
    clock is 8 kHz and its audio 16 kHz. For Opus, each payload is one packet, and a gap is
    audio that was lost (concealed by the decoder, not silence)."""

    __slots__ = ("_buffer", "_tap", "audio", "event", "silence")

    def __init__(self, tap: Tap, clock_rate: int = 8000) -> None:
        buffer = tap.buffer
        assert isinstance(buffer, AudioBuffer)
        self._buffer = buffer
        self._tap = tap
        self.event = tap.add_event
        self.audio: Callable[[Encoding, bytes], None]
        self.silence: Callable[[int], None]
        if tap.codec == Encoding.OPUS:
            self.audio = self._opus_packet
            self.silence = self._opus_lost
        elif tap.sample_rate != clock_rate:
            ratio = tap.sample_rate // clock_rate
            self.audio = buffer.append
            self.silence = lambda ticks: buffer.append_silence(ticks * ratio)
        else:
            self.audio = buffer.append
            self.silence = buffer.append_silence

    def _opus_packet(self, codec: Encoding, payload: bytes) -> None:
        try:
            frames = packet_samples(payload)  # Opus taps on RTP are recorded at 48 kHz
        except OpusPacketError:  # the timeline gave it no time: the gap is concealed
            self._tap.count("corrupt_packets")
            return
        self._buffer.append_packet(codec, payload, frames)

    def _opus_lost(self, ticks: int) -> None:
        self._buffer.append_lost(Encoding.OPUS, ticks)


class Discard:
    """Timeline output of a stream whose recording was stopped (max_tap_duration_action)."""

    def audio(self, codec: Encoding, payload: bytes) -> None:
        pass

    def silence(self, samples: int) -> None:
        pass

    def event(self, event: dict[str, Any]) -> None:
        pass


class RtpSocket:
    """One bound UDP socket: the shared port, or a pool port reserved for one tap."""

    def __init__(self, sock: socket.socket, port: int, pool: bool, calm_reads: int) -> None:
        self.sock = sock
        self.port = port
        self.pool = pool
        # Datagrams one drain may find and still leave the receiver its long sleep (receiver.py)
        self.calm_reads = calm_reads
        self.owner: RtpStream | None = None  # a pool port's first stream: the tap it is for
        self.streams: dict[Hashable, RtpStream] = {}  # by the reader's source key


class RtpStream:
    __slots__ = (
        "addr",
        "key",
        "lane",
        "lane_key",
        "last_arrival",
        "muted",
        "queued",
        "slot",
        "socket",
        "tap",
        "timeline",
    )

    def __init__(
        self,
        sock: RtpSocket,
        key: Hashable,
        addr: Any,
        tap: Tap,
        timeline: RtpTimeline,
        now: float,
        lane: FastLane,
        lane_key: int,
    ) -> None:
        self.socket = sock
        self.key = key  # the reader's key for the source address
        self.addr = addr  # (host, port) or, for IPv6, (host, port, flowinfo, scope_id)
        self.tap = tap
        self.timeline = timeline
        self.last_arrival = now
        self.muted = False
        self.queued = False  # waiting in the receiver's heap of held packets
        self.lane = lane
        self.lane_key = lane_key  # its key in the fast lane (IPv4 sources), and its slot there
        self.slot = lane.add(lane_key) if lane_key else -1

    def push(self, packet: RtpPacket, now: float) -> bool:
        """One packet through the general path; True if packets now wait behind a gap (the
        receiver polls the stream when the oldest is due: `timeline.due`)."""
        if self.slot >= 0:
            self.lane.disarm(self.slot)  # the timeline's own fields are current again
        self.last_arrival = now
        timeline = self.timeline
        timeline.push(packet, now)
        if timeline.waiting:
            return True
        self._arm()
        return False

    def poll(self, now: float) -> bool:
        """Release held packets whose gap has waited the jitter window; True if some still wait."""
        timeline = self.timeline
        timeline.poll(now)
        if timeline.waiting:
            return True
        self._arm()
        return False

    def _arm(self) -> None:
        """Let the fast lane take the next in-order packets, if the timeline is in that case."""
        if self.slot >= 0 and not self.muted:
            buffer = self.tap.buffer
            assert isinstance(buffer, AudioBuffer)
            self.lane.arm(self.slot, self.timeline, buffer.append)

    def sync(self) -> None:
        """Bring the timeline's fields and the tap's buffer up to date from the lane."""
        if self.slot >= 0:
            self.lane.sync(self.slot)
            seen = self.lane.last_seen(self.slot)
            if seen is not None and seen > self.last_arrival:
                self.last_arrival = seen

    def idle_for(self, now: float, lane_seen: list[float]) -> float:
        """Seconds since the stream's last packet (`lane_seen`: FastLane.last_seen_all())."""
        seen = max(self.last_arrival, lane_seen[self.slot]) if self.slot >= 0 else self.last_arrival
        return now - seen

    def stats(self) -> dict[str, Any]:
        """The sidecar's `rtp` block, as of now."""
        self.sync()
        tap = self.tap
        return {
            **self.timeline.stats.to_dict(),
            "malformed": tap.counters.get("malformed", 0),
            "rtcp": tap.counters.get("rtcp_packets", 0),
        }

    def flush(self) -> None:
        """End of the stream: leave the lane and release everything the timeline holds."""
        self.leave_lane()
        self.timeline.flush()

    def leave_lane(self) -> None:
        if self.slot >= 0:
            self.lane.disarm(self.slot)
            self.lane.remove(self.lane_key, self.slot)
            self.slot = -1

    def mute(self, timeline: RtpTimeline) -> None:
        """Its recording was stopped: further packets go to `timeline` (which discards them)
        until the stream goes idle."""
        self.muted = True
        self.timeline = timeline
