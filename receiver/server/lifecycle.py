"""Lifecycle: start the listeners, serve until SIGTERM/SIGINT, then finalize every tap."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import ssl
import sys
import time
from typing import Any

from aiohttp import web

from receiver.config import Config
from receiver.control.api import ControlApi
from receiver.control.webhooks import WebhookSender
from receiver.http.app import build_app
from receiver.http.auth import Auth
from receiver.http.metrics import Metrics
from receiver.inspect.api import RecordingsApi
from receiver.rtp.receiver import RtpReceiver
from receiver.server.loop import loop_name
from receiver.storage.writer import DiskWriter
from receiver.taps.admission import AddressFilter, free_bytes, raise_open_file_limit
from receiver.taps.registry import TapRegistry
from receiver.ws.endpoint import WsTapEndpoint

log = logging.getLogger("receiver.server")
GUARD_INTERVAL = 1.0  # seconds between free-space and duration checks
TRY_AGAIN_LATER = 1013  # WebSocket close code


class StartupError(Exception):
    """A listener could not be opened; the message is one line for the operator."""

    @classmethod
    def listening(cls, host: str, port: int, kind: str, exc: OSError) -> StartupError:
        """`kind` "udp" (the rtp_port) or "tcp" (the http_port)."""
        setting = "rtp_port" if kind == "udp" else "http_port"
        return cls(f"cannot listen on {host}:{port}/{kind} ({setting}): {exc.strerror or exc}")


def tls_context(config: Config) -> ssl.SSLContext | None:
    """Server-side TLS from tls_cert/tls_key, or None. Raises StartupError on a bad pair."""
    if not config.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key or None)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(
            f"tls_cert/tls_key: cannot load the certificate {config.tls_cert!r} with the key "
            f"{config.tls_key!r}: {exc}"
        ) from None
    return context


class Server:
    def __init__(
        self,
        config: Config,
        token: str | None,
        ssl_context: ssl.SSLContext | None = None,
        worker: int | None = None,
        inherited: tuple[socket.socket, socket.socket] | None = None,
    ) -> None:
        self.config = config
        self.worker = worker  # index under --workers N (in sidecars and /healthz), else None
        self.inherited = inherited  # (UDP, TCP) sockets bound by the --workers parent
        self.auth = Auth(token)
        self.writer = DiskWriter()
        self.writer.worker = worker
        self.registry = TapRegistry(config.recordings, self.writer, config.flush_interval)
        self.ws = WsTapEndpoint(config, self.auth, self.registry)
        self.rtp = RtpReceiver(config, self.registry)
        self.recordings_api = RecordingsApi(
            config.recordings, self.auth, self.registry, self.rtp.live_stats
        )
        self.webhooks: WebhookSender | None = None
        self.metrics = Metrics(self.metrics_snapshot, self.auth)
        self.writer.observe_batch = self.metrics.write_batch_seconds.observe
        self.http_port = config.http_port
        self.rtp_port = config.rtp_port
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.low_disk = False
        self.open_file_limit = 0
        self.writer_stuck = False  # shutdown gave up on the disk writer
        self.ssl_context = ssl_context

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context is not None else "http"

    def metrics_snapshot(self) -> dict[str, Any]:
        counts = self.registry.counts
        transports = ("websocket", "rtp")
        ws = self.ws.counters
        return {
            "active_taps": {t: self.registry.active_by_transport()[t] for t in transports},
            "taps_started": {t: counts["started"][t] for t in transports},
            "taps_finished": {t: counts["finished"][t] for t in transports},
            "taps_failed": {t: counts["failed"][t] for t in transports},
            "rtp_packets": self.rtp.packet_totals(),
            "rtp_streams_refused": self.rtp.counters["streams_refused"],
            "ws_messages": self.ws.messages,
            "ws_rejected": {
                k.removeprefix("rejected_"): v for k, v in ws.items() if k.startswith("rejected_")
            },
            "bytes_written": self.writer.bytes_written,
            "write_errors": self.writer.errors,
            "webhooks": dict(self.webhooks.counters) if self.webhooks else {},
        }

    def health(self) -> dict[str, Any]:
        return {
            **({"worker": self.worker} if self.worker is not None else {}),
            "http_port": self.http_port,
            "rtp_port": self.rtp_port,
            "active_taps": len(self.registry),
            "taps_started": self.registry.started,
            "auth": self.auth.enabled,
            "low_disk": self.low_disk,
            "limits": {
                "ws_max_taps": self.ws.max_taps,
                "rtp_max_streams": self.rtp.max_streams,
                "open_files": self.open_file_limit,
                "min_free_space": self.config.min_free_space,
            },
            "websocket": self.ws.stats(),
            "rtp": self.rtp.stats(),
            "webhooks": dict(self.webhooks.counters) if self.webhooks else None,
            "writer": {
                "batches": self.writer.batches,
                "bytes_written": self.writer.bytes_written,
                "errors": self.writer.errors,
            },
        }

    async def startup(self) -> None:
        cfg = self.config
        budget = raise_open_file_limit(cfg.ws_max_taps, cfg.rtp_max_streams)
        self.ws.max_taps, self.rtp.max_streams = budget.ws_taps, budget.rtp_streams
        self.open_file_limit = budget.limit
        log.info(
            "open-file limit %d: room for %d WebSocket taps and %d RTP streams",
            budget.limit,
            budget.ws_taps,
            budget.rtp_streams,
        )
        await self.check_disk()
        # UDP first: once /healthz answers, both listeners are up.
        try:
            self.rtp_port, granted = await self.rtp.open_shared(
                cfg.host, cfg.rtp_port, self.inherited[0] if self.inherited else None
            )
        except OSError as exc:
            raise StartupError.listening(cfg.host, cfg.rtp_port, "udp", exc) from None
        log.info(
            "RTP on %s:%d/udp, SO_RCVBUF requested %d, kernel granted %d%s",
            cfg.host,
            self.rtp_port,
            cfg.rtp_recv_buffer,
            granted,
            f"; per-tap ports {cfg.rtp_port_range}" if cfg.rtp_port_range else "",
        )
        kept = granted // 2 if sys.platform == "linux" else granted  # Linux reports double
        if kept < cfg.rtp_recv_buffer:
            log.warning(
                "RTP socket buffer is %d bytes, not the %d of rtp_recv_buffer: the kernel caps it "
                "at net.core.rmem_max (raise it: sysctl -w net.core.rmem_max=%d), and a stall of "
                "the receiver then loses packets sooner",
                kept, cfg.rtp_recv_buffer, cfg.rtp_recv_buffer,
            )  # fmt: skip
        if cfg.webhook_url:
            self.webhooks = WebhookSender(cfg.webhook_url, cfg.webhook_secret)
            self.registry.on_finalized = self.webhooks.submit
        control = ControlApi(cfg, self.auth, self.registry, self.rtp, self.ws, self.rtp_port)
        app = build_app(
            self.ws,
            self.health,
            self.recordings_api,
            control,
            self.metrics,
            allowed=AddressFilter(cfg.http_allow),
        )
        # keepalive_timeout also bounds how long a new connection may take to send its request
        # (aiohttp arms it on connect): slow or half-open upgrades are closed.
        self._runner = web.AppRunner(
            app,
            access_log=None,
            shutdown_timeout=cfg.shutdown_timeout,
            keepalive_timeout=cfg.http_request_timeout,
        )
        await self._runner.setup()
        site: web.BaseSite
        if self.inherited is not None:
            site = web.SockSite(self._runner, self.inherited[1], ssl_context=self.ssl_context)
        else:
            site = web.TCPSite(self._runner, cfg.host, cfg.http_port, ssl_context=self.ssl_context)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError.listening(cfg.host, cfg.http_port, "tcp", exc) from None
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.http_port = sockets[0].getsockname()[1]
        self._tasks = [
            asyncio.create_task(self.registry.run_flusher(), name="flusher"),
            asyncio.create_task(self.rtp.run_housekeeping(), name="rtp-housekeeping"),
            asyncio.create_task(self.metrics.watch_loop_lag(), name="loop-lag"),
            asyncio.create_task(self.run_guards(), name="guards"),
        ]
        # What exists now (modules, the app and its routes) lives as long as the process: keep
        # it out of every later full garbage collection, whose pause grows with what it scans.
        gc.collect()
        gc.freeze()
        log.info(
            "tap-receiver ready on %s://%s:%d (%s), recordings in %s",
            self.scheme,
            cfg.host,
            self.http_port,
            loop_name(),
            cfg.recordings.resolve(),
        )

    async def run_guards(self) -> None:
        """The longest allowed recording, every flush_interval (that is its precision); the
        free-space floor, once a second."""
        interval = min(GUARD_INTERVAL, self.config.flush_interval)
        next_disk_check = 0.0
        while True:
            await asyncio.sleep(interval)
            try:
                self.check_durations()
                if time.monotonic() >= next_disk_check:
                    next_disk_check = time.monotonic() + GUARD_INTERVAL
                    await self.check_disk()
            except Exception:
                log.exception("guard check failed")

    async def check_disk(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            free = await loop.run_in_executor(None, free_bytes, self.config.recordings)
        except OSError as exc:
            log.error("cannot read the free space of %s: %s", self.config.recordings, exc)
            return
        low = free < self.config.min_free_space
        if low == self.low_disk:
            return
        self.low_disk = self.ws.low_disk = self.rtp.low_disk = low
        if not low:
            log.warning("free space is back above min_free_space (%d bytes free): taps accepted",
                        free)  # fmt: skip
            return
        log.error(
            "only %d bytes free in %s (min_free_space %d): refusing new taps, finalizing %d open",
            free,
            self.config.recordings,
            self.config.min_free_space,
            len(self.registry),
        )
        self.rtp.end_all("low disk space")
        await self.ws.close_all(TRY_AGAIN_LATER, "recordings disk is full", "low disk space")

    def check_durations(self) -> None:
        limit = self.config.max_tap_duration
        if not limit:
            return
        self.registry.gather()  # every buffer complete: its length, and a split's cut
        for tap in [t for t in self.registry.active if t.segment_seconds >= limit]:
            if self.config.max_tap_duration_action == "split":
                self.registry.split(tap)
            elif tap.transport == "rtp":
                self.rtp.stop_recording(tap, "max_tap_duration")
            else:
                self.ws.close_tap(tap, "max_tap_duration")
                tap.extra["close_code"] = 1000
                self.registry.finish(tap, "max_tap_duration")

    async def shutdown(self) -> None:
        started = time.monotonic()
        log.info("shutting down: finalizing %d open taps", len(self.registry))
        self.rtp.receive()  # what arrived before the signal (sockets are read every 5 ms)
        self.rtp.close()
        self.rtp.end_all("shutdown")
        # Closing the sockets makes each handler finish its own tap.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close_all(), timeout=self.config.shutdown_timeout / 2)
        for task in self._tasks:
            task.cancel()
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._runner.cleanup(), timeout=1.0)
        self.ws.end_sessions("shutdown")  # handlers that did not get to it: flush their timelines
        self.registry.finish_all("shutdown")
        remaining = max(0.5, self.config.shutdown_timeout - (time.monotonic() - started))
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(None, self.writer.shutdown), remaining)
        except TimeoutError:
            log.error("disk writer still busy after %.1f s; exiting anyway", remaining)
            self.writer_stuck = True
        if self.webhooks is not None:  # the last finalized taps' notifications get what is left
            await asyncio.sleep(0)  # let the writer's last completions reach the loop
            remaining = max(0.2, self.config.shutdown_timeout - (time.monotonic() - started))
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
