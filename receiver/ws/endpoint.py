"""The WebSocket endpoint for every call-audio dialect: `GET /tap/{tap_id}` and
`/stream/{tap_id}` (also under `/t/{token}/`).

Checks the tap id, the token, the codec and admission before the upgrade; then the dialect is
chosen from the offered subprotocol and the first frame (`receiver.ws.dialects`), and the session
records it. The tap ends when the socket closes, cleanly or not; the server ends taps through the
transport interface (receiver.taps.transport), by closing their sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from receiver.calls.legs import LEGS
from receiver.codecs.formats import AudioFormat, FormatError, codec_from_query
from receiver.config import WsSettings
from receiver.http.auth import Auth
from receiver.http.errors import json_error
from receiver.taps.admission import Admission
from receiver.taps.naming import Naming
from receiver.taps.registry import TapRegistry
from receiver.taps.tap import Tap
from receiver.taps.tap_id import TAP_ID_RULE, is_valid_tap_id
from receiver.ws.dialects import FORK_SUBPROTOCOLS, Session, SessionContext, choose_session

log = logging.getLogger("receiver.ws")

UNSUPPORTED_DATA = 1003
CLOSE_HANDSHAKE_TIMEOUT = 1.0  # seconds to wait for the peer's reply to our close frame
# A WebSocket has no clock: a tap whose audio leads the wall clock (since it began) by more than
# PACE_AHEAD seconds is not read until it leads by PACE_TARGET, so TCP flow control slows a sender
# that is faster than real time instead of memory and disk filling up.
PACE_AHEAD = 1.0
PACE_TARGET = 0.5

GOING_AWAY = 1001


class WsTapEndpoint:
    """The WebSocket transport (see receiver.taps.transport)."""

    name = "websocket"

    def __init__(
        self,
        settings: WsSettings,
        auth: Auth,
        admission: Admission,
        naming: Naming,
        registry: TapRegistry,
    ) -> None:
        self.settings = settings
        self.auth = auth
        self.admission = admission
        self.naming = naming
        self.registry = registry
        self.sockets: set[web.WebSocketResponse] = set()
        self.sessions: dict[web.WebSocketResponse, Session] = {}
        self._close_reasons: dict[web.WebSocketResponse, tuple[str, int]] = {}
        self.messages = 0
        self._closing: dict[web.WebSocketResponse, asyncio.Task[bool]] = {}
        self._ended = asyncio.Event()  # set whenever a handler has ended its session
        self.counters: dict[str, int] = {}

    def add_routes(self, app: web.Application) -> None:
        # `{tap_id:.*}` so that bad ids (empty, dots, encoded slashes) reach the handler and get
        # a clear 400 instead of a 404.
        for prefix in ("", "/t/{token}"):
            app.router.add_get(prefix + "/tap/{tap_id:.*}", self.handle)
            app.router.add_get(prefix + "/stream/{tap_id:.*}", self.handle)
            app.router.add_get(prefix + "/call/{call_id}/{leg:.*}", self.handle_leg)

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def _start(self, tap: Tap) -> None:
        """A session's tap goes live: with the name a status callback gave its URI id, if any."""
        expected = self.naming.claim(tap.key)
        if expected is not None:
            tap.extra.setdefault("provisional_id", tap.tap_id)
            tap.tap_id = expected.tap_id
            tap.extra.update(expected.extra)
        self.registry.start(tap)

    async def handle_leg(self, request: web.Request) -> web.StreamResponse:
        """`/call/{call_id}/{leg}`: a tap that is one leg (`speak` or `listen`) of a call,
        recorded as `<call_id>.<leg>` (receiver.calls puts the two legs side by side)."""
        call_id, leg = request.match_info["call_id"], request.match_info["leg"]
        if leg not in LEGS or not is_valid_tap_id(f"{call_id}.{leg}"):
            self._count("rejected_bad_call")
            log.warning("refused call leg from %s: bad call id or leg %r", request.remote,
                        f"{call_id[:100]}/{leg[:20]}")  # fmt: skip
            return json_error(400, f"/call/<call-id>/<leg>: leg is speak or listen; {TAP_ID_RULE}")
        return await self.handle(request, f"{call_id}.{leg}", {"call": {"call_id": call_id,
                                                                         "leg": leg}})  # fmt: skip

    async def handle(
        self, request: web.Request, leg_id: str | None = None, extra: dict[str, Any] | None = None
    ) -> web.StreamResponse:
        tap_id = leg_id or request.match_info.get("tap_id", "")
        if not is_valid_tap_id(tap_id):
            self._count("rejected_bad_tap_id")
            log.warning("refused tap from %s: bad tap id %r", request.remote, tap_id[:200])
            return json_error(400, TAP_ID_RULE)
        unauthorized = self.auth.refusal(request)
        if unauthorized is not None:
            self._count("rejected_unauthorized")
            log.warning("refused tap %s from %s: missing or wrong token", tap_id, request.remote)
            return unauthorized
        try:
            fmt = codec_from_query(request.query.get("codec"), request.query.get("rate"))
        except FormatError as exc:
            self._count("rejected_bad_codec")
            return json_error(400, str(exc))
        refusal = self.admission.refusal(self.name, request.remote, len(self.sockets))
        if refusal is not None:
            self._count("rejected_" + refusal.reason)
            log.warning("refused tap %s from %s: %s", tap_id, request.remote, refusal.message)
            return json_error(refusal.status, refusal.message)
        ws = web.WebSocketResponse(
            # aiohttp refuses a message of exactly max_msg_size; the setting is the largest accepted
            max_msg_size=self.settings.max_message_size + 1,
            heartbeat=self.settings.heartbeat or None,
            timeout=CLOSE_HANDSHAKE_TIMEOUT,
            protocols=FORK_SUBPROTOCOLS,  # echoed only when the client offers one
        )
        if not ws.can_prepare(request).ok:
            return json_error(426, "expected a WebSocket upgrade request")
        await ws.prepare(request)
        self.sockets.add(ws)
        try:
            await self._record(ws, tap_id, fmt, request.remote, extra)
        finally:
            self.sockets.discard(ws)
            self._close_reasons.pop(ws, None)
            closing = self._closing.pop(ws, None)
            if closing is not None:
                await asyncio.wait([closing])
        return ws

    async def _record(
        self,
        ws: web.WebSocketResponse,
        tap_id: str,
        fmt: AudioFormat,
        remote: str | None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        ctx = SessionContext(tap_id, remote, self.settings, self._start, ws.ws_protocol, extra)
        session: Session | None = None
        reason = "closed"
        close_code: int | None = None  # what we closed with, when it was us
        try:
            async for msg in ws:
                if session is not None and session.tap is not None:
                    ahead = session.tap.ahead_seconds()
                    if ahead > PACE_AHEAD:
                        self._count("paced")
                        await asyncio.sleep(ahead - PACE_TARGET)
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
                    error = msg.data if isinstance(msg.data, BaseException) else ws.exception()
                    reason = f"error: {error}"
                    # A protocol error (bad UTF-8: 1007, a bad frame or close code: 1002, too
                    # big: 1009) is answered with that code: record it, not the 1006 that
                    # the socket reports once the peer has dropped the connection.
                    sent = getattr(error, "code", None)
                    if isinstance(sent, int) and 1000 <= sent < 5000:
                        close_code = sent
                    too_big = sent == WSCloseCode.MESSAGE_TOO_BIG
                    if too_big or ws.close_code == WSCloseCode.MESSAGE_TOO_BIG:
                        reason = "message too big"
                        close_code = WSCloseCode.MESSAGE_TOO_BIG
                        self._count("closed_message_too_big")
                        log.warning(
                            "tap %s: message over %d bytes; closed with 1009, audio kept",
                            tap_id,
                            self.settings.max_message_size,
                        )
                    if session is not None:
                        session.count("errors")
                    break
        except Exception as exc:
            reason = f"connection error: {type(exc).__name__}"
            log.info("tap %s: %s", tap_id, reason)
        finally:
            self.sessions.pop(ws, None)
            self._ended.set()
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
        if session.ended:  # shutdown finished it while its handler was still closing
            return
        session.ended = True
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

    # -- the transport interface (receiver.taps.transport) ------------------------------------

    def gather(self, taps: Collection[Tap] | None = None) -> None:
        """Sessions hand their audio to the tap as it comes: nothing is held here."""

    def stop_tap(
        self, tap: Tap, reason: str, *, drop_rest: bool = False, close_code: int = 1000
    ) -> bool:
        """Close the connection that feeds `tap` with `close_code` (1000; 1011 when its files
        cannot be created, with `reason`); its handler then flushes the session (a Media
        Streams track timeline, a partial frame) and finishes the tap with `reason`. The close
        handshake runs in the background: nobody waits on the peer. A closed socket sends
        nothing more, so `drop_rest` needs nothing here."""
        for ws, session in list(self.sessions.items()):
            if session.tap is tap:
                self._start_close(ws, close_code, reason, reason)
                return True
        return False

    async def end_all(self, reason: str, close_code: int, message: str, timeout: float) -> None:
        """Send every peer a close frame at once; each handler then finishes its own tap. What
        has not ended within `timeout` is finished here (its session flushed first)."""
        for ws in list(self.sockets):
            self._start_close(ws, close_code, message, reason)
        deadline = asyncio.get_running_loop().time() + timeout
        while self.sessions and asyncio.get_running_loop().time() < deadline:
            self._ended.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._ended.wait(), deadline - asyncio.get_running_loop().time()
                )
        for session in list(self.sessions.values()):
            if session.tap is not None and not session.ended:
                self._end(session, reason, None)

    def stop_receiving(self) -> None:
        """New connections stop with the HTTP listener (the server's runner)."""

    def live_stats(self, tap: Tap) -> dict[str, Any] | None:
        """A WebSocket tap's counters are in its sidecar (`counters`)."""
        return None

    def stats(self) -> dict[str, Any]:
        return {"open_sockets": len(self.sockets), **self.counters}

    def metrics(self) -> dict[str, Any]:
        rejected = {
            k.removeprefix("rejected_"): v
            for k, v in self.counters.items()
            if k.startswith("rejected_")
        }
        return {"ws_messages": self.messages, "ws_rejected": rejected}

    def _start_close(self, ws: web.WebSocketResponse, code: int, message: str, reason: str) -> None:
        # The handler waits for this task before it returns (see `handle`): returning while
        # the close handshake is under way would drop the connection before the peer answers.
        if ws not in self._closing:
            self._close_reasons[ws] = (reason, code)
            close = ws.close(code=code, message=message.encode()[:120])
            self._closing[ws] = asyncio.create_task(close)
