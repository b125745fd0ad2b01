"""The UDP side: datagrams on `rtp_port` -> one timeline and one tap per source (ip, port).

The datagram handler never blocks and never raises: it parses, looks the stream up and pushes
the packet into that stream's timeline, whose output is appended to the tap's buffer (no numpy
per packet). A periodic task releases packets held for reordering and ends idle streams.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Any

from receiver.audio_buffer import AudioBuffer
from receiver.config import Config
from receiver.registry import TapRegistry
from receiver.rtp.packet import RtpPacket, RtpParseError, is_rtcp
from receiver.rtp.timeline import RtpTimeline
from receiver.tap import Tap
from receiver.tap_id import file_safe_id

log = logging.getLogger("receiver.rtp")

POLL_INTERVAL = 0.02  # how often held packets are checked against the jitter window
IDLE_CHECK_INTERVAL = 0.25
_REFUSED_MEMORY = 10_000  # sources remembered so a refusal is logged once per source
_CODECS = {0: "PCMU", 8: "PCMA"}


class _TapOutput:
    """Connects a timeline's output to a tap: audio and silence go to its buffer."""

    __slots__ = ("audio", "event", "silence")

    def __init__(self, tap: Tap) -> None:
        buffer = tap.buffer
        assert isinstance(buffer, AudioBuffer)
        self.audio = buffer.append
        self.silence = buffer.append_silence
        self.event = tap.events.append


class RtpStream:
    __slots__ = ("key", "last_arrival", "tap", "timeline")

    def __init__(self, key: tuple[str, int], tap: Tap, timeline: RtpTimeline, now: float) -> None:
        self.key = key
        self.tap = tap
        self.timeline = timeline
        self.last_arrival = now


def open_udp_socket(host: str, port: int, recv_buffer: int) -> tuple[socket.socket, int]:
    """A bound UDP socket with SO_RCVBUF raised; returns it and what the kernel granted."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, recv_buffer)
        granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        if granted < recv_buffer and hasattr(socket, "SO_RCVBUFFORCE"):
            try:  # root (e.g. in a container) may go past net.core.rmem_max
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUFFORCE, recv_buffer)
                granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            except OSError:
                pass
        sock.bind(address)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock, granted


class RtpEndpoint(asyncio.DatagramProtocol):
    def __init__(self, config: Config, registry: TapRegistry) -> None:
        self.config = config
        self.registry = registry
        self.streams: dict[tuple[str, int], RtpStream] = {}
        self._waiting: set[RtpStream] = set()
        self._refused: set[tuple[str, int]] = set()
        self.counters: dict[str, int] = {
            "datagrams": 0,
            "rtcp": 0,
            "malformed": 0,
            "streams_refused": 0,
            "internal_errors": 0,
        }
        self.transport: asyncio.DatagramTransport | None = None

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def error_received(self, exc: Exception) -> None:
        self._count("socket_errors")
        log.debug("UDP socket error: %s", exc)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        counters = self.counters
        counters["datagrams"] += 1
        try:
            key = (addr[0], addr[1])
            stream = self.streams.get(key)
            if is_rtcp(data):
                counters["rtcp"] += 1
                if stream is not None:
                    stream.tap.count("rtcp_packets")
                return
            try:
                packet = RtpPacket.parse(data)
            except RtpParseError as exc:
                counters["malformed"] += 1
                self._count("malformed_" + exc.reason)
                if stream is not None:
                    stream.tap.count("malformed")
                    stream.tap.count("malformed_" + exc.reason)
                return
            now = time.monotonic()
            if stream is None:
                stream = self._new_stream(key, packet, now)
                if stream is None:
                    return
            stream.last_arrival = now
            timeline = stream.timeline
            timeline.push(packet, now)
            if timeline.waiting:
                self._waiting.add(stream)
        except Exception:
            counters["internal_errors"] += 1
            if counters["internal_errors"] <= 10:
                log.exception("error handling a datagram from %s", addr)

    def _new_stream(self, key: tuple[str, int], packet: RtpPacket, now: float) -> RtpStream | None:
        if len(self.streams) >= self.config.rtp_max_streams:
            self.counters["streams_refused"] += 1
            if key not in self._refused:
                if len(self._refused) >= _REFUSED_MEMORY:
                    self._refused.clear()
                self._refused.add(key)
                log.warning(
                    "refused RTP stream from %s:%d: %d streams is the limit (rtp_max_streams)",
                    key[0],
                    key[1],
                    self.config.rtp_max_streams,
                )
            return None
        tap_id = file_safe_id(f"rtp-{key[0]}-{key[1]}")
        codec = _CODECS.get(packet.payload_type, "PCMU")
        tap = Tap(tap_id, "rtp", codec, remote=f"{key[0]}:{key[1]}")
        timeline = RtpTimeline(
            _TapOutput(tap),
            clock_rate=8000,
            jitter=self.config.rtp_jitter_ms / 1000,
            max_gap=self.config.rtp_max_gap,
            dtmf_payload_type=self.config.rtp_dtmf_payload_type,
        )
        stream = RtpStream(key, tap, timeline, now)
        self.streams[key] = stream
        self.registry.start(tap)
        return stream

    def end_stream(self, stream: RtpStream, reason: str) -> None:
        if self.streams.pop(stream.key, None) is None:
            return
        self._waiting.discard(stream)
        try:
            stream.timeline.flush()
        except Exception:
            self.counters["internal_errors"] += 1
            log.exception("tap %s: error flushing its timeline", stream.tap.tap_id)
        tap = stream.tap
        tap.extra["rtp"] = {
            **stream.timeline.stats.to_dict(),
            "malformed": tap.counters.get("malformed", 0),
            "rtcp": tap.counters.get("rtcp_packets", 0),
        }
        self.registry.finish(tap, reason)

    def poll(self, now: float) -> None:
        """Release packets whose gap has waited out the jitter window."""
        for stream in list(self._waiting):
            stream.timeline.poll(now)
            if not stream.timeline.waiting:
                self._waiting.discard(stream)

    def end_idle(self, now: float) -> None:
        limit = self.config.rtp_idle_timeout
        idle = [s for s in self.streams.values() if now - s.last_arrival > limit]
        for stream in idle:
            self.end_stream(stream, "idle timeout")

    async def run_housekeeping(self) -> None:
        next_idle_check = 0.0
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            now = time.monotonic()
            try:
                if self._waiting:
                    self.poll(now)
                if now >= next_idle_check:
                    next_idle_check = now + IDLE_CHECK_INTERVAL
                    self.end_idle(now)
            except Exception:
                self.counters["internal_errors"] += 1
                log.exception("RTP housekeeping error")

    def end_all(self, reason: str) -> None:
        for stream in list(self.streams.values()):
            self.end_stream(stream, reason)

    def stats(self) -> dict[str, Any]:
        return {"active_streams": len(self.streams), **self.counters}
