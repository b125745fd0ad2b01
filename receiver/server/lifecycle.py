"""Lifecycle: start the listeners, serve until SIGTERM/SIGINT, then finalize every tap."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from receiver.archive.listing import ArchiveListing
from receiver.archive.process import ArchiverProcess
from receiver.archive.reader import ArchiveReader
from receiver.calls.assembler import CallAssembler
from receiver.config import Config
from receiver.control.api import ControlApi
from receiver.control.webhooks import WebhookSender
from receiver.fleet import Fleet, instance_id, storage_id
from receiver.http.app import build_app
from receiver.http.auth import Auth
from receiver.http.metrics import Metrics
from receiver.http.public_urls import ConnectInfo, PublicUrls
from receiver.inspect.api import RecordingsApi
from receiver.live.hub import LiveHub
from receiver.live.nats_publisher import NatsLive
from receiver.memory import collect_less
from receiver.rtp.receiver import RtpReceiver
from receiver.server.load import LoadMeter
from receiver.server.loop import loop_name
from receiver.storage.disk_space import free_bytes, unwritable_reason
from receiver.storage.recovery import recover
from receiver.storage.writer_process import WriterProcess
from receiver.taps.admission import Admission
from receiver.taps.naming import Naming
from receiver.taps.registry import TapRegistry
from receiver.taps.tap import Tap
from receiver.taps.transport import Transport
from receiver.ws.endpoint import WsTapEndpoint

log = logging.getLogger("receiver.server")
GUARD_INTERVAL = 1.0  # seconds between free-space and duration checks
TRY_AGAIN_LATER = 1013  # WebSocket close codes
GOING_AWAY = 1001
INTERNAL_ERROR = 1011  # the server cannot record the tap


class StartupError(Exception):
    """A listener could not be opened; the message is one line for the operator."""

    @classmethod
    def listening(cls, host: str, port: int, kind: str, exc: OSError) -> StartupError:
        """`kind` "udp" (the rtp_port) or "tcp" (the http_port)."""
        setting = "rtp_port" if kind == "udp" else "http_port"
        return cls(f"cannot listen on {host}:{port}/{kind} ({setting}): {exc.strerror or exc}")


def tls_context(config: Config) -> ssl.SSLContext | None:
    """Server-side TLS from tls_cert/tls_key, or None. Raises StartupError on a bad pair."""
    cert, key = config.server.tls_cert, config.server.tls_key
    if not cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key or None)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(
            f"tls_cert/tls_key: cannot load the certificate {cert!r} with the key {key!r}: {exc}"
        ) from None
    return context


class Server:
    """Owns the lifecycle: builds the parts, starts the listeners, runs the guards, and shuts
    down by asking each transport to end its own taps."""

    def __init__(
        self,
        config: Config,
        token: str | None,
        ssl_context: ssl.SSLContext | None = None,
        worker: int | None = None,
        inherited: tuple[socket.socket, socket.socket] | None = None,
        recover_interrupted: bool = True,
    ) -> None:
        self.config = config
        self.started_at = time.time()  # recovery leaves newer files alone
        self.recover_interrupted = recover_interrupted  # under --workers: worker 0 does it
        self.recovery: dict[str, Any] = {"state": "running" if recover_interrupted else "off"}
        self.worker = worker  # index under --workers N (in sidecars and /healthz), else None
        self.inherited = inherited  # (UDP, TCP) sockets bound by the --workers parent
        self.ssl_context = ssl_context
        self.token = token
        self.on_ready: Callable[[], None] | None = None  # once it listens (the start-up banner)
        storage = config.storage
        self.auth = Auth(token)
        self.admission = Admission(config.limits)
        self.naming = Naming()
        self.writer = WriterProcess(config.log.level, config.log.format)
        self.writer.worker = worker
        self.registry = TapRegistry(
            storage.recordings,
            self.writer,
            storage.flush_interval,
            storage.max_unwritten_seconds,
            storage.max_unwritten_bytes,
        )
        self.ws = WsTapEndpoint(config.ws, self.auth, self.admission, self.naming, self.registry)
        self.rtp = RtpReceiver(
            config.rtp,
            config.server.host,
            self.admission,
            self.naming,
            self.registry,
            storage.flush_interval,
        )
        self.transports: dict[str, Transport] = {t.name: t for t in (self.ws, self.rtp)}
        self.load = LoadMeter(
            config.limits.max_load,
            packets=lambda: self.rtp.counters["datagrams"],
            streams=lambda: self.rtp.stream_count,
        )
        self.admission.overload += [self.load.check, self.rtp.overloaded, self._writer_behind]
        self.registry.audio_holders = [t.gather for t in self.transports.values()]
        self.registry.on_open_failed = self.refuse_unrecordable
        self.live = LiveHub(config.live, self.registry.gather)
        self.calls = CallAssembler(storage.recordings, self.writer, self.archive, self.finalized)
        self.recordings_api = RecordingsApi(
            storage.recordings,
            self.auth,
            self.registry,
            {name: t.live_stats for name, t in self.transports.items()},
            self.live,
            config.ws.heartbeat,
        )
        self.recordings_api.held = self.calls.holds
        self.webhooks: WebhookSender | None = None
        archive = config.archive
        if archive.enabled:
            reader = ArchiveReader(archive)
            self.recordings_api.archive = reader
            self.recordings_api.archived = ArchiveListing(reader)
        self.archiver: ArchiverProcess | None = None
        if archive.enabled or archive.retention_max_age or archive.retention_max_bytes:
            self.archiver = ArchiverProcess(
                archive,
                storage.recordings,
                primary=recover_interrupted,
                log_level=config.log.level,
                log_format=config.log.format,
                worker=worker,
            )
        self.control: ControlApi | None = None  # built once the RTP port is known
        self.fleet: Fleet | None = None  # with nats_url, once it listens (receiver.fleet)
        # Several processes answer /metrics on one port under --workers: each says which.
        labels = {"worker": str(worker)} if worker is not None else {}
        self.metrics = Metrics(self.metrics_snapshot, self.auth, labels)
        self.writer.observe_batch = self.metrics.write_batch_seconds.observe
        self.http_port = config.server.http_port
        self.rtp_port = config.server.rtp_port
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.writer_stuck = False  # shutdown gave up on the disk writer
        self._probe: asyncio.Task[None] | None = None  # a writability check out of turn

    def _writer_behind(self, transport: str) -> str | None:
        """An admission check: new taps wait while the disk writer is far behind."""
        opening = self.writer.opening_seconds
        if opening > self.config.limits.max_opening_seconds:
            return f"{self.writer.opening} new taps wait for their files (~{opening:.1f} s)"
        if self.writer.unwritten_bytes > self.config.storage.max_unwritten_bytes:
            return "the disk writer is behind (max_unwritten_bytes)"
        return None

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context is not None else "http"

    def metrics_snapshot(self) -> dict[str, Any]:
        counts = self.registry.counts
        active = self.registry.active_by_transport()
        snapshot: dict[str, Any] = {
            "active_taps": {t: active[t] for t in self.transports},
            "taps_started": {t: counts["started"][t] for t in self.transports},
            "taps_finished": {t: counts["finished"][t] for t in self.transports},
            "taps_failed": {t: counts["failed"][t] for t in self.transports},
            "bytes_written": self.writer.bytes_written,
            "write_errors": self.writer.errors,
            "webhooks": dict(self.webhooks.counters) if self.webhooks else {},
            "live": self.live.stats(),
            "calls": self.calls.stats(),
            "archive": self.archiver.status if self.archiver else None,
        }
        for transport in self.transports.values():
            snapshot.update(transport.metrics())
        if self.fleet is not None:
            snapshot.update(self.fleet.metrics())
        return snapshot

    def health(self) -> dict[str, Any]:
        return {
            **({"worker": self.worker} if self.worker is not None else {}),
            "http_port": self.http_port,
            "rtp_port": self.rtp_port,
            "active_taps": len(self.registry),
            "taps_started": self.registry.started,
            "auth": self.auth.enabled,
            "low_disk": self.admission.low_disk,
            "recordings": {
                "writable": self.admission.unwritable is None,
                "problem": self.admission.unwritable,
                "taps_refused_without_files": sum(self.registry.open_failures.values()),
                "sidecars_pending": self.writer.sidecars_pending,
            },
            "limits": self.admission.describe(self.config.storage.min_free_space),
            **{name: t.stats() for name, t in self.transports.items()},
            "names": self.naming.stats(),
            "live": self.live.stats(),
            "calls": self.calls.stats(),
            "recovery": self.recovery,
            "webhooks": dict(self.webhooks.counters) if self.webhooks else None,
            "archive": (
                {**self.archiver.status, "restarts": self.archiver.restarts}
                if self.archiver
                else None
            ),
            "fleet": self.fleet.health() if self.fleet is not None else None,
            "writer": {
                "batches": self.writer.batches,
                "bytes_written": self.writer.bytes_written,
                "errors": self.writer.errors,
                "taps_waiting_for_files": self.writer.opening,
                "unwritten_bytes": self.writer.unwritten_bytes,
                "flushes_deferred": self.registry.flushes_deferred,
                "restarts": self.writer.restarts,
            },
            "load": {
                "event_loop": round(self.load.load, 3),
                "peak": round(self.load.peak, 3),
                "predicted": round(self.load.predicted(0), 3),
                "us_per_packet": round(self.load.cost_per_packet * 1e6, 2),
            },
            "dropped_frames": dict(self.registry.dropped_frames()),
            "refused": {f"{t}_{r}": n for (t, r), n in sorted(self.admission.refused.items())},
        }

    async def startup(self) -> None:
        cfg = self.config
        host = cfg.server.host
        await self.writer.start()
        budget = self.admission.fit_open_file_limit()
        log.info(
            "open-file limit %d: room for %d WebSocket taps and %d RTP streams",
            budget.limit,
            budget.ws_taps,
            budget.rtp_streams,
        )
        await self.check_disk()
        await self.check_writable()
        # UDP first: once /healthz answers, both listeners are up.
        try:
            self.rtp_port, granted = await self.rtp.open_shared(
                cfg.server.rtp_port, self.inherited[0] if self.inherited else None
            )
        except OSError as exc:
            raise StartupError.listening(host, cfg.server.rtp_port, "udp", exc) from None
        asked = cfg.rtp.recv_buffer
        pool = cfg.settings["rtp_port_range"]
        log.info(
            "RTP on %s:%d/udp, SO_RCVBUF requested %d, kernel granted %d%s",
            host,
            self.rtp_port,
            asked,
            granted,
            f"; per-tap ports {pool}" if pool else "",
        )
        kept = granted // 2 if sys.platform == "linux" else granted  # Linux reports double
        if kept < asked:
            log.warning(
                "RTP socket buffer is %d bytes, not the %d of rtp_recv_buffer: the kernel caps it "
                "at net.core.rmem_max (raise it: sysctl -w net.core.rmem_max=%d), and a stall of "
                "the receiver then loses packets sooner",
                kept, asked, asked,
            )  # fmt: skip
        if cfg.webhooks.url:
            self.webhooks = WebhookSender(cfg.webhooks.url, cfg.webhooks.secret)
        if self.archiver is not None:
            await self.archiver.start()
        self.registry.on_finalized = self.tap_finalized
        control = self.control = ControlApi(
            cfg, self.auth, self.naming, self.registry, self.transports, self.rtp, self.rtp_port
        )
        urls = PublicUrls.from_settings(cfg.server, self.token, cfg.server.http_port, self.rtp_port)
        app = build_app(
            self.health,
            self.ws,
            self.recordings_api,
            control,
            self.metrics,
            ConnectInfo(urls, self.auth),
            allowed=self.admission.http_clients,
        )
        # keepalive_timeout also bounds how long a new connection may take to send its request
        # (aiohttp arms it on connect): slow or half-open upgrades are closed.
        self._runner = web.AppRunner(
            app,
            access_log=None,
            shutdown_timeout=cfg.server.shutdown_timeout,
            keepalive_timeout=cfg.server.http_request_timeout,
        )
        await self._runner.setup()
        site: web.BaseSite
        if self.inherited is not None:
            site = web.SockSite(self._runner, self.inherited[1], ssl_context=self.ssl_context)
        else:
            site = web.TCPSite(
                self._runner, host, cfg.server.http_port, ssl_context=self.ssl_context
            )
        try:
            await site.start()
        except OSError as exc:
            raise StartupError.listening(host, cfg.server.http_port, "tcp", exc) from None
        self.http_port = _bound_port(self._runner, self.http_port)
        if cfg.fleet.nats_servers:
            await self.join_fleet()
        self._tasks = [
            asyncio.create_task(self.registry.run_flusher(), name="flusher"),
            asyncio.create_task(self.live.run(), name="live"),
            asyncio.create_task(self.metrics.watch_loop_lag(), name="loop-lag"),
            asyncio.create_task(self.load.run(), name="load-meter"),
            asyncio.create_task(self.run_guards(), name="guards"),
        ]
        if self.recover_interrupted:
            self._tasks.append(asyncio.create_task(self.recover(), name="recovery"))
        collect_less()  # what exists now lives as long as the process (receiver.memory)
        log.info(
            "tap-receiver ready on %s://%s:%d (%s), recordings in %s",
            self.scheme,
            host,
            self.http_port,
            loop_name(),
            cfg.storage.recordings.resolve(),
        )
        if self.on_ready is not None:
            self.on_ready()

    def tap_finalized(self, tap: Tap, sidecar: dict[str, Any]) -> None:
        """A tap's files are complete: notify the webhook; the archiver takes the recording
        now, or, for a call's leg, once its call no longer needs the leg's WAV."""
        if self.webhooks is not None:
            self.webhooks.submit(sidecar)
        if not self.calls.leg_finalized(tap, sidecar):
            self.archive(sidecar)

    def finalized(self, sidecar: dict[str, Any]) -> None:
        """A recording made of other ones (a call's file) is complete: as `tap_finalized`."""
        if self.webhooks is not None:
            self.webhooks.submit(sidecar)
        self.archive(sidecar)

    def archive(self, sidecar: dict[str, Any]) -> None:
        if self.archiver is not None:
            self.archiver.submit(sidecar)

    async def join_fleet(self) -> None:
        """With nats_url: list the fleet's taps and pass on what no tap here matches. It
        connects in the background; recording never waits for NATS."""
        from receiver.fleet.nats_fleet import NatsFleet  # only a fleet imports the client

        name = instance_id(self.config.fleet.instance_name, self.http_port, self.worker)
        storage = storage_id(self.config.storage.recordings)
        fleet = NatsFleet(list(self.config.fleet.nats_servers), name, storage, self.answer_fleet)
        self.fleet = self.recordings_api.fleet = fleet
        if self.config.live.nats:  # every recording tap's audio on NATS too
            self.live.nats = NatsLive(fleet, self.config.live.queue_seconds)
            self.registry.on_started = self.live.tap_started
        assert self.control is not None
        self.control.fleet = fleet
        await fleet.start()

    def answer_fleet(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        """Another instance's question (receiver.fleet.nats_fleet): our live taps, or a status
        callback or source registration for a tap that may be ours."""
        assert self.control is not None
        if kind == "taps":
            return {"taps": self.recordings_api.live_summaries()}
        if kind == "status":
            return self.control.answer_status(body)
        if kind == "source":
            return self.control.answer_source(body)
        return {"error": f"unknown question {kind!r}"}

    async def recover(self) -> None:
        """Finalize what an earlier process left recording, in the background (see recovery)."""
        loop = asyncio.get_running_loop()
        recordings = self.config.storage.recordings
        try:
            done = await loop.run_in_executor(None, recover, recordings, self.started_at)
        except Exception as exc:
            log.exception("recovery of interrupted recordings failed")
            self.recovery = {"state": "failed", "error": f"{type(exc).__name__}: {exc}"}
            return
        finally:
            if self.archiver is not None and self.config.archive.enabled:
                self.archiver.scan()  # what earlier processes left unarchived
        self.recovery = {"state": "done", "recovered": len(done)}
        if done:
            log.info("recovery finished: %d interrupted recordings finalized", len(done))

    async def run_guards(self) -> None:
        """The longest allowed recording, every flush_interval (that is its precision); the
        free-space floor, names and call legs that waited in vain, once a second."""
        interval = min(GUARD_INTERVAL, self.config.storage.flush_interval)
        next_check = 0.0
        while True:
            await asyncio.sleep(interval)
            try:
                self.check_durations()
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + GUARD_INTERVAL
                    self.expire_names()
                    self.calls.expire()  # legs whose partner never came
                    await self.check_disk()
                    await self.check_writable()
            except Exception:
                log.exception("guard check failed")

    def expire_names(self) -> None:
        for name in self.naming.expire():
            log.warning("the name %s expired: no tap started under it in time", name.tap_id)

    async def check_disk(self) -> None:
        storage = self.config.storage
        loop = asyncio.get_running_loop()
        try:
            free = await loop.run_in_executor(None, free_bytes, storage.recordings)
        except OSError as exc:
            log.error("cannot read the free space of %s: %s", storage.recordings, exc)
            return
        low = free < storage.min_free_space
        if low == self.admission.low_disk:
            return
        self.admission.low_disk = low
        if not low:
            log.warning("free space is back above min_free_space (%d bytes free): taps accepted",
                        free)  # fmt: skip
            return
        log.error(
            "only %d bytes free in %s (min_free_space %d): refusing new taps, finalizing %d open",
            free,
            storage.recordings,
            storage.min_free_space,
            len(self.registry),
        )
        for transport in self.transports.values():
            await transport.end_all(
                "low disk space", TRY_AGAIN_LATER, "recordings disk is full", GUARD_INTERVAL
            )

    async def check_writable(self) -> None:
        """Can a file be created in the recordings directory? While not, new taps are refused
        (503 before the upgrade); once it can again, final sidecars that could not be written
        meanwhile are written."""
        recordings = self.config.storage.recordings
        loop = asyncio.get_running_loop()
        problem = await loop.run_in_executor(None, unwritable_reason, recordings)
        was, self.admission.unwritable = self.admission.unwritable, problem
        if problem is not None and was is None:
            log.error("the recordings directory %s is not writable (%s): refusing new taps until "
                      "it is", recordings, problem)  # fmt: skip
        elif problem is None and was is not None:
            log.warning("the recordings directory %s is writable again: taps accepted", recordings)
        if problem is None and self.writer.sidecars_pending:
            self.writer.retry_sidecars()

    def refuse_unrecordable(self, tap: Tap, why: str) -> None:
        """A tap whose files could not be created after it was accepted: its transport ends it
        (a WebSocket closed with 1011 and the reason; an RTP stream's further packets dropped
        until it goes idle), and the directory is probed now rather than within a second."""
        reason = f"cannot create the recording's files: {why}"
        self.transports[tap.transport].stop_tap(
            tap, reason, drop_rest=True, close_code=INTERNAL_ERROR
        )
        if self._probe is None or self._probe.done():  # a burst of failures: one probe
            self._probe = asyncio.create_task(self.check_writable())

    def check_durations(self) -> None:
        limit = self.config.storage.max_tap_duration
        if not limit:
            return
        self.registry.gather()  # every buffer complete: its length, and a split's cut
        split = self.config.storage.max_tap_duration_action == "split"
        for tap in [t for t in self.registry.active if t.segment_seconds >= limit]:
            if split:
                self.registry.split(tap)
            else:
                self.transports[tap.transport].stop_tap(tap, "max_tap_duration", drop_rest=True)

    async def shutdown(self) -> None:
        started = time.monotonic()
        timeout = self.config.server.shutdown_timeout
        log.info("shutting down: finalizing %d open taps", len(self.registry))
        for transport in self.transports.values():
            transport.stop_receiving()
        # Each transport ends its own taps (WebSocket handlers flush their sessions).
        with contextlib.suppress(Exception):
            await asyncio.gather(
                *(
                    t.end_all("shutdown", GOING_AWAY, "server shutting down", timeout / 2)
                    for t in self.transports.values()
                )
            )
        if self.live.nats is not None:  # the taps' last audio and end messages go out first
            self.registry.on_started = None
            await self.live.nats.stop()
        if self.fleet is not None:  # the others forget this one now, not at its next silence
            await self.fleet.stop(min(1.0, timeout / 4))
        for task in self._tasks:
            task.cancel()
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._runner.cleanup(), timeout=1.0)
        self.registry.finish_all("shutdown")
        # Calls whose legs ended just now are built before the writer stops (half of what is
        # left of shutdown_timeout at most: the writer's own deadline comes first).
        until = time.monotonic() + max(0.0, timeout - (time.monotonic() - started)) / 2
        await self.registry.wait_finalized(until - time.monotonic())
        await self.calls.wait_built(until - time.monotonic())
        remaining = max(0.5, timeout - (time.monotonic() - started))
        # The writer keeps to the deadline itself (what is left stays valid on disk).
        await self.writer.stop(remaining)
        self.writer_stuck = self.writer.stuck
        self.rtp.release()
        if self.archiver is not None:
            await asyncio.sleep(0)  # the writer's last completions reach the archiver first
            await self.archiver.stop(max(0.2, min(1.0, timeout - (time.monotonic() - started))))
        if self.webhooks is not None:  # the last finalized taps' notifications get what is left
            await asyncio.sleep(0)  # let the writer's last completions reach the loop
            remaining = max(0.2, timeout - (time.monotonic() - started))
            await self.webhooks.close(remaining)
        log.info("stopped after %.2f s", time.monotonic() - started)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await self.startup()
        except BaseException:
            await self.shutdown()
            raise
        await stop.wait()
        await self.shutdown()
        return 1 if self.writer_stuck else 0


def _bound_port(runner: web.AppRunner, configured: int) -> int:
    """The TCP port the HTTP listener got (the configured one, unless that was 0)."""
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return configured
