"""The three ways `tap-receiver send` talks to a receiver, each as the real sender does, in real
time (a packet or frame every ptime, on an absolute schedule):

- `send_ws_tap`: a SignalWire WebSocket tap: binary frames of raw G.711, optionally after a text
  frame that declares the format;
- `send_media_streams`: a Media Streams session (`connected`, `start`, `media` per track with
  chunk numbers and timestamps, `stop`), one track or both;
- `send_rtp`: RTP (RFC 3550) from one UDP socket, with simulated loss and reordering.

Each returns what the recording must then hold: the audio as decoded from exactly the bytes that
went out, lost packets as silence of their length.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import random
import socket
import ssl
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus

import aiohttp
import numpy as np

from receiver.codecs import g711
from receiver.codecs.encoding import Encoding
from receiver.rtp.packet import PT_PCMA, PT_PCMU, RtpPacket
from receiver.sender.signals import Pcm

RATE = 8000
MEDIA_STREAMS_ENCODINGS = {Encoding.PCMU: "audio/x-mulaw", Encoding.PCMA: "audio/x-alaw"}
CONTENT_TYPES = {Encoding.PCMU: "audio/mulaw;rate=8000", Encoding.PCMA: "audio/alaw;rate=8000"}


class SendError(Exception):
    """The receiver could not be reached or refused the tap: one line for the user."""


@dataclass
class Sent:
    """What went out, and what the recording must hold."""

    expected: Pcm  # int16, (frames, channels)
    packets: int  # frames or packets per channel
    ssrc: int | None = None  # RTP
    lost: list[int] = field(default_factory=list)  # RTP: indices of packets not sent
    reordered: int = 0  # RTP: pairs sent swapped
    channel_names: list[str] | None = None  # Media Streams: the tracks, in channel order


def g711_frames(pcm: Pcm, codec: Encoding, ptime_ms: int) -> tuple[list[bytes], Pcm]:
    """One channel's G.711 payloads of ptime each (whole ones only), and their decoded audio."""
    per_frame = RATE * ptime_ms // 1000
    whole = pcm.shape[0] // per_frame * per_frame
    encoded = g711.encode(codec, pcm[:whole])
    frames = [encoded[i : i + per_frame] for i in range(0, whole, per_frame)]
    return frames, g711.decode(codec, encoded)


async def _pace(start: float, offset: float) -> None:
    """Sleep until `offset` seconds after `start` (loop time): real time, never faster."""
    delay = start + offset - asyncio.get_running_loop().time()
    if delay > 0:
        await asyncio.sleep(delay)


async def _connect(
    session: aiohttp.ClientSession, uri: str, context: ssl.SSLContext | None
) -> aiohttp.ClientWebSocketResponse:
    try:
        return await session.ws_connect(
            uri, ssl=context if context is not None else True, max_msg_size=0, heartbeat=None
        )
    except aiohttp.WSServerHandshakeError as exc:
        hint = {
            401: ": the URI must carry the receiver's token (/t/<token>/tap/<id>)",
            400: ": a bad tap id or codec in the URI",
            403: ": this address is not in the receiver's http_allow",
            426: ": not a WebSocket endpoint",
            429: ": too many new taps from this address (new_tap_rate_limit)",
            503: ": the receiver is full, low on disk or overloaded",
        }.get(exc.status, "")
        phrase = (
            HTTPStatus(exc.status).phrase if exc.status in HTTPStatus._value2member_map_ else ""
        )
        raise SendError(f"the receiver refused the tap: {exc.status} {phrase}{hint}") from None
    except aiohttp.ClientConnectorCertificateError as exc:
        raise SendError(
            f"cannot connect to {uri}: certificate not trusted ({exc.certificate_error}"
            "); --cafile PEM trusts another CA"
        ) from None
    except aiohttp.ClientConnectorError as exc:
        raise SendError(
            f"cannot connect to {exc.host}:{exc.port}: {_reason(exc.os_error)}"
        ) from None
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise SendError(f"cannot connect to {uri}: {exc or type(exc).__name__}") from None


def _reason(error: OSError) -> str:
    return error.strerror or str(error) or type(error).__name__


async def send_ws_tap(
    uri: str,
    pcm: Pcm,
    codec: Encoding,
    ptime_ms: int,
    format_frame: bool,
    context: ssl.SSLContext | None,
) -> Sent:
    frames, decoded = g711_frames(pcm[:, 0], codec, ptime_ms)
    async with aiohttp.ClientSession() as session:
        ws = await _connect(session, uri, context)
        try:
            if format_frame:
                await ws.send_str(json.dumps({"content-type": CONTENT_TYPES[codec]}))
            start = asyncio.get_running_loop().time()
            for n, frame in enumerate(frames):
                await _pace(start, n * ptime_ms / 1000)
                await ws.send_bytes(frame)
            await ws.close()
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise SendError(f"the connection broke while sending: {exc}") from None
        if ws.close_code not in (1000, None):
            raise SendError(f"the receiver closed the tap with {ws.close_code}")
    return Sent(decoded[:, None], len(frames))


async def send_media_streams(
    uri: str,
    pcm: Pcm,
    codec: Encoding,
    ptime_ms: int,
    tracks: list[str],
    context: ssl.SSLContext | None,
) -> Sent:
    per_track = [
        g711_frames(pcm[:, min(c, pcm.shape[1] - 1)], codec, ptime_ms) for c in range(len(tracks))
    ]
    stream_sid = "MZ" + uuid.uuid4().hex
    sequence = 0

    def message(event: str, **body: object) -> str:
        nonlocal sequence
        sequence += 1
        return json.dumps(
            {"event": event, "sequenceNumber": str(sequence), "streamSid": stream_sid, **body}
        )

    start_event = {
        "streamSid": stream_sid,
        "accountSid": "AC" + "0" * 32,
        "callSid": "CA" + uuid.uuid4().hex,
        "tracks": tracks,
        "customParameters": {"sender": "tap-receiver send"},
        "mediaFormat": {
            "encoding": MEDIA_STREAMS_ENCODINGS[codec],
            "sampleRate": RATE,
            "channels": 1,
        },
    }
    count = len(per_track[0][0])
    async with aiohttp.ClientSession() as session:
        ws = await _connect(session, uri, context)
        try:
            await ws.send_str(
                json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})
            )
            await ws.send_str(message("start", start=start_event))
            start = asyncio.get_running_loop().time()
            for n in range(count):
                await _pace(start, n * ptime_ms / 1000)
                for track, (frames, _) in zip(tracks, per_track, strict=True):
                    media = {
                        "track": track,
                        "chunk": str(n + 1),
                        "timestamp": str(n * ptime_ms),
                        "payload": base64.b64encode(frames[n]).decode(),
                    }
                    await ws.send_str(message("media", media=media))
            stop = {"accountSid": start_event["accountSid"], "callSid": start_event["callSid"]}
            await ws.send_str(message("stop", stop=stop))
            await ws.close()
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise SendError(f"the connection broke while sending: {exc}") from None
        if ws.close_code not in (1000, None):
            raise SendError(f"the receiver closed the stream with {ws.close_code}")
    expected = np.stack([decoded for _, decoded in per_track], axis=1)
    return Sent(expected, count, channel_names=list(tracks))


def plan_loss(count: int, loss: float, reorder: float, seed: int) -> tuple[set[int], list[int]]:
    """Which packets are not sent, and the order the rest go out in (adjacent pairs swapped).
    The first and the last packet always go, in place: nothing could tell the receiver that
    audio is missing before the first or after the last packet it gets."""
    rng = random.Random(seed)
    lost = {i for i in range(1, count - 1) if rng.random() < loss}
    order = [i for i in range(count) if i not in lost]
    i = 1
    while i < len(order) - 2:
        if rng.random() < reorder:
            order[i], order[i + 1] = order[i + 1], order[i]
            i += 2
        else:
            i += 1
    return lost, order


async def send_rtp(
    host: str,
    port: int,
    pcm: Pcm,
    codec: Encoding,
    ptime_ms: int,
    loss: float,
    reorder: float,
    seed: int,
) -> Sent:
    frames, decoded = g711_frames(pcm[:, 0], codec, ptime_ms)
    count = len(frames)
    lost, order = plan_loss(count, loss, reorder, seed)
    # A new SSRC every time (not from the seed): it is how the recording is found again.
    fresh = random.SystemRandom()
    ssrc, first_sequence = fresh.getrandbits(32), fresh.getrandbits(16)
    first_timestamp = fresh.getrandbits(32)
    payload_type = PT_PCMU if codec is Encoding.PCMU else PT_PCMA
    per_frame = RATE * ptime_ms // 1000
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    except OSError as exc:
        raise SendError(f"cannot resolve {host}: {exc}") from None
    # Each packet goes out in the time slot of its place in the order: the two of a swapped pair
    # one ptime apart, each in the other's slot; a lost packet's slot stays empty.
    times = sorted(order)
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        start = asyncio.get_running_loop().time()
        for slot, n in enumerate(order):
            packet = RtpPacket(
                payload_type=payload_type,
                marker=n == 0,
                sequence=(first_sequence + n) & 0xFFFF,
                timestamp=(first_timestamp + n * per_frame) & 0xFFFFFFFF,
                ssrc=ssrc,
                payload=frames[n],
            )
            await _pace(start, times[slot] * ptime_ms / 1000)
            try:
                sock.sendto(packet.serialize(), address)
            except OSError as exc:
                raise SendError(f"cannot send to {host}:{port}: {exc}") from None
    expected = decoded.copy()
    for n in lost:
        expected[n * per_frame : (n + 1) * per_frame] = 0
    reordered = sum(1 for a, b in itertools.pairwise(order) if b < a)
    return Sent(expected[:, None], count, ssrc=ssrc, lost=sorted(lost), reordered=reordered)
