"""The WebSocket endpoint for every call-audio dialect: `GET /tap/{tap_id}` and
`/stream/{tap_id}` (also under `/t/{token}/`).

Checks the tap id, the token and the codec before the upgrade; then the dialect is chosen from
the offered subprotocol and the first frame (`receiver.ws.dialects`), and the session records it.
The tap ends when the socket closes, cleanly or not.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from receiver.codecs.formats import AudioFormat, FormatError, codec_from_query
from receiver.config import Config
from receiver.http.auth import Auth
from receiver.taps.admission import RateLimiter
from receiver.taps.registry import TapRegistry
from receiver.taps.tap import Tap
from receiver.taps.tap_id import TAP_ID_RULE, is_valid_tap_id
from receiver.ws.dialects import FORK_SUBPROTOCOLS, Session, SessionContext, choose_session

log = logging.getLogger("receiver.ws")

UNSUPPORTED_DATA = 1003
CLOSE_HANDSHAKE_TIMEOUT = 1.0  # seconds to wait for the peer's reply to our close frame


def json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message, "status": status}, status=status)


class WsTapEndpoint:
    def __init__(self, config: Config, auth: Auth, registry: TapRegistry) -> None:
        self.config = config
        self.auth = auth
        self.registry = registry
        self.sockets: set[web.WebSocketResponse] = set()
        self.sessions: dict[web.WebSocketResponse, Session] = {}
        self._close_reasons: dict[web.WebSocketResponse, tuple[str, int]] = {}
        self.max_taps = config.ws_max_taps  # lowered to fit the open-file limit at start
        self.low_disk = False  # set by the server while the free-space floor is crossed
        self.rate_limiter = RateLimiter(config.new_tap_rate_limit)
        self.messages = 0
        self._closing: dict[web.WebSocketResponse, asyncio.Task[bool]] = {}
        self.counters: dict[str, int] = {}

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    async def handle(self, request: web.Request) -> web.StreamResponse:
        tap_id = request.match_info.get("tap_id", "")
        if not is_valid_tap_id(tap_id):
            self._count("rejected_bad_tap_id")
            log.warning("refused tap from %s: bad tap id %r", request.remote, tap_id[:200])
            return json_error(400, TAP_ID_RULE)
        if not self.auth.allows(request):
            self._count("rejected_unauthorized")
            log.warning("refused tap %s from %s: missing or wrong token", tap_id, request.remote)
            return json_error(401, "missing or wrong token")
        try:
            fmt = codec_from_query(request.query.get("codec"))
        except FormatError as exc:
            self._count("rejected_bad_codec")
            return json_error(400, str(exc))
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        ws = web.WebSocketResponse(
            # aiohttp refuses a message of exactly max_msg_size; the setting is the largest accepted
            max_msg_size=self.config.ws_max_message_size + 1,
            heartbeat=self.config.ws_heartbeat or None,
            timeout=CLOSE_HANDSHAKE_TIMEOUT,
            protocols=FORK_SUBPROTOCOLS,  # echoed only when the client offers one
        )
        if not ws.can_prepare(request).ok:
            return json_error(426, "expected a WebSocket upgrade request")
        await ws.prepare(request)
        self.sockets.add(ws)
        try:
            await self._record(ws, tap_id, fmt, request.remote)
        finally:
            self.sockets.discard(ws)
            self._close_reasons.pop(ws, None)
            closing = self._closing.pop(ws, None)
            if closing is not None:
                await asyncio.wait([closing])
        return ws

    def _refusal(self, request: web.Request) -> web.Response | None:
        """Capacity, disk and rate limits, checked before the upgrade so nothing is created."""
        if len(self.sockets) >= self.max_taps:
            self._count("rejected_capacity")
            log.warning("refused tap from %s: %d WebSocket taps is the limit", request.remote,
                        self.max_taps)  # fmt: skip
            return json_error(503, f"too many taps ({self.max_taps}); try again later")
        if self.low_disk:
            self._count("rejected_low_disk")
            return json_error(503, "the recordings disk is below min_free_space; try again later")
        if not self.rate_limiter.allow(request.remote or ""):
            self._count("rejected_rate_limit")
            return json_error(429, "too many new taps from this address (new_tap_rate_limit)")
        return None

    async def _record(
        self, ws: web.WebSocketResponse, tap_id: str, fmt: AudioFormat, remote: str | None
    ) -> None:
        ctx = SessionContext(tap_id, remote, self.registry, self.config, ws.ws_protocol)
        session: Session | None = None
        reason = "closed"
        close_code: int | None = None  # what we closed with, when it was us
        try:
            async for msg in ws:
                self.messages += 1
                if msg.type == WSMsgType.BINARY:
                    if session is None:
                        session = self.sessions[ws] = choose_session(ctx, None, fmt)
                    try:
                        session.binary(msg.data)
                    except Exception:
                        self._internal_error(session)
                elif msg.type == WSMsgType.TEXT:
                    if session is None:
                        session = self.sessions[ws] = choose_session(ctx, msg.data, fmt)
                    try:
                        session.text(msg.data)
                    except FormatError as exc:
                        self._count("rejected_bad_format")
                        log.warning("tap %s: %s; closing with 1003", tap_id, exc)
                        reason = f"unsupported format: {exc}"
                        close_code = UNSUPPORTED_DATA
                        await ws.close(code=UNSUPPORTED_DATA, message=str(exc)[:120].encode())
                        break
                    except Exception:
                        self._internal_error(session)
                elif msg.type == WSMsgType.ERROR:
                    error = ws.exception()
                    reason = f"error: {error}"
                    too_big = getattr(error, "code", None) == WSCloseCode.MESSAGE_TOO_BIG
                    if too_big or ws.close_code == WSCloseCode.MESSAGE_TOO_BIG:
                        reason = "message too big"
                        close_code = WSCloseCode.MESSAGE_TOO_BIG
                        self._count("closed_message_too_big")
                        log.warning(
                            "tap %s: message over %d bytes; closed with 1009, audio kept",
                            tap_id,
                            self.config.ws_max_message_size,
                        )
                    if session is not None:
                        session.count("errors")
                    break
        except Exception as exc:
            reason = f"connection error: {type(exc).__name__}"
            log.info("tap %s: %s", tap_id, reason)
        finally:
            self.sessions.pop(ws, None)
            if reason == "closed" and ws in self._close_reasons:  # we closed it, and said why
                reason, close_code = self._close_reasons.pop(ws)
            if session is None:
                session = choose_session(ctx, None, fmt)  # nothing came: an empty recording
            if session.tap is not None or close_code != UNSUPPORTED_DATA:
                self._end(session, reason, close_code or ws.close_code)

    def _internal_error(self, session: Session) -> None:
        """A bug met by one frame: count it, log the traceback once per tap, keep recording."""
        self._count("internal_errors")
        session.count("internal_errors")
        if "internal_error" not in session.warned:
            session.warned.add("internal_error")
            log.exception("tap %s: internal error on a frame; the tap goes on",
                          session.ctx.tap_id)  # fmt: skip

    def _end(self, session: Session, reason: str, close_code: int | None) -> None:
        try:
            tap = session.end()
        except Exception:
            log.exception("tap %s: error while ending the session", session.ctx.tap_id)
            if session.tap is None:
                return
            tap = session.tap
            tap.count("errors")
        if close_code is not None:
            tap.extra["close_code"] = int(close_code)
        self.registry.finish(tap, reason)

    def close_tap(self, tap: Tap, message: str) -> bool:
        """Close the connection that feeds `tap` (e.g. SignalWire said the tap finished). The
        close handshake runs in the background: nobody waits on the peer."""
        for ws, session in list(self.sessions.items()):
            if session.tap is tap:
                self._start_close(ws, WSCloseCode.OK, message, message)
                return True
        return False

    def end_sessions(self, reason: str) -> None:
        """Shutdown: finish the taps whose handlers have not ended them yet (their timelines
        are flushed into the tap first)."""
        for session in list(self.sessions.values()):
            if session.tap is not None:
                self._end(session, reason, None)

    def _start_close(self, ws: web.WebSocketResponse, code: int, message: str, reason: str) -> None:
        # The handler waits for this task before it returns (see `handle`): returning while
        # the close handshake is under way would drop the connection before the peer answers.
        if ws not in self._closing:
            self._close_reasons[ws] = (reason, code)
            close = ws.close(code=code, message=message.encode()[:120])
            self._closing[ws] = asyncio.create_task(close)

    async def close_all(
        self,
        code: int = WSCloseCode.GOING_AWAY,
        message: str = "server shutting down",
        reason: str = "shutdown",
    ) -> None:
        """Send every peer a close frame at once; each handler then finishes its own tap."""
        for ws in list(self.sockets):
            self._start_close(ws, code, message, reason)
        if self._closing:
            await asyncio.wait(list(self._closing.values()))

    def stats(self) -> dict[str, Any]:
        return {"open_sockets": len(self.sockets), **self.counters}
