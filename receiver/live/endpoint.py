"""`GET /api/taps/{name}/live`: a WebSocket that carries a recording tap's audio as it is placed.

Messages, in order: a JSON text frame `{"type": "start", "sample_rate", "channels",
"sample_format": "s16le", "position", ...}`; then binary frames of 16-bit little-endian PCM
(channels interleaved), the audio from frame `position` of the recording on, without a hole; where
the listener fell behind by more than `live_queue_seconds`, a JSON `{"type": "gap",
"skipped_frames", "position"}` (the audio goes on at `position`); at the tap's end a JSON
`{"type": "end", "position", "reason", "dropped_frames", "gaps"}`, then a normal close (1000).
What the listener sends is ignored. Sending runs in a task of its own per listener: a listener
that does not read blocks only that task, and its queue drops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from asyncio import FIRST_COMPLETED
from collections.abc import Callable

from aiohttp import WSMsgType, web

from receiver.http.errors import json_error
from receiver.live.hub import LiveHub
from receiver.live.subscriber import Message, Subscriber
from receiver.taps.tap import Tap

log = logging.getLogger("receiver.live")
END_TIMEOUT = 5.0  # seconds a listener has to take the rest of an ended tap's audio
CLOSE_TIMEOUT = 1.0
MAX_INCOMING = 4096  # bytes: listeners have nothing to say


async def serve_live(
    request: web.Request,
    hub: LiveHub,
    tap: Tap,
    name: str,
    channel: int | None,
    is_active: Callable[[], bool],
    heartbeat: float | None,
) -> web.StreamResponse:
    """Serve one listener of `tap` (`channel`: one of its channels only, for a per-track
    file)."""
    ws = web.WebSocketResponse(heartbeat=heartbeat or None, max_msg_size=MAX_INCOMING)
    if not ws.can_prepare(request).ok:
        hub.refused["not_websocket"] += 1
        return json_error(400, "GET /api/taps/{name}/live is a WebSocket: send an upgrade")
    if hub.full:
        hub.refused["too_many_listeners"] += 1
        log.warning("live listener of %s refused: live_max_subscribers (%d) reached", name,
                    hub.settings.max_subscribers)  # fmt: skip
        return json_error(503, "too many live listeners (live_max_subscribers)")
    await ws.prepare(request)
    if not is_active():  # it ended while the upgrade was answered
        hub.refused["ended"] += 1
        with contextlib.suppress(Exception):
            await ws.send_json({"type": "end", "position": None, "reason": "ended"})
            await asyncio.wait_for(ws.close(), CLOSE_TIMEOUT)
        return ws
    subscriber = hub.subscribe(tap, name, channel)
    log.info("live listener of %s from %s", name, request.remote)
    sender = asyncio.create_task(_send_all(ws, subscriber))
    reader = asyncio.create_task(_ignore_incoming(ws))
    ended = asyncio.create_task(subscriber.ended_event.wait())
    try:
        done, _ = await asyncio.wait({sender, reader, ended}, return_when=FIRST_COMPLETED)
        if done == {ended}:  # the tap is over: the listener has END_TIMEOUT to take the rest
            await asyncio.wait({sender, reader}, timeout=END_TIMEOUT, return_when=FIRST_COMPLETED)
    finally:
        for task in (sender, reader, ended):
            task.cancel()
        hub.unsubscribe(tap, subscriber)
        try:
            await asyncio.wait_for(ws.close(), CLOSE_TIMEOUT)
        except Exception:  # it does not read: its connection is dropped
            if request.transport is not None:
                request.transport.abort()
    return ws


async def _send_all(ws: web.WebSocketResponse, subscriber: Subscriber) -> None:
    with contextlib.suppress(ConnectionError, RuntimeError):
        while True:
            message = subscriber.pop()
            if message is None:
                if subscriber.ended:
                    return
                await subscriber.wake.wait()
                continue
            await _send(ws, message)


async def _send(ws: web.WebSocketResponse, message: Message) -> None:
    if isinstance(message, bytes):
        await ws.send_bytes(message)
    else:
        await ws.send_json(message)


async def _ignore_incoming(ws: web.WebSocketResponse) -> None:
    """Read (and drop) what the listener sends, so its close is seen."""
    async for message in ws:
        if message.type == WSMsgType.ERROR:
            return
