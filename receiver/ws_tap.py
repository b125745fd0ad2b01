"""The WebSocket tap endpoint: `GET /tap/{tap_id}` (and `/t/{token}/tap/{tap_id}`).

What a SignalWire tap sends (protocols.md §2): binary frames of raw G.711, any length, appended
in arrival order; optionally one text frame first that declares the format. Later text frames
are ignored and counted. The tap ends when the socket closes, cleanly or not.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from receiver.audio_buffer import PCM16
from receiver.audio_format import (
    AudioFormat,
    FormatError,
    codec_from_query,
    parse_format_header,
)
from receiver.auth import Auth
from receiver.config import Config
from receiver.registry import TapRegistry
from receiver.tap import Tap
from receiver.tap_id import TAP_ID_RULE, is_valid_tap_id

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
        ws = web.WebSocketResponse(
            max_msg_size=self.config.ws_max_message_size,
            heartbeat=self.config.ws_heartbeat or None,
            timeout=CLOSE_HANDSHAKE_TIMEOUT,
        )
        if not ws.can_prepare(request).ok:
            return json_error(426, "expected a WebSocket upgrade request")
        await ws.prepare(request)
        self.sockets.add(ws)
        try:
            await self._record(ws, tap_id, fmt, request.remote)
        finally:
            self.sockets.discard(ws)
        return ws

    async def _record(
        self, ws: web.WebSocketResponse, tap_id: str, fmt: AudioFormat, remote: str | None
    ) -> None:
        tap: Tap | None = None
        odd_byte = b""  # L16 frames may split a sample across messages
        reason = "closed"
        close_code: int | None = None  # what we closed with, when it was us

        def start(fmt: AudioFormat) -> Tap:
            new = Tap(tap_id, "websocket", fmt.encoding, fmt.sample_rate, fmt.channels, remote)
            new.extra["content_type"] = fmt.mime
            self.registry.start(new)
            return new

        try:
            async for msg in ws:
                if msg.type == WSMsgType.BINARY:
                    if tap is None:
                        tap = start(fmt)
                    data: bytes = msg.data
                    tap.count("frames_received")
                    tap.count("bytes_received", len(data))
                    if fmt.encoding == PCM16:
                        data = odd_byte + data
                        whole = len(data) - len(data) % (2 * fmt.channels)
                        data, odd_byte = data[:whole], data[whole:]
                    tap.buffer.append(fmt.encoding, data)
                elif msg.type == WSMsgType.TEXT:
                    if tap is None:
                        try:
                            declared = parse_format_header(msg.data)
                        except FormatError as exc:
                            self._count("rejected_bad_format")
                            log.warning("tap %s: %s; closing with 1003", tap_id, exc)
                            await ws.close(code=UNSUPPORTED_DATA, message=str(exc)[:120].encode())
                            reason = f"unsupported format: {exc}"
                            break
                        if declared is not None:
                            fmt = declared
                            tap = start(fmt)
                            tap.count("format_frames")
                            continue
                        tap = start(fmt)
                    tap.count("text_frames_ignored")
                    log.debug("tap %s: ignoring text frame %r", tap_id, msg.data[:80])
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
                    if tap is not None:
                        tap.count("errors")
                    break
        except Exception as exc:
            reason = f"connection error: {type(exc).__name__}"
            log.info("tap %s: %s", tap_id, reason)
        finally:
            if tap is None and not reason.startswith("unsupported format"):
                tap = start(fmt)  # a tap that sent nothing still leaves an (empty) recording
            if tap is not None:
                if odd_byte:
                    tap.count("bytes_discarded", len(odd_byte))
                close_code = close_code or ws.close_code
                if close_code is not None:
                    tap.extra["close_code"] = int(close_code)
                self.registry.finish(tap, reason)

    async def close_all(self, code: int = WSCloseCode.GOING_AWAY) -> None:
        """Send every peer a close frame at once; each handler then finishes its own tap."""
        await asyncio.gather(
            *(ws.close(code=code, message=b"server shutting down") for ws in list(self.sockets)),
            return_exceptions=True,
        )

    def stats(self) -> dict[str, Any]:
        return {"open_sockets": len(self.sockets), **self.counters}
