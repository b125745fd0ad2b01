"""The RTP transport: datagrams -> one stream, one timeline and one tap per source (ip, port), on
the shared `rtp_port` and on per-tap ports from `rtp_port_range`.

Datagrams are read in batches (`receiver.rtp.datagrams`: recvmmsg on Linux) every RECEIVE_INTERVAL
from whichever sockets are readable, instead of one event-loop callback per datagram; every
SHORT_INTERVAL while a socket's buffer holds less than CALM_MARGIN times what a drain every
RECEIVE_INTERVAL would find in it (`_judge_crowding`). While one batch takes longer than
SHORT_INTERVAL (a burst of new streams), what waits in the sockets is read ahead into the
process's memory (`receiver.rtp.backlog`), so the kernel's capped buffer does not overflow.
In-order audio of known IPv4 streams is applied to their timelines a batch at a time
(`receiver.rtp.fast_lane`); every other datagram goes through `handle`, which never raises: it
looks the stream up by source and pushes the packet into it (`receiver.rtp.stream`). After each
drain, packets held for reordering are released and idle streams ended.

A new source becomes a stream if admission allows it (receiver.taps.admission), under the name
the control plane expects for it (receiver.taps.naming: a registered pool port or source), else
`rtp-<ip>-<port>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import selectors
import socket
import time
from collections.abc import Collection, Hashable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from receiver.codecs.encoding import Encoding
from receiver.codecs.formats import default_rate
from receiver.config import RtpSettings
from receiver.rtp.backlog import Backlog
from receiver.rtp.datagrams import BATCH, Batch, enable_timestamps, open_reader
from receiver.rtp.fast_lane import FastLane, store_bytes_for
from receiver.rtp.packet import (
    AUDIO_CODECS,
    RtpPacket,
    RtpParseError,
    is_rtcp,
    rtp_clock_rate,
)
from receiver.rtp.refused import RefusedSources
from receiver.rtp.sockets import open_udp_socket
from receiver.rtp.stream import Discard, RtpSocket, RtpStream, TapOutput
from receiver.rtp.timeline import RtpTimeline
from receiver.taps.admission import Admission
from receiver.taps.naming import Naming, rtp_port_key, rtp_source_key
from receiver.taps.registry import TapRegistry
from receiver.taps.tap import Tap
from receiver.taps.tap_id import file_safe_id

log = logging.getLogger("receiver.rtp")

# How often readable sockets are drained. Each wake-up of the loop costs CPU whatever it reads:
# on this project's 2-core VMs, 20 ms between drains instead of 5 ms took ~20 % less CPU in the
# server process at 1 000 streams (~14 % with the disk writer; both versions run side by side on
# one core, 2026-12-05), and an idle server 1.1 % of a core instead of 2.9 %. The short interval
# keeps a socket whose buffer is small for its traffic (the kernel caps it at net.core.rmem_max
# without CAP_NET_ADMIN) from overflowing in between.
RECEIVE_INTERVAL = 0.02
SHORT_INTERVAL = 0.005
CALM_MARGIN = 4  # a socket's buffer holds this many drains' worth, or the next drain comes sooner
DATAGRAM_TRUESIZE = 1024  # bytes of socket buffer per queued datagram (832 for 172-byte G.711)
BEHIND = 0.25  # seconds a datagram may wait in the kernel...
BEHIND_FOR = 1.0  # ... for this long before new streams are refused (a GC pause is not overload)
MAX_BATCHES = 16  # per socket per drain, so one flooded socket cannot hold the loop for long
READ_AHEAD_AFTER = SHORT_INTERVAL  # seconds into a batch after which waiting datagrams are read
IDLE_CHECK_INTERVAL = 0.25
AHEAD_SLACK = 0.5  # seconds an RTP tap's audio may lead the wall clock beyond the jitter window
REFUSAL_LOG_INTERVAL = 10.0  # seconds between log lines about refused sources, per reason
_TOTALS = ("received", "lost", "late", "duplicate", "reordered")


def stream_codecs(
    known: dict[int, Encoding], payload_type: int, registered: Encoding | None
) -> tuple[Encoding, dict[int, Encoding]]:
    """The codec of a stream whose first packet has `payload_type`, and its audio payload
    types. The codec: the type's (static, or configured by `rtp_payload_types`); for another
    dynamic type, the codec its tap was registered with; else the registered codec or PCMU (its
    packets are then counted as of an unknown type). The types: every known one of the codec's
    RTP clock and audio rate (one WAV has one rate)."""
    codec = known.get(payload_type)
    if codec is None and registered is not None and 96 <= payload_type <= 127:
        known = {**known, payload_type: registered}
        codec = registered
    if codec is None:
        codec = registered or Encoding.PCMU
    rate, clock = default_rate(codec), rtp_clock_rate(codec)
    same = {
        pt: c for pt, c in known.items() if default_rate(c) == rate and rtp_clock_rate(c) == clock
    }
    return codec, same


class NoFreePort(Exception):
    """Every port of rtp_port_range is in use (or no range is configured)."""


class RtpReceiver:
    """The RTP transport (see receiver.taps.transport)."""

    name = "rtp"

    def __init__(
        self,
        settings: RtpSettings,
        host: str,
        admission: Admission,
        naming: Naming,
        registry: TapRegistry,
        flush_interval: float = 1.0,
    ) -> None:
        self.settings = settings
        # Audio payload types: the static ones and those `rtp_payload_types` maps
        self.payload_codecs: dict[int, Encoding] = {
            **AUDIO_CODECS,
            **{pt: Encoding(name.upper()) for pt, name in settings.payload_types.items()},
        }
        self.host = host
        self.admission = admission
        self.naming = naming
        self.registry = registry
        self.shared: RtpSocket | None = None
        self._by_tap: dict[int, RtpStream] = {}  # by tap serial: each tap's stream
        self.pool_sockets: dict[int, RtpSocket] = {}  # port -> socket, reserved ports only
        self.stream_count = 0
        # Streams holding packets behind a gap, by when the oldest is due: (due, tiebreak, stream)
        self._due: list[tuple[float, int, RtpStream]] = []
        self._tiebreak = itertools.count()
        self.refused = RefusedSources()  # refused until they go idle (see refused.py)
        self.behind = False  # datagrams have waited in the kernel longer than BEHIND for BEHIND_FOR
        self._behind_since: float | None = None
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
            "truncated": 0,  # datagrams longer than datagrams.MAX_DATAGRAM, dropped
            "fast_lane_packets": 0,  # applied by the vectorised path (fast_lane.py)
            "read_ahead": 0,  # datagrams read ahead while a batch took long (backlog.py)
            "read_ahead_full": 0,  # read-aheads cut short by the limit (rtp_recv_buffer)
        }
        self.totals: dict[str, int] = dict.fromkeys(_TOTALS, 0)  # of ended streams
        self.reader = open_reader()
        # As much again as the socket buffer asked for, in the process's memory (backlog.py)
        self.backlog = Backlog(settings.recv_buffer)
        self.lane = FastLane(store_bytes=store_bytes_for(flush_interval))
        self._selector = selectors.DefaultSelector()
        self._closed = False  # shutdown: sockets read for the last time, or closed
        self._pump: asyncio.Handle | None = None
        self._crowded = False  # a socket's traffic is more than its calm_reads per drain
        self._window_start = 0.0  # datagrams found per socket since then (`_judge_crowding`)
        self._window: dict[RtpSocket, int] = {}
        self.read_until = 0.0  # every datagram that reached the sockets before it is handled
        self._next_idle_check = 0.0

    # -- sockets ------------------------------------------------------------------------------

    async def open_shared(
        self, port: int, inherited: socket.socket | None = None
    ) -> tuple[int, int]:
        """Bind the shared port, or use the socket a `--workers` parent bound; returns (port,
        SO_RCVBUF granted). Raises OSError."""
        if inherited is not None:
            sock = inherited
            granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        else:
            sock, granted = open_udp_socket(self.host, port, self.settings.recv_buffer)
        bound = int(sock.getsockname()[1])
        self.shared = self._attach(sock, bound, granted, pool=False)
        if self._pump is None:
            self._pump = asyncio.get_running_loop().call_soon(self._receive_tick)
        return bound, granted

    def _attach(self, sock: socket.socket, port: int, granted: int, pool: bool) -> RtpSocket:
        sock.setblocking(False)
        enable_timestamps(sock)
        endpoint = RtpSocket(sock, port, pool, granted // (DATAGRAM_TRUESIZE * CALM_MARGIN))
        self._selector.register(sock, selectors.EVENT_READ, endpoint)
        return endpoint

    def _detach(self, endpoint: RtpSocket) -> None:
        self.backlog.discard(endpoint)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(endpoint.sock)
        endpoint.sock.close()

    def reserve_port(self) -> int:
        """Open a free port of the pool for one tap (its first stream is that tap). Raises
        NoFreePort."""
        pool_range = self.settings.port_range
        if pool_range is None:
            raise NoFreePort("no rtp_port_range is configured")
        size = len(pool_range)
        for _ in range(size):
            port = pool_range[self._next_pool_index % size]
            self._next_pool_index += 1
            if port in self.pool_sockets:
                continue
            try:
                sock, granted = open_udp_socket(self.host, port, self.settings.recv_buffer)
            except OSError:
                continue  # taken by someone else
            self.pool_sockets[port] = self._attach(sock, port, granted, pool=True)
            return port
        raise NoFreePort(f"all {size} ports of rtp_port_range are in use")

    def release_port(self, port: int) -> None:
        """Close a pool port (its name expired unused, or its tap ended); streams still on it
        end."""
        endpoint = self.pool_sockets.pop(port, None)
        if endpoint is None:
            return
        for stream in list(endpoint.streams.values()):
            self._end_stream(stream, "its port was released")
        self._detach(endpoint)

    # -- the hot path -------------------------------------------------------------------------

    def _receive_tick(self) -> None:
        """Read the sockets; then, if they are drained, release what the jitter window gave up
        on and end idle streams (in the same wake-up of the loop: each costs CPU)."""
        drained = True
        try:
            drained = self.receive()
            if drained:
                self.housekeeping()
        except Exception:
            self.counters["internal_errors"] += 1
            if self.counters["internal_errors"] <= 10:  # runs every tick: never a flood
                log.exception("error receiving RTP")
        # Behind: again once the loop's other callbacks have run, not after a pause
        interval = 0 if not drained else SHORT_INTERVAL if self._crowded else RECEIVE_INTERVAL
        self._pump = asyncio.get_running_loop().call_later(interval, self._receive_tick)

    def housekeeping(self) -> None:
        """After a drain: every datagram that reached the sockets before `read_until` is handled,
        so a gap is given up on by that clock (a packet that came in time and waited in the
        kernel still fills it), and a stream is idle by it."""
        if self._due:
            self.poll(self.read_until)
        if self.read_until >= self._next_idle_check:
            self._next_idle_check = self.read_until + IDLE_CHECK_INTERVAL
            self.end_idle(self.read_until)

    def receive(self) -> bool:
        """Drain every readable socket (up to MAX_BATCHES batches each), what was read ahead of
        it first. False if one may still hold datagrams (it gave MAX_BATCHES full batches, or
        some were read ahead and not handled yet): the receiver is behind."""
        if self._closed:
            return True
        read = self.reader.read
        drained = True
        started = time.monotonic()  # what had arrived by now is read, if the sockets drain
        oldest = float("inf")  # the arrival of the oldest datagram read now
        ready: list[RtpSocket] = [key.data for key, _ in self._selector.select(0)]
        ready += [e for e in self.backlog.sockets if e not in ready]
        for endpoint in ready:
            found = 0
            for n in range(MAX_BATCHES):
                batch = self.backlog.take(endpoint)
                ahead = batch is not None
                if batch is None:
                    try:
                        batch = read(endpoint.sock)
                    except OSError as exc:
                        self._socket_error(exc, f"on port {endpoint.port}")
                        break
                    if batch is None:
                        break
                if n == 0:
                    oldest = min(oldest, float(batch.arrivals[0]))
                found += batch.count
                self.handle_batch(endpoint, batch)
                if not ahead and batch.count < BATCH:
                    break
            else:
                drained = False
            if found:
                self._window[endpoint] = self._window.get(endpoint, 0) + found
        self._judge_crowding(started)
        counters = self.counters
        counters["truncated"] = self.reader.truncated + self.backlog.reader.truncated
        counters["read_ahead"] = self.backlog.datagrams
        counters["read_ahead_full"] = self.backlog.full
        if self.backlog:
            drained = False
        # Behind: datagrams keep waiting in the kernel longer than BEHIND (the receiver cannot keep
        # up with what it has admitted), or a socket holds more than MAX_BATCHES batches.
        now = time.monotonic()
        if not drained or now - oldest > BEHIND:
            if self._behind_since is None:
                self._behind_since = now
            self.behind = now - self._behind_since >= BEHIND_FOR
        else:
            self._behind_since = None
            self.behind = False
        if drained:
            self.read_until = started
        return drained

    def _judge_crowding(self, now: float) -> None:
        """Every SHORT_INTERVAL at most: is a socket's traffic, as a drain every
        RECEIVE_INTERVAL would find it, more than its calm_reads? Judged on what the drains
        found over that time, not on the last one: a drain 5 ms (or, when behind, 0 ms) after
        the one before finds a fraction, which must not make the next wait the long one."""
        elapsed = now - self._window_start
        if elapsed < SHORT_INTERVAL:
            return
        per_drain = RECEIVE_INTERVAL / elapsed
        self._crowded = any(n * per_drain > e.calm_reads for e, n in self._window.items())
        self._window.clear()
        self._window_start = now

    def _socket_error(self, exc: OSError, where: str) -> None:
        self.counters["socket_errors"] += 1
        log.debug("UDP socket error %s: %s", where, exc)

    def _read_ahead(self) -> None:
        """A batch is taking long: take what waits in the sockets out of the kernel's buffer."""
        if self._closed:
            return
        try:
            self.backlog.fill(key.data for key, _ in self._selector.select(0))
        except OSError as exc:
            self._socket_error(exc, "reading ahead")

    def handle_batch(self, sock: RtpSocket, batch: Batch) -> None:
        """The fast lane takes what it can; the rest goes through `handle`, in arrival order
        (reading ahead whenever that has taken READ_AHEAD_AFTER)."""
        self.counters["datagrams"] += batch.count
        done = self.lane.process(batch)
        self.counters["fast_lane_packets"] += int(done.sum())
        self.counters["packets_refused"] += self.refused.drop(batch, done)
        rest = np.flatnonzero(~done)
        if not rest.size:
            return
        streams = sock.streams
        arrivals, lane_keys = batch.arrivals[rest].tolist(), batch.lane_keys[rest].tolist()
        clock = time.monotonic
        read_ahead_at = clock() + READ_AHEAD_AFTER
        for i, arrival, lane_key in zip(rest.tolist(), arrivals, lane_keys, strict=True):
            key = batch.key(i)
            try:
                self.handle(batch.data(i), key, sock, arrival, streams.get(key), lane_key)
            except Exception:
                self._internal_error(key)
            if clock() >= read_ahead_at:
                self._read_ahead()
                read_ahead_at = clock() + READ_AHEAD_AFTER

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
            if self.refused.seen(key, lane_key, now):
                counters["packets_refused"] += 1
                return
            stream = self._new_stream(sock, key, packet, now, lane_key)
            if stream is None:
                return
        if stream.push(packet, now) and not stream.queued:
            self._queue(stream)

    def _queue(self, stream: RtpStream) -> None:
        """Poll the stream when its oldest held packet has waited the jitter window. (A later
        hold is due later, so the entry can only be early, never late.)"""
        stream.queued = True
        heapq.heappush(self._due, (stream.timeline.due, next(self._tiebreak), stream))

    def _new_stream(
        self, sock: RtpSocket, key: Hashable, packet: RtpPacket, now: float, lane_key: int
    ) -> RtpStream | None:
        addr = self.reader.address(key)
        source = (addr[0], addr[1])
        refusal = self.admission.refusal(self.name, source[0], self.stream_count, now)
        if refusal is not None:
            self.refused.add(key, lane_key, now)
            self._refuse(source, refusal.reason, refusal.message)
            return None
        # A pool port's first stream is the tap the port was reserved for; a second sender to
        # it is recorded too, but known by its source.
        owns_port = sock.pool and sock.owner is None
        name_key = rtp_port_key(sock.port) if owns_port else rtp_source_key(*source)
        expected = self.naming.claim(name_key) if owns_port or not sock.pool else None
        tap_id = expected.tap_id if expected else file_safe_id(f"rtp-{addr[0]}-{addr[1]}")
        codec, codecs = stream_codecs(
            self.payload_codecs, packet.payload_type, expected.codec if expected else None
        )
        allowance = self.settings.jitter_window + AHEAD_SLACK
        tap = Tap(tap_id, "rtp", codec, default_rate(codec), remote=f"{addr[0]}:{addr[1]}",
                  key=name_key, ahead_allowance=allowance)  # fmt: skip
        tap.extra["local_port"] = sock.port
        tap.extra["audio_payload_types"] = {str(pt): c.value for pt, c in codecs.items()}
        tap.first_audio_monotonic = now
        if expected is not None:
            tap.extra.update(expected.extra)
        timeline = self._timeline(TapOutput(tap, rtp_clock_rate(codec)), codecs, codec)
        stream = RtpStream(sock, key, addr, tap, timeline, now, self.lane, lane_key)
        if owns_port:
            sock.owner = stream
        sock.streams[key] = stream
        self._by_tap[tap.serial] = stream
        self.stream_count += 1
        self.registry.start(tap)
        return stream

    def _refuse(self, source: tuple[str, int], reason: str, why: str) -> None:
        """Count a source that may not start a stream (it stays refused until it goes idle)."""
        counters = self.counters
        counters["packets_refused"] += 1
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

    def _timeline(
        self, output: TapOutput | Discard, codecs: dict[int, Encoding], codec: Encoding
    ) -> RtpTimeline:
        return RtpTimeline(
            output,
            clock_rate=rtp_clock_rate(codec),
            jitter_window=self.settings.jitter_window,
            max_gap=self.settings.max_gap,
            dtmf_payload_type=self.settings.dtmf_payload_type,
            audio_codecs=codecs,
        )

    # -- ending -------------------------------------------------------------------------------

    def _end_stream(self, stream: RtpStream, reason: str) -> None:
        sock = stream.socket
        if sock.streams.pop(stream.key, None) is None:
            return
        self._by_tap.pop(stream.tap.serial, None)
        self.stream_count -= 1
        if stream.muted:
            stream.leave_lane()
        else:
            self._finalize(stream, reason)
        if sock.owner is stream:
            self.release_port(sock.port)

    def _finalize(self, stream: RtpStream, reason: str) -> None:
        """Flush the stream's timeline into its tap and end the tap."""
        stream.sync()  # its last packet's arrival, the fast lane's included
        try:
            stream.flush()
        except Exception:
            self.counters["internal_errors"] += 1
            log.exception("tap %s: error flushing its timeline", stream.tap.tap_id)
        stats = stream.stats()
        for key in _TOTALS:
            self.totals[key] += int(stats.get(key, 0))
        tap = stream.tap
        tap.extra["rtp"] = stats
        # The call ended with its last packet, not when the idle timeout noticed (`extra` is
        # the sidecar's last word, over the registry's `ended_at`).
        idle = max(0.0, time.monotonic() - stream.last_arrival)
        tap.extra["ended_at"] = _iso(datetime.now(UTC) - timedelta(seconds=idle))
        if reason == "idle timeout":
            tap.extra["idle_timeout_seconds"] = self.settings.idle_timeout
        self.registry.finish(tap, reason)

    def streams(self) -> Iterator[RtpStream]:
        sockets = [self.shared, *self.pool_sockets.values()]
        for sock in sockets:
            if sock is not None:
                yield from list(sock.streams.values())

    def stream_of(self, tap: Tap) -> RtpStream | None:
        return self._by_tap.get(tap.serial)

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
            if stream.poll(now):
                self._queue(stream)

    def end_idle(self, now: float) -> None:
        """End the streams idle for longer than the idle timeout at `now`. Arrival times are
        the kernel's: after a stall (the process stopped, a long pause of the loop), a stream's
        next packets may still sit in the socket buffer while its last handled one looks old.
        It runs only after a drain (`housekeeping`), so a stall of ours never splits a call
        into two recordings."""
        limit = self.settings.idle_timeout
        lane_seen = self.lane.last_seen_all()  # the fast lane's streams' last packets
        for stream in [s for s in self.streams() if s.idle_for(now, lane_seen) > limit]:
            self._end_stream(stream, "idle timeout")
        self.refused.expire(now - limit)

    # -- the transport interface (receiver.taps.transport) ------------------------------------

    def gather(self, taps: Collection[Tap] | None = None) -> None:
        """The fast lane's stored audio, to every tap's buffer (or only to `taps`')."""
        if taps is None:
            self.lane.drain_all()
            return
        for tap in taps:
            stream = self._by_tap.get(tap.serial)
            if stream is not None and stream.slot >= 0:
                self.lane.drain(stream.slot)

    def stop_tap(
        self, tap: Tap, reason: str, *, drop_rest: bool = False, close_code: int = 1000
    ) -> bool:
        """End the tap's stream, after reading what has arrived (sockets are read every 20 ms:
        a stop must never cut off audio already on this machine). With `drop_rest`, the stream
        stays and its further packets are dropped until it goes idle, so the sender does not
        start a new recording. RTP has no `close_code` to send."""
        self.receive()
        stream = self.stream_of(tap)
        if stream is None:
            return False
        if not drop_rest:
            self._end_stream(stream, reason)
            return True
        if not stream.muted:
            stream.leave_lane()
            self._finalize(stream, reason)
            codecs, codec = stream.timeline.audio_codecs, Encoding(stream.tap.codec)
            stream.mute(self._timeline(Discard(), codecs, codec))
        return True

    async def end_all(self, reason: str, close_code: int, message: str, timeout: float) -> None:
        for stream in list(self.streams()):
            self._end_stream(stream, reason)

    def stop_receiving(self) -> None:
        """Read what arrived before (sockets are read every 20 ms), then close every socket but
        the shared one: that one stays open, unread, until the process exits. Under --workers
        the kernel spreads sources over the workers' sockets of one port (SO_REUSEPORT), and
        closing it would move this worker's streams to the others, which record the rest of
        them as new taps if they have not yet heard of the shutdown themselves. `release`
        closes it at the very end."""
        self.receive()
        # What was read ahead is audio this machine has: all of it, reading nothing more.
        self._closed = True
        while self.backlog:
            for endpoint in self.backlog.sockets:
                batch = self.backlog.take(endpoint)
                if batch is not None:
                    self.handle_batch(endpoint, batch)
        if self._pump is not None:
            self._pump.cancel()
            self._pump = None
        if self.shared is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(self.shared.sock)
        for sock in list(self.pool_sockets.values()):
            self._detach(sock)
        self._selector.close()

    def release(self) -> None:
        """The end of shutdown: close the shared socket too (see `stop_receiving`)."""
        if self.shared is not None:
            self.shared.sock.close()

    def live_stats(self, tap: Tap) -> dict[str, Any] | None:
        stream = self.stream_of(tap)
        return stream.stats() if stream is not None else None

    def overloaded(self, transport: str) -> str | None:
        """An admission check: new RTP streams wait while datagrams wait in the kernel."""
        if transport == self.name and self.behind:
            return f"RTP datagrams wait more than {BEHIND:g} s to be read"
        return None

    def stats(self) -> dict[str, Any]:
        return {
            "active_streams": self.stream_count,
            "pool_ports_in_use": len(self.pool_sockets),
            "refused_sources": len(self.refused),
            **self.counters,
        }

    def metrics(self) -> dict[str, Any]:
        totals = dict(self.totals)  # ended streams, plus the live ones
        for stream in self.streams():
            stream.sync()
            stats = stream.timeline.stats
            for key in _TOTALS:
                totals[key] += int(getattr(stats, key, 0))
        for key in ("malformed", "rtcp", "datagrams"):
            totals[key] = self.counters[key]
        return {"rtp_packets": totals, "rtp_streams_refused": self.counters["streams_refused"]}


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
