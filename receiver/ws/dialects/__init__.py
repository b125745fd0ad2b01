"""WebSocket dialects: which protocol a connection speaks, from its subprotocol and first frame.

| first frame / subprotocol                              | dialect                           |
|--------------------------------------------------------|-----------------------------------|
| subprotocol audio.drachtio.org / audio.jambonz.org     | L16 fork (metadata, then L16)     |
| JSON with event connected/start/media/...              | Media Streams (Twilio-compatible) |
| JSON with event websocket:connected                    | Vonage (L16)                      |
| JSON with sampleRate / mixType                         | L16 fork                          |
| binary, or a format header, or any other text          | SignalWire tap (raw G.711)        |
"""

from __future__ import annotations

import orjson

from receiver.codecs.formats import AudioFormat
from receiver.ws.dialects.base import Session, SessionContext
from receiver.ws.dialects.l16_fork import (
    FORK_SUBPROTOCOLS,
    L16ForkSession,
    looks_like_fork_metadata,
    looks_like_vonage,
)
from receiver.ws.dialects.media_streams import MediaStreamsSession, looks_like_media_streams
from receiver.ws.dialects.raw_tap import RawTapSession

__all__ = ["FORK_SUBPROTOCOLS", "Session", "SessionContext", "choose_session"]


def choose_session(
    ctx: SessionContext, first_text: str | None, query_format: AudioFormat
) -> Session:
    """The session for a connection, given its first frame (`first_text` None: binary)."""
    if ctx.subprotocol in FORK_SUBPROTOCOLS:
        return L16ForkSession(ctx)
    if first_text is not None and first_text.lstrip().startswith("{"):
        try:
            message = orjson.loads(first_text)
        except orjson.JSONDecodeError:
            message = None
        if looks_like_media_streams(message):
            return MediaStreamsSession(ctx)
        if looks_like_vonage(message):
            return L16ForkSession(ctx, vonage=True)
        if looks_like_fork_metadata(message):
            return L16ForkSession(ctx)
    return RawTapSession(ctx, query_format)
