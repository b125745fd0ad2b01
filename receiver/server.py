"""Lifecycle: start the listeners, serve until SIGTERM/SIGINT, then finalize every tap."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import time
from typing import Any

from aiohttp import web

from receiver.api import RecordingsApi
from receiver.auth import Auth
from receiver.config import Config
from receiver.http_app import build_app
from receiver.loop import loop_name
from receiver.registry import TapRegistry
from receiver.rtp.endpoint import RtpEndpoint, open_udp_socket
from receiver.tap import Tap
from receiver.writer import DiskWriter
from receiver.ws_tap import WsTapEndpoint

log = logging.getLogger("receiver.server")


class StartupError(Exception):
    """A listener could not be opened; the message is one line for the operator."""


def tls_context(config: Config) -> ssl.SSLContext | None:
    """Server-side TLS from tls_cert/tls_key, or None. Raises StartupError on a bad pair."""
    if not config.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key or None)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"tls_cert/tls_key: cannot load {config.tls_cert!r}: {exc}") from None
    return context


class Server:
    def __init__(self, config: Config, token: str | None) -> None:
        self.config = config
        self.auth = Auth(token)
        self.writer = DiskWriter()
        self.registry = TapRegistry(config.recordings, self.writer, config.flush_interval)
        self.ws = WsTapEndpoint(config, self.auth, self.registry)
        self.rtp = RtpEndpoint(config, self.registry)
        self.recordings_api = RecordingsApi(
            config.recordings, self.auth, self.registry, self.live_rtp
        )
        self.http_port = config.http_port
        self.rtp_port = config.rtp_port
        self._runner: web.AppRunner | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.ssl_context = tls_context(config)

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context is not None else "http"

    def live_rtp(self, tap: Tap) -> dict[str, Any] | None:
        """The running timeline stats of an active RTP tap (read-only), for the API."""
        host, _, port = (tap.remote or "").rpartition(":")
        stream = self.rtp.streams.get((host, int(port))) if port.isdigit() else None
        if stream is None or stream.tap is not tap:
            return None
        return {
            **stream.timeline.stats.to_dict(),
            "malformed": tap.counters.get("malformed", 0),
            "rtcp": tap.counters.get("rtcp_packets", 0),
        }

    def health(self) -> dict[str, Any]:
        return {
            "http_port": self.http_port,
            "rtp_port": self.rtp_port,
            "active_taps": len(self.registry),
            "taps_started": self.registry.started,
            "auth": self.auth.enabled,
            "websocket": self.ws.stats(),
            "rtp": self.rtp.stats(),
            "writer": {
                "batches": self.writer.batches,
                "bytes_written": self.writer.bytes_written,
                "errors": self.writer.errors,
            },
        }

    async def startup(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        # UDP first: once /healthz answers, both listeners are up.
        try:
            sock, granted = open_udp_socket(cfg.host, cfg.rtp_port, cfg.rtp_recv_buffer)
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {cfg.host}:{cfg.rtp_port}/udp (rtp_port): {exc.strerror or exc}"
            ) from None
        self.rtp_port = sock.getsockname()[1]
        transport, _ = await loop.create_datagram_endpoint(lambda: self.rtp, sock=sock)
        self._udp = transport
        log.info(
            "RTP on %s:%d/udp, SO_RCVBUF requested %d, kernel granted %d",
            cfg.host,
            self.rtp_port,
            cfg.rtp_recv_buffer,
            granted,
        )
        app = build_app(self.ws, self.health, self.recordings_api)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=cfg.shutdown_timeout)
        await self._runner.setup()
        site = web.TCPSite(self._runner, cfg.host, cfg.http_port, ssl_context=self.ssl_context)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {cfg.host}:{cfg.http_port}/tcp (http_port): "
                f"{exc.strerror or exc}"
            ) from None
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.http_port = sockets[0].getsockname()[1]
        self._tasks = [
            asyncio.create_task(self.registry.run_flusher(), name="flusher"),
            asyncio.create_task(self.rtp.run_housekeeping(), name="rtp-housekeeping"),
        ]
        log.info(
            "tap-receiver ready on %s://%s:%d (%s), recordings in %s",
            self.scheme,
            cfg.host,
            self.http_port,
            loop_name(),
            cfg.recordings.resolve(),
        )

    async def shutdown(self) -> None:
        started = time.monotonic()
        log.info("shutting down: finalizing %d open taps", len(self.registry))
        if self._udp is not None:
            self._udp.close()
        self.rtp.end_all("shutdown")
        # Closing the sockets makes each handler finish its own tap.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close_all(), timeout=self.config.shutdown_timeout / 2)
        for task in self._tasks:
            task.cancel()
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._runner.cleanup(), timeout=1.0)
        self.registry.finish_all("shutdown")
        remaining = max(0.5, self.config.shutdown_timeout - (time.monotonic() - started))
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(None, self.writer.shutdown), remaining)
        except TimeoutError:
            log.error("disk writer still busy after %.1f s; exiting anyway", remaining)
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
        return 0
