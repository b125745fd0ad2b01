"""After `tap-receiver send`: find the recording through the receiver's HTTP API, wait until it
is finalized, fetch its WAV (`GET /api/taps/{name}` and `/audio`) and compare it with what was
sent, sample for sample."""

from __future__ import annotations

import asyncio
import io
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import aiohttp
import numpy as np
import soundfile

from receiver.sender.signals import Pcm

POLL = 0.25  # seconds between looks at the API while waiting
RECENT = 20  # newest RTP recordings looked at for our SSRC


class CheckError(Exception):
    """The receiver's API could not be asked, or the recording was not found: one line."""


def split_api_url(url: str) -> tuple[str, str | None]:
    """The HTTP base and the token of a receiver address as the banner prints it (the page
    `https://host/t/<token>/`), or of a tap URI (`wss://host/t/<token>/tap/<id>`): ws becomes
    http, the path up to `/t/<token>`, `/tap/` or `/stream/` is a proxy's prefix."""
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    if scheme not in ("http", "https") or not parts.netloc:
        raise CheckError(f"not an http(s):// or ws(s):// address: {url!r}")
    segments = parts.path.split("/")
    token = None
    prefix: list[str] = []
    for i, segment in enumerate(segments):
        if segment == "t" and i + 1 < len(segments) and segments[i + 1]:
            token = segments[i + 1]
            break
        if segment in ("tap", "stream", "api"):
            break
        prefix.append(segment)
    if token is None:
        token = next(iter(parse_qs(parts.query).get("token", [])), None)
    base = f"{scheme}://{parts.netloc}{'/'.join(prefix).rstrip('/')}"
    return base, token


@dataclass
class Comparison:
    expected_frames: int
    recorded_frames: int
    expected_channels: int
    recorded_channels: int
    differing: int  # samples that differ, over the frames both have
    first_difference: int | None  # frame

    @property
    def matches(self) -> bool:
        return (
            self.expected_frames == self.recorded_frames
            and self.expected_channels == self.recorded_channels
            and self.differing == 0
        )


def compare(expected: Pcm, recorded: Pcm) -> Comparison:
    frames = min(len(expected), len(recorded))
    channels = min(expected.shape[1], recorded.shape[1])
    diff = expected[:frames, :channels] != recorded[:frames, :channels]
    rows = np.flatnonzero(diff.any(axis=1))
    return Comparison(
        len(expected),
        len(recorded),
        expected.shape[1],
        recorded.shape[1],
        int(diff.sum()),
        int(rows[0]) if rows.size else None,
    )


class ReceiverApi:
    """The receiver's recordings API, with its token."""

    def __init__(
        self, session: aiohttp.ClientSession, base: str, token: str | None, context: Any
    ) -> None:
        self.session = session
        self.base = base
        self.token = token
        self.ssl: ssl.SSLContext | bool = context if context is not None else True

    @property
    def page(self) -> str:
        return f"{self.base}/t/{self.token}/" if self.token else f"{self.base}/"

    def page_of(self, name: str) -> str:
        return f"{self.page}#/tap/{quote(name)}"

    async def _get(self, path: str, **query: str) -> aiohttp.ClientResponse:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            response = await self.session.get(
                f"{self.base}/api/{path}", params=query, headers=headers, ssl=self.ssl
            )
        except aiohttp.ClientConnectorCertificateError as exc:
            raise CheckError(
                f"cannot reach the API at {self.base}: certificate not trusted "
                f"({exc.certificate_error}); --cafile PEM trusts another CA"
            ) from None
        except aiohttp.ClientConnectorError as exc:
            reason = exc.os_error.strerror or str(exc.os_error)
            raise CheckError(
                f"cannot reach the receiver's API at {self.base}: {reason} (--api URL: the page "
                "URL the receiver printed at start)"
            ) from None
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise CheckError(f"cannot reach the receiver's API at {self.base}: {exc}") from None
        if response.status == 401:
            raise CheckError(
                f"the API at {self.base} wants the token: pass --api with the page URL the "
                "receiver printed at start (…/t/<token>/), or --token"
            )
        return response

    async def json(self, path: str, **query: str) -> tuple[int, Any]:
        response = await self._get(path, **query)
        async with response:
            try:
                body = await response.json(content_type=None)
            except ValueError:
                raise CheckError(
                    f"{self.base}/api/{path} answered {response.status} without JSON: is "
                    "this a tap-receiver?"
                ) from None
            return response.status, body

    async def find_websocket(self, tap_id: str, deadline: float) -> str:
        """The newest recording of this tap id (its file may be `<id>.N`)."""
        while True:
            status, body = await self.json("taps", q=tap_id, transport="websocket", limit="20")
            if status == 200:
                for tap in body.get("taps", []):
                    if tap.get("tap_id") == tap_id:
                        return str(tap["name"])
            if time.monotonic() > deadline:
                raise CheckError(f"no recording of tap {tap_id!r} appeared at {self.base}")
            await asyncio.sleep(POLL)

    async def find_rtp(self, ssrc: str, deadline: float) -> str:
        """The RTP recording whose stream carried this SSRC (the receiver names RTP taps after
        the source address it sees, which NAT may change)."""
        settled: set[str] = set()  # finished recordings that are not ours
        while True:
            status, body = await self.json("taps", transport="rtp", limit=str(RECENT))
            for tap in body.get("taps", []) if status == 200 else []:
                name = str(tap["name"])
                if name in settled:
                    continue
                code, detail = await self.json(f"taps/{quote(name)}")
                rtp = ((detail or {}).get("sidecar") or {}).get("rtp") or {}
                if code == 200 and ssrc in (rtp.get("ssrcs") or []):
                    return name
                if tap.get("state") != "recording":
                    settled.add(name)
            if time.monotonic() > deadline:
                raise CheckError(f"no RTP recording with SSRC {ssrc} appeared at {self.base}")
            await asyncio.sleep(POLL)

    async def wait_finalized(self, name: str, deadline: float) -> dict[str, Any]:
        """The tap's detail once it is no longer recording."""
        while True:
            status, body = await self.json(f"taps/{quote(name)}")
            if status != 200:
                raise CheckError(f"GET /api/taps/{name} answered {status}: {body}")
            if body.get("state") != "recording":
                return dict(body)
            if time.monotonic() > deadline:
                raise CheckError(f"{name} was still recording when the wait ran out (--timeout)")
            await asyncio.sleep(POLL)

    async def audio(self, name: str) -> tuple[Pcm, int]:
        response = await self._get(f"taps/{quote(name)}/audio")
        async with response:
            if response.status != 200:
                raise CheckError(f"GET /api/taps/{name}/audio answered {response.status}")
            data = await response.read()
        try:
            samples, rate = soundfile.read(io.BytesIO(data), dtype="int16", always_2d=True)
        except (RuntimeError, soundfile.LibsndfileError) as exc:
            raise CheckError(f"the WAV of {name} cannot be read: {exc}") from None
        return samples, int(rate)
