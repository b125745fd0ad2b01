"""The UDP side: datagrams -> one timeline and one tap per source (ip, port), on the shared
`rtp_port` and on per-tap ports from `rtp_port_range`.

Datagrams are read in batches (`receiver.rtp.datagrams`: recvmmsg on Linux) every
RECEIVE_INTERVAL from whichever sockets are readable, instead of one event-loop callback per
datagram. In-order audio of known IPv4 streams is applied to their timelines a batch at a time
(`receiver.rtp.fast_lane`); every other datagram goes through `handle`, which never raises: it
looks the stream up by source and pushes the packet into that stream's timeline, whose output is
appended to the tap's buffer (no numpy per packet). A periodic task releases packets
held for reordering, ends idle streams and expires registrations nobody used.

Naming: a stream that nothing names becomes `rtp-<ip>-<port>`. A registration (POST /api/taps)
names it in advance, either by a port allocated from the pool (every packet to that port belongs
to the tap) or by the expected source address on the shared port; a SignalWire status callback
can also name it after the fact (the files are renamed).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import platform
import selectors
import socket
import sys
import time
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from receiver.config import Config, parse_port_range
from receiver.rtp.datagrams import BATCH, Batch, enable_timestamps, open_reader
from receiver.rtp.fast_lane import FastLane
from receiver.rtp.packet import AUDIO_CODECS, RtpPacket, RtpParseError, is_rtcp
from receiver.rtp.timeline import RtpTimeline
from receiver.taps.admission import AddressFilter, RateLimiter
from receiver.taps.audio_buffer import AudioBuffer
from receiver.taps.registry import TapRegistry
from receiver.taps.tap import Tap
from receiver.taps.tap_id import file_safe_id

log = logging.getLogger("receiver.rtp")

RECEIVE_INTERVAL = 0.005  # how often readable sockets are drained (see datagrams.py)
MAX_BATCHES = 16  # per socket per drain, so one flooded socket cannot hold the loop for long
POLL_INTERVAL = 0.02  # how often held packets are checked against the jitter window
IDLE_CHECK_INTERVAL = 0.25
_REFUSED_MEMORY = 10_000  # sources remembered so a refused source is counted once
REFUSAL_LOG_INTERVAL = 10.0  # seconds between log lines about refused sources, per reason
_TOTALS = ("received", "lost", "late", "duplicate", "reordered")


class NoFreePort(Exception):
    """Every port of rtp_port_range is in use."""


@dataclass
class Registration:
    """A tap named before its first packet: by a pool port, or by its expected source."""

    tap_id: str
    codec: str = "PCMU"
    port: int | None = None  # a pool port that belongs to this tap
    source: tuple[str, int] | None = None  # or: the expected sender on the shared port
    created: float = field(default_factory=time.monotonic)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the SignalWire event's ids
    stream: RtpStream | None = None


class _TapOutput:
    """Connects a timeline's output to a tap: audio and silence go to its buffer."""

    __slots__ = ("audio", "event", "silence")

    def __init__(self, tap: Tap) -> None:
        buffer = tap.buffer
        assert isinstance(buffer, AudioBuffer)
        self.audio = buffer.append
        self.silence = buffer.append_silence
        self.event = tap.add_event


class _Discard:
    """Timeline output of a stream whose recording was stopped (max_tap_duration_action)."""

    def audio(self, codec: str, payload: bytes) -> None:
        pass

    def silence(self, samples: int) -> None:
        pass

    def event(self, event: dict[str, Any]) -> None:
        pass


_DISCARD = _Discard()


class RtpStream:
    __slots__ = (
        "addr",
        "key",
        "lane_key",
        "last_arrival",
        "muted",
        "queued",
        "registration",
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
        registration: Registration | None,
    ) -> None:
        self.socket = sock
        self.key = key  # the reader's key for the source address
        self.addr = addr  # (host, port) or, for IPv6, (host, port, flowinfo, scope_id)
        self.tap = tap
        self.timeline = timeline
        self.last_arrival = now
        self.registration = registration
        self.muted = False
        self.queued = False  # in RtpReceiver._due
        self.lane_key = 0  # its key in the fast lane (IPv4 sources), and its slot there
        self.slot = -1

    def stats(self) -> dict[str, Any]:
        tap = self.tap
        return {
            **self.timeline.stats.to_dict(),
            "malformed": tap.counters.get("malformed", 0),
            "rtcp": tap.counters.get("rtcp_packets", 0),
        }


class RtpSocket:
    """One bound UDP socket: the shared port, or a pool port owned by a registration."""

    def __init__(self, sock: socket.socket, port: int, registration: Registration | None):
        self.sock = sock
        self.port = port
        self.registration = registration
        self.streams: dict[Hashable, RtpStream] = {}  # by the reader's source key


# Python's socket module does not export it: 33 in Linux's asm-generic/socket.h (x86, ARM, ...).
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", None) or (
    33 if sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64", "i686") else None
)


def open_udp_socket(
    host: str, port: int, recv_buffer: int, *, reuse_port: bool = False
) -> tuple[socket.socket, int]:
    """A bound UDP socket with SO_RCVBUF raised; returns it and what the kernel granted.

    `reuse_port` is for the shared port under `--workers N` (bound by the parent); pool ports are
    bound without it, so two workers can never both own one."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, recv_buffer)
        granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)  # Linux: 2x, if allowed
        if granted < 2 * recv_buffer and SO_RCVBUFFORCE is not None:
            try:  # with CAP_NET_ADMIN (root, outside a container) past net.core.rmem_max
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, recv_buffer)
                granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            except OSError:
                pass
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock, granted


class RtpReceiver:
    def __init__(self, config: Config, registry: TapRegistry) -> None:
        self.config = config
        self.registry = registry
        self.shared: RtpSocket | None = None
        self.pool_range = parse_port_range(config.rtp_port_range)
        self.pool_sockets: dict[int, RtpSocket] = {}  # port -> socket, allocated ports only
        self.by_source: dict[tuple[str, int], Registration] = {}
        self.stream_count = 0
        # Streams holding packets behind a gap, by when the oldest is due: (due, tiebreak, stream)
        self._due: list[tuple[float, int, RtpStream]] = []
        self._tiebreak = itertools.count()
        self._refused: set[tuple[str, int]] = set()
        self._refusal_log: dict[str, tuple[int, float]] = {}  # reason -> (suppressed, last line)
        self._next_pool_index = 0
        self.counters: dict[str, int] = {
            "datagrams": 0,
            "rtcp": 0,
            "malformed": 0,
            "streams_refused": 0,
            "packets_refused": 0,
            "internal_errors": 0,
            "socket_errors": 0,
            "registrations_expired": 0,
            "truncated": 0,  # datagrams longer than datagrams.MAX_DATAGRAM, dropped
            "fast_lane_packets": 0,  # applied by the vectorised path (fast_lane.py)
        }
        self.totals: dict[str, int] = dict.fromkeys(_TOTALS, 0)  # of ended streams
        self.max_streams = config.rtp_max_streams  # lowered to fit the open-file limit at start
        self.allowed = AddressFilter(config.rtp_allow)
        self.rate_limiter = RateLimiter(config.new_tap_rate_limit)
        self.low_disk = False  # set by the server while the free-space floor is crossed
        self.reader = open_reader()
        self.lane = FastLane()
        registry.audio_holders.append(self.lane.drain_all)
        self._selector = selectors.DefaultSelector()
        self._closed = False  # sockets and selector closed (shutdown)
        self._pump: asyncio.Handle | None = None

    # -- sockets ------------------------------------------------------------------------------

    async def open_shared(
        self, host: str, port: int, inherited: socket.socket | None = None
    ) -> tuple[int, int]:
        """Bind the shared port, or use the socket a `--workers` parent bound; returns (port,
        SO_RCVBUF granted). Raises OSError."""
        if inherited is not None:
            sock = inherited
            granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        else:
            sock, granted = open_udp_socket(host, port, self.config.rtp_recv_buffer)
        bound = int(sock.getsockname()[1])
        self.shared = self._attach(sock, bound, None)
        if self._pump is None:
            self._pump = asyncio.get_running_loop().call_soon(self._receive_tick)
        return bound, granted

    def _attach(
        self, sock: socket.socket, port: int, registration: Registration | None
    ) -> RtpSocket:
        sock.setblocking(False)
        enable_timestamps(sock)
        endpoint = RtpSocket(sock, port, registration)
        self._selector.register(sock, selectors.EVENT_READ, endpoint)
        return endpoint

    def _detach(self, endpoint: RtpSocket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(endpoint.sock)
        endpoint.sock.close()

    async def allocate(self, registration: Registration) -> int:
        """Open a free port of the pool for this registration. Raises NoFreePort."""
        if self.pool_range is None:
            raise NoFreePort("no rtp_port_range is configured")
        size = len(self.pool_range)
        for _ in range(size):
            port = self.pool_range[self._next_pool_index % size]
            self._next_pool_index += 1
            if port in self.pool_sockets:
                continue
            try:
                sock, _ = open_udp_socket(self.config.host, port, self.config.rtp_recv_buffer)
            except OSError:
                continue  # taken by someone else
            self.pool_sockets[port] = self._attach(sock, port, registration)
            registration.port = port
            return port
        raise NoFreePort(f"all {size} ports of rtp_port_range are in use")

    def register_source(self, registration: Registration) -> None:
        """Name the stream from `registration.source` on the shared port (now, or when it comes)."""
        assert registration.source is not None
        self.by_source[registration.source] = registration
        if self.shared is not None:
            stream = next(
                (
                    s
                    for s in self.shared.streams.values()
                    if (s.addr[0], s.addr[1]) == registration.source
                ),
                None,
            )  # IPv6 addresses are 4-tuples: match on (host, port)
            if stream is not None:
                registration.stream = stream
                stream.registration = registration
                self.rename(stream, registration.tap_id, registration.extra)

    def release(self, registration: Registration) -> None:
        if registration.port is not None:
            sock = self.pool_sockets.pop(registration.port, None)
            if sock is not None:
                self._detach(sock)
        if (
            registration.source is not None
            and self.by_source.get(registration.source) is registration
        ):
            del self.by_source[registration.source]

    # -- the hot path -------------------------------------------------------------------------

    def _receive_tick(self) -> None:
        try:
            self.receive()
        except Exception:
            self.counters["internal_errors"] += 1
            if self.counters["internal_errors"] <= 10:  # runs every 5 ms: never a flood
                log.exception("error receiving RTP")
        self._pump = asyncio.get_running_loop().call_later(RECEIVE_INTERVAL, self._receive_tick)

    def receive(self) -> bool:
        """Drain every readable socket (up to MAX_BATCHES batches each). False if one may still
        hold datagrams (it gave MAX_BATCHES full batches): the receiver is behind."""
        if self._closed:
            return True
        read = self.reader.read
        drained = True
        for key, _ in self._selector.select(0):
            endpoint: RtpSocket = key.data
            for _ in range(MAX_BATCHES):
                try:
                    batch = read(endpoint.sock)
                except OSError as exc:
                    self.counters["socket_errors"] += 1
                    log.debug("UDP socket error on port %d: %s", endpoint.port, exc)
                    break
                if batch is None:
                    break
                self.handle_batch(endpoint, batch)
                if batch.count < BATCH:
                    break
            else:
                drained = False
        self.counters["truncated"] = self.reader.truncated
        return drained

    def handle_batch(self, sock: RtpSocket, batch: Batch) -> None:
        """The fast lane takes what it can; the rest goes through `handle`, in arrival order."""
        self.counters["datagrams"] += batch.count
        done = self.lane.process(batch)
        self.counters["fast_lane_packets"] += int(done.sum())
        streams = sock.streams
        arrivals = batch.arrivals.tolist()
        lane_keys = batch.lane_keys.tolist()
        for i in np.flatnonzero(~done).tolist():
            key = batch.key(i)
            try:
                self.handle(batch.data(i), key, sock, arrivals[i], streams.get(key), lane_keys[i])
            except Exception:
                self._internal_error(key)

    def _internal_error(self, key: Hashable) -> None:
        counters = self.counters
        counters["internal_errors"] += 1
        if counters["internal_errors"] <= 10:
            log.exception("error handling a datagram from %s", self.reader.address(key))

    def handle(
        self,
        data: bytes,
        key: Hashable,
        sock: RtpSocket,
        now: float,
        stream: RtpStream | None,
        lane_key: int = 0,
    ) -> None:
        """One datagram, any kind (RTCP, malformed, the first of a stream, ...)."""
        counters = self.counters
        if is_rtcp(data):
            counters["rtcp"] += 1
            if stream is not None:
                stream.tap.count("rtcp_packets")
            return
        try:
            packet = RtpPacket.parse(data)
        except RtpParseError as exc:
            counters["malformed"] += 1
            counters["malformed_" + exc.reason] = counters.get("malformed_" + exc.reason, 0) + 1
            if stream is not None:
                stream.tap.count("malformed")
                stream.tap.count("malformed_" + exc.reason)
            return
        if stream is None:
            stream = self._new_stream(sock, key, packet, now, lane_key)
            if stream is None:
                return
        if stream.slot >= 0:
            self.lane.disarm(stream.slot)  # the timeline's own fields are current again
        stream.last_arrival = now
        timeline = stream.timeline
        timeline.push(packet, now)
        if not timeline.waiting:
            self._arm(stream)
        elif not stream.queued:
            self._queue(stream)

    def _queue(self, stream: RtpStream) -> None:
        """Poll the stream when its oldest held packet has waited the jitter window. (A later
        hold is due later, so the entry can only be early, never late.)"""
        stream.queued = True
        heapq.heappush(self._due, (stream.timeline.due, next(self._tiebreak), stream))

    def _arm(self, stream: RtpStream) -> None:
        """Let the fast lane take the stream's next in-order packets, if it can."""
        if stream.slot >= 0 and not stream.muted:
            buffer = stream.tap.buffer
            assert isinstance(buffer, AudioBuffer)
            self.lane.arm(stream.slot, stream.timeline, buffer.append)

    def _sync(self, stream: RtpStream) -> None:
        """Bring the timeline's fields up to date before reading them."""
        if stream.slot >= 0:
            self.lane.sync(stream.slot)
            seen = self.lane.last_seen(stream.slot)
            if seen is not None and seen > stream.last_arrival:
                stream.last_arrival = seen

    def _new_stream(
        self, sock: RtpSocket, key: Hashable, packet: RtpPacket, now: float, lane_key: int
    ) -> RtpStream | None:
        addr = self.reader.address(key)
        source = (addr[0], addr[1])
        if self.stream_count >= self.max_streams:
            self._refuse(source, "capacity", f"{self.max_streams} streams is the limit")
            return None
        if not self.allowed.allows(source[0]):
            self._refuse(source, "not_allowed", "the address is not in rtp_allow")
            return None
        if self.low_disk:
            self._refuse(source, "low_disk", "the disk is below min_free_space")
            return None
        if not self.rate_limiter.allow(source[0], now):
            self._refuse(source, "rate_limit", "new_tap_rate_limit for this address")
            return None
        registration = sock.registration or (
            self.by_source.get(source) if sock is self.shared else None
        )
        if registration is not None and registration.stream is not None:
            registration = None  # a second sender to a pool port: recorded, but not by name
        tap_id = registration.tap_id if registration else file_safe_id(f"rtp-{addr[0]}-{addr[1]}")
        codec = AUDIO_CODECS.get(
            packet.payload_type, registration.codec if registration else "PCMU"
        )
        tap = Tap(tap_id, "rtp", codec, remote=f"{addr[0]}:{addr[1]}")
        tap.extra["local_port"] = sock.port
        if registration is not None:
            tap.extra.update(registration.extra)
        timeline = self._timeline(_TapOutput(tap))
        stream = RtpStream(sock, key, addr, tap, timeline, now, registration)
        if registration is not None:
            registration.stream = stream
        sock.streams[key] = stream
        if lane_key:
            stream.lane_key, stream.slot = lane_key, self.lane.add(lane_key)
        self.stream_count += 1
        self.registry.start(tap)
        return stream

    def _refuse(self, source: tuple[str, int], reason: str, why: str) -> None:
        """Count a packet from a source that may not start a stream; log once per source."""
        counters = self.counters
        counters["packets_refused"] += 1
        if source in self._refused:
            return
        if len(self._refused) >= _REFUSED_MEMORY:
            self._refused.clear()
        self._refused.add(source)
        counters["streams_refused"] += 1
        counters["refused_" + reason] = counters.get("refused_" + reason, 0) + 1
        # A flood must not become a flood of log lines: one line per reason per interval.
        suppressed, last = self._refusal_log.get(reason, (0, float("-inf")))
        now = time.monotonic()
        if now - last < REFUSAL_LOG_INTERVAL:
            self._refusal_log[reason] = (suppressed + 1, last)
            return
        self._refusal_log[reason] = (0, now)
        more = f" (and {suppressed} more sources since the last such line)" if suppressed else ""
        log.warning("refused RTP stream from %s:%d: %s%s", source[0], source[1], why, more)

    def _timeline(self, output: _TapOutput | _Discard) -> RtpTimeline:
        return RtpTimeline(
            output,
            clock_rate=8000,
            jitter_window=self.config.rtp_jitter_ms / 1000,
            max_gap=self.config.rtp_max_gap,
            dtmf_payload_type=self.config.rtp_dtmf_payload_type,
        )

    # -- naming and ending --------------------------------------------------------------------

    def rename(self, stream: RtpStream, tap_id: str, extra: dict[str, Any]) -> None:
        stream.tap.extra.update(extra)
        if stream.tap.tap_id != tap_id:
            self.registry.rename(stream.tap, tap_id)

    def end_stream(self, stream: RtpStream, reason: str) -> None:
        if stream.socket.streams.pop(stream.key, None) is None:
            return
        self.stream_count -= 1
        if stream.slot >= 0:
            self.lane.disarm(stream.slot)
            self.lane.remove(stream.lane_key, stream.slot)
            stream.slot = -1
        self._finalize(stream, reason)
        if stream.registration is not None:
            self.release(stream.registration)

    def _finalize(self, stream: RtpStream, reason: str) -> None:
        """Flush the stream's timeline into its tap and end the tap (once)."""
        if stream.muted:
            return
        try:
            stream.timeline.flush()
        except Exception:
            self.counters["internal_errors"] += 1
            log.exception("tap %s: error flushing its timeline", stream.tap.tap_id)
        stats = stream.stats()
        for key in _TOTALS:
            self.totals[key] += int(stats.get(key, 0))
        stream.tap.extra["rtp"] = stats
        self.registry.finish(stream.tap, reason)

    def stop_recording(self, tap: Tap, reason: str) -> bool:
        """End the tap but keep the stream: its further packets are dropped until it goes idle
        (so the sender does not start a new recording)."""
        stream = self.stream_of(tap)
        if stream is None:
            return False
        if stream.slot >= 0:
            self.lane.disarm(stream.slot)
        self._finalize(stream, reason)
        stream.muted = True
        stream.timeline = self._timeline(_DISCARD)
        return True

    def streams(self) -> Iterator[RtpStream]:
        sockets = [self.shared, *self.pool_sockets.values()]
        for sock in sockets:
            if sock is not None:
                yield from list(sock.streams.values())

    def stream_of(self, tap: Tap) -> RtpStream | None:
        for stream in self.streams():
            if stream.tap is tap:
                return stream
        return None

    def live_stats(self, tap: Tap) -> dict[str, Any] | None:
        stream = self.stream_of(tap)
        if stream is None:
            return None
        self._sync(stream)
        return stream.stats()

    def poll(self, now: float) -> None:
        """Release packets whose gap has waited out the jitter window: only the streams that
        are due are touched, however many are waiting."""
        due, ready = self._due, []
        while due and due[0][0] <= now:
            ready.append(heapq.heappop(due)[2])
        for stream in ready:
            stream.queued = False
            if stream.socket.streams.get(stream.key) is not stream:
                continue  # ended meanwhile
            timeline = stream.timeline
            timeline.poll(now)
            if timeline.waiting:
                self._queue(stream)
            else:
                self._arm(stream)

    def end_idle(self, now: float) -> None:
        # Arrival times are the kernel's: after a stall (the process stopped, a long pause of
        # the loop), a stream's next packets may still sit in the socket buffer while its last
        # handled one looks old. Read what is queued first, and end nothing while behind, so a
        # stall of ours never splits a call into two recordings.
        if self.receive():
            self._end_idle_streams(now)
        expiry = self.config.rtp_registration_timeout
        registrations = [s.registration for s in self.pool_sockets.values() if s.registration]
        registrations += list(self.by_source.values())
        for registration in registrations:
            if registration.stream is None and now - registration.created > expiry:
                self.counters["registrations_expired"] += 1
                log.warning(
                    "registration of tap %s expired: no RTP within %.0f s",
                    registration.tap_id,
                    expiry,
                )
                self.release(registration)

    def _end_idle_streams(self, now: float) -> None:
        limit = self.config.rtp_idle_timeout
        lane_seen = self.lane.last_seen_all()  # the fast lane's streams' last packets
        for stream in [
            s
            for s in self.streams()
            if now - max(s.last_arrival, lane_seen[s.slot] if s.slot >= 0 else 0.0) > limit
        ]:
            self.end_stream(stream, "idle timeout")

    async def run_housekeeping(self) -> None:
        next_idle_check = 0.0
        while True:
            await asyncio.sleep(POLL_INTERVAL)
            now = time.monotonic()
            try:
                if self._due:
                    self.poll(now)
                if now >= next_idle_check:
                    next_idle_check = now + IDLE_CHECK_INTERVAL
                    self.end_idle(now)
            except Exception:
                self.counters["internal_errors"] += 1
                log.exception("RTP housekeeping error")

    def end_all(self, reason: str) -> None:
        for stream in list(self.streams()):
            self.end_stream(stream, reason)

    def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            self._pump = None
        if self.shared is not None:
            self._detach(self.shared)
        for sock in list(self.pool_sockets.values()):
            self._detach(sock)
        self.pool_sockets.clear()
        self._selector.close()
        self._closed = True

    def packet_totals(self) -> dict[str, int]:
        """For metrics: ended streams' totals plus the live ones."""
        totals = dict(self.totals)
        for stream in self.streams():
            self._sync(stream)
            stats = stream.timeline.stats
            for key in _TOTALS:
                totals[key] += int(getattr(stats, key, 0))
        totals["malformed"] = self.counters["malformed"]
        totals["rtcp"] = self.counters["rtcp"]
        totals["datagrams"] = self.counters["datagrams"]
        return totals

    def stats(self) -> dict[str, Any]:
        return {
            "active_streams": self.stream_count,
            "pool_ports_in_use": len(self.pool_sockets),
            "registrations_by_source": len(self.by_source),
            **self.counters,
        }
