"""`tap-receiver send URI`: check a deployment without a real call.

Plays a WAV, a tone or a speech-like signal to a receiver exactly as the real senders do (a
SignalWire WebSocket tap, a Media Streams session, or RTP), in real time, then finds the
recording through the receiver's API and says whether it holds exactly what was sent. Exit
status 0 when it does, 1 when it does not (or no recording came), 2 when nothing could be sent.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import ssl
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp
import numpy as np

from receiver import config
from receiver.codecs.encoding import Encoding
from receiver.http.auth import TOKEN_FILE
from receiver.rtp.timeline.stats import ssrc_hex
from receiver.sender import signals
from receiver.sender.check import CheckError, ReceiverApi, compare, split_api_url
from receiver.sender.senders import (
    RATE,
    SendError,
    Sent,
    send_media_streams,
    send_rtp,
    send_ws_tap,
)
from receiver.taps.tap_id import TAP_ID_RULE, is_valid_tap_id

PLACEHOLDERS = ("{tap_id}", "%7Btap_id%7D", "%7btap_id%7d")
TRACKS = {"inbound": ["inbound"], "outbound": ["outbound"], "both": ["inbound", "outbound"]}


class UsageError(Exception):
    """A bad argument: one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tap-receiver send",
        description="Send test audio to a tap-receiver as a real tap would, in real time, then "
        "check through the receiver's API that the recording matches what was sent.",
        epilog="Examples: tap-receiver send 'ws://localhost:8080/t/TOKEN/tap/{tap_id}'  |  "
        "tap-receiver send rtp://localhost:5004 --api http://localhost:8080/t/TOKEN/ "
        "--loss 0.05 --reorder 0.05  |  tap-receiver send 'wss://tap.example.com/t/TOKEN/"
        "tap/{tap_id}' --media-streams --tracks both --wav call.wav",
    )
    parser.add_argument(
        "uri",
        metavar="URI",
        help="the tap URI as the receiver printed it: ws[s]://HOST/t/TOKEN/tap/{tap_id} "
        "({tap_id} is replaced by --tap-id), or rtp://HOST:PORT",
    )
    audio = parser.add_argument_group("audio (default: a speech-like signal)")
    source = audio.add_mutually_exclusive_group()
    source.add_argument(
        "--wav",
        type=Path,
        metavar="FILE",
        help="play this sound file (resampled to 8 kHz; stereo: left inbound, right outbound)",
    )
    source.add_argument("--tone", type=float, metavar="HZ", help="a sine tone at -12 dBFS")
    source.add_argument("--speech", action="store_true", help="a speech-like signal")
    audio.add_argument(
        "--seconds",
        type=float,
        default=None,
        metavar="S",
        help="how long (default 5; a WAV plays whole, or its first S seconds)",
    )
    audio.add_argument(
        "--seed",
        type=int,
        default=1,
        help="for the speech-like signal and the simulated loss (default 1)",
    )
    wire = parser.add_argument_group("on the wire")
    wire.add_argument("--codec", choices=("pcmu", "pcma"), default="pcmu", help="G.711 law")
    wire.add_argument(
        "--ptime",
        type=int,
        default=20,
        metavar="MS",
        help="milliseconds per frame or packet, 10-120 (default 20)",
    )
    wire.add_argument(
        "--tap-id", metavar="ID", help="the id for {tap_id} (default: send-<date>-<time>-<random>)"
    )
    wire.add_argument(
        "--format-frame",
        action="store_true",
        help="WebSocket tap: declare the format in a first text frame "
        '({"content-type": "audio/mulaw;rate=8000"}), as a sender may',
    )
    wire.add_argument(
        "--media-streams",
        action="store_true",
        help="WebSocket: a Media Streams session (JSON events) instead of a "
        "SignalWire tap's raw G.711 frames",
    )
    wire.add_argument(
        "--tracks",
        choices=tuple(TRACKS),
        default="inbound",
        help="Media Streams: the tracks sent (both: a stereo recording)",
    )
    wire.add_argument(
        "--loss",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="RTP: leave out this share of packets (0-0.5; never the first or "
        "last), which must become silence of their length",
    )
    wire.add_argument(
        "--reorder",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="RTP: send this share of packets swapped with the next one "
        "(0-0.5), which must land in their place",
    )
    check = parser.add_argument_group("the check")
    check.add_argument(
        "--api",
        metavar="URL",
        help="the receiver's HTTP address, best the page "
        "URL it printed (http://HOST:8080/t/TOKEN/); default: from a ws:// URI, "
        "or http://HOST:<http_port> for rtp://",
    )
    check.add_argument(
        "--token",
        help="the receiver's token for the API (default: from the "
        "URI or --api, else RECEIVER_TOKEN, else <recordings>/.receiver-token)",
    )
    check.add_argument(
        "--cafile",
        type=Path,
        metavar="PEM",
        help="trust this CA (e.g. of a self-signed certificate) for wss/https",
    )
    check.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="how long to wait for the recording to be finalized (default 60; RTP "
        "taps end after the receiver's rtp_idle_timeout)",
    )
    check.add_argument("--no-check", action="store_true", help="only send")
    return parser


def default_tap_id() -> str:
    return f"send-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def with_tap_id(uri: str, tap_id: str | None) -> tuple[str, str]:
    """The URI with its {tap_id} replaced (or its last path segment, the id it names)."""
    parts = urlsplit(uri)
    path = parts.path
    if any(p in path for p in PLACEHOLDERS):
        tap_id = tap_id or default_tap_id()
        for placeholder in PLACEHOLDERS:
            path = path.replace(placeholder, quote(tap_id))
    else:
        head, _, last = path.rstrip("/").rpartition("/")
        if head.rsplit("/", 1)[-1] not in ("tap", "stream"):
            raise UsageError(f"{uri!r} is not a tap URI (…/tap/{{tap_id}} or …/stream/{{tap_id}})")
        if tap_id is not None and tap_id != last:
            path = f"{head}/{quote(tap_id)}"
        tap_id = tap_id or last
    if not is_valid_tap_id(tap_id):
        raise UsageError(f"tap id {tap_id!r}: {TAP_ID_RULE}")
    return urlunsplit(parts._replace(path=path)), tap_id


def local_token() -> str | None:
    """The token of a receiver configured here: RECEIVER_TOKEN or the config file's, else the
    one it generated into its recordings directory."""
    try:
        token = config.one_setting("token", os.environ)
        if token:
            return str(token)
        recordings = Path(config.one_setting("recordings", os.environ))
        return (recordings / TOKEN_FILE).read_text(encoding="utf-8").strip() or None
    except (config.ConfigError, OSError):
        return None


def load_audio(args: argparse.Namespace, channels: int) -> tuple[signals.Pcm, str]:
    seconds = args.seconds
    if seconds is not None and not 0.1 <= seconds <= 3600:
        raise UsageError("--seconds must be between 0.1 and 3600")
    if args.wav is not None:
        pcm = signals.read_wav(args.wav, RATE, channels, seconds)
        return pcm, f"{args.wav.name}"
    seconds = 5.0 if seconds is None else seconds
    if args.tone is not None:
        if not 20 <= args.tone <= RATE / 2 - 100:
            raise UsageError(f"--tone must be between 20 and {RATE // 2 - 100} Hz")
        tones = [signals.tone(args.tone * (1.5**c), seconds) for c in range(channels)]
        return np.hstack(tones), f"a {args.tone:g} Hz tone"
    voices = [signals.speech_like(seconds, args.seed + c) for c in range(channels)]
    return np.hstack(voices), "a speech-like signal"


def ssl_context(cafile: Path | None) -> ssl.SSLContext | None:
    if cafile is None:
        return None
    try:
        return ssl.create_default_context(cafile=str(cafile))
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"--cafile {cafile}: {exc}") from None


def main(argv: Sequence[str], out: TextIO | None = None) -> int:
    stream = out or sys.stdout
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(run(args, stream))
    except (UsageError, SendError, signals.SignalError) as exc:
        print(f"tap-receiver send: {exc}", file=sys.stderr)
        return 2
    except CheckError as exc:
        print(f"tap-receiver send: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


async def run(args: argparse.Namespace, out: TextIO) -> int:
    codec = Encoding.PCMU if args.codec == "pcmu" else Encoding.PCMA
    if not 10 <= args.ptime <= 120 or args.ptime % 10:
        raise UsageError("--ptime must be a multiple of 10 from 10 to 120")
    for name in ("loss", "reorder"):
        if not 0 <= getattr(args, name) <= 0.5:
            raise UsageError(f"--{name} must be between 0 and 0.5")
    context = ssl_context(args.cafile)
    scheme = urlsplit(args.uri).scheme.lower()
    tracks = TRACKS[args.tracks] if args.media_streams else ["mono"]
    if scheme == "rtp":
        if args.media_streams or args.format_frame:
            raise UsageError("--media-streams and --format-frame are for ws:// and wss:// URIs")
        return await _rtp(args, codec, context, out)
    if scheme not in ("ws", "wss"):
        raise UsageError(f"{args.uri!r}: a tap URI starts with ws://, wss:// or rtp://")
    if args.loss or args.reorder:
        raise UsageError("--loss and --reorder are for rtp:// (TCP neither loses nor reorders)")
    uri, tap_id = with_tap_id(args.uri, args.tap_id)
    query = urlsplit(uri).query
    if codec is Encoding.PCMA and not (
        args.media_streams or args.format_frame or "codec=" in query
    ):
        # nothing else tells the receiver the law: it would record PCMA as PCMU
        query = (query + "&" if query else "") + "codec=pcma"
        uri = urlunsplit(urlsplit(uri)._replace(query=query))
    pcm, what = load_audio(args, len(tracks))
    kind = "Media Streams session" if args.media_streams else "SignalWire WebSocket tap"
    print(
        f"sending {len(pcm) / RATE:.2f} s of {what} as a {kind} ({codec}, {args.ptime} ms "
        f"frames{', tracks ' + '+'.join(tracks) if args.media_streams else ''}) to tap "
        f"{tap_id}, in real time…",
        file=out,
        flush=True,
    )
    if args.media_streams:
        sent = await send_media_streams(uri, pcm, codec, args.ptime, tracks, context)
    else:
        sent = await send_ws_tap(uri, pcm, codec, args.ptime, args.format_frame, context)
    print(f"sent {sent.packets} frames", file=out)
    if args.no_check:
        return 0
    base, token = split_api_url(args.api or uri)
    token = args.token or token or local_token()
    async with aiohttp.ClientSession() as session:
        api = ReceiverApi(session, base, token, context)
        deadline = time.monotonic() + args.timeout
        name = await api.find_websocket(tap_id, deadline)
        return await _check(api, name, sent, codec, deadline, out)


async def _rtp(
    args: argparse.Namespace, codec: Encoding, context: ssl.SSLContext | None, out: TextIO
) -> int:
    parts = urlsplit(args.uri)
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if not host or not port:
        raise UsageError(f"{args.uri!r}: an RTP address is rtp://HOST:PORT")
    pcm, what = load_audio(args, 1)
    extras = []
    if args.loss:
        extras.append(f"{args.loss:.0%} left out")
    if args.reorder:
        extras.append(f"{args.reorder:.0%} reordered")
    print(
        f"sending {len(pcm) / RATE:.2f} s of {what} as RTP ({codec}, {args.ptime} ms packets"
        f"{', ' + ', '.join(extras) if extras else ''}) to {host}:{port}, in real time…",
        file=out,
        flush=True,
    )
    sent = await send_rtp(host, port, pcm, codec, args.ptime, args.loss, args.reorder, args.seed)
    assert sent.ssrc is not None
    ssrc = ssrc_hex(sent.ssrc)
    print(
        f"sent {sent.packets - len(sent.lost)} of {sent.packets} packets (SSRC {ssrc}"
        f"{f', {sent.reordered} out of order' if sent.reordered else ''})",
        file=out,
    )
    if args.no_check:
        return 0
    if args.api:
        base, token = split_api_url(args.api)
    else:
        try:
            http_port = config.one_setting("http_port", os.environ)
        except config.ConfigError:
            http_port = 8080
        base, token = f"http://{_url_host(host)}:{http_port}", None
    token = args.token or token or local_token()
    async with aiohttp.ClientSession() as session:
        api = ReceiverApi(session, base, token, context)
        deadline = time.monotonic() + args.timeout
        name = await api.find_rtp(ssrc, deadline)
        print(
            f"recording {name}: waiting for the receiver to end it (rtp_idle_timeout)…",
            file=out,
            flush=True,
        )
        return await _check(api, name, sent, codec, deadline, out)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def _check(
    api: ReceiverApi, name: str, sent: Sent, codec: Encoding, deadline: float, out: TextIO
) -> int:
    detail = await api.wait_finalized(name, deadline)
    sidecar: dict[str, Any] = detail.get("sidecar") or {}
    recorded, rate = await api.audio(name)
    problems: list[str] = []
    if detail.get("state") != "finished":
        problems.append(f"the recording is {detail.get('state')}: {sidecar.get('error', '')}")
    if rate != RATE or sidecar.get("codec") != codec:
        problems.append(f"recorded as {sidecar.get('codec')} at {rate} Hz, sent {codec} at {RATE}")
    if sent.channel_names and sidecar.get("channel_names") not in (None, sent.channel_names):
        problems.append(f"channels named {sidecar.get('channel_names')}, sent {sent.channel_names}")
    rtp = sidecar.get("rtp") or {}
    if sent.ssrc is not None and rtp.get("lost") != len(sent.lost):
        problems.append(
            f"the receiver counted {rtp.get('lost')} packets lost, {len(sent.lost)} were left out"
        )
    result = compare(sent.expected, recorded)
    channels = {1: "mono", 2: "stereo"}.get(result.recorded_channels, "")
    print(
        f"recording {name}: {detail.get('state')}, {result.recorded_frames} frames "
        f"({result.recorded_frames / RATE:.3f} s), {sidecar.get('codec')} {rate} Hz "
        f"{channels}",
        file=out,
    )
    if rtp:
        print(
            f"  rtp: received {rtp.get('received')}, lost {rtp.get('lost')}, reordered "
            f"{rtp.get('reordered')}, late {rtp.get('late')}",
            file=out,
        )
    if not result.matches:
        if result.recorded_frames != result.expected_frames:
            problems.append(
                f"{result.recorded_frames} frames recorded, {result.expected_frames} sent"
            )
        if result.recorded_channels != result.expected_channels:
            problems.append(
                f"{result.recorded_channels} channels recorded, {result.expected_channels} sent"
            )
        if result.differing:
            at = (result.first_difference or 0) / RATE
            problems.append(f"{result.differing} samples differ, the first at {at:.3f} s")
    lost = f", {len(sent.lost)} lost packets silent" if sent.lost else ""
    if problems:
        print("MISMATCH: " + "; ".join(problems), file=out)
    else:
        print(
            f"MATCH: every sample as sent ({result.expected_frames} frames x "
            f"{result.expected_channels}{lost})",
            file=out,
        )
    print(f"see it: {api.page_of(name)}", file=out)
    return 1 if problems else 0
