"""Audio of archived recordings, read back from the store for the inspection API: when the
local WAV is gone (archive_delete_local, retention), `GET /api/taps/{id}/audio` streams the
archived object, `Range` passed through to the store (206 with its Content-Range)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import Any

from aiohttp import web

from receiver.archive.store import ObjectStore, StoreError
from receiver.config import ArchiveSettings
from receiver.http.errors import json_error

log = logging.getLogger("receiver.archive")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
CHUNK = 256 * 1024


class ArchiveReader:
    def __init__(self, settings: ArchiveSettings) -> None:
        self.settings = settings
        self._store: ObjectStore | None = None
        self._opening = asyncio.Lock()

    async def store(self) -> ObjectStore:
        async with self._opening:  # one client, made on first use
            if self._store is None:
                s = self.settings
                store = ObjectStore(s.bucket, s.prefix, s.endpoint, s.part_size)
                self._store = await store.__aenter__()
            return self._store

    async def close(self) -> None:
        if self._store is not None:
            with contextlib.suppress(Exception):
                await self._store.__aexit__(None, None, None)
            self._store = None

    async def audio(
        self, request: web.Request, name: str, sidecar: dict[str, Any] | None
    ) -> web.StreamResponse:
        archive = (sidecar or {}).get("archive")
        if not isinstance(archive, dict) or not archive.get("uploaded_at"):
            return json_error(404, f"no recording {name!r}")
        if archive.get("encrypted"):
            return json_error(409, f"{name}: the archived audio is age-encrypted; decrypt "
                              f"{archive.get('url')} with a recipient's identity")  # fmt: skip
        prefix = f"s3://{self.settings.bucket}/"
        url = str(archive.get("url") or "")
        if not url.startswith(prefix):
            return json_error(404, f"{name}: archived in {url!r}, not in this archive_url")
        byte_range = request.headers.get("Range", "").strip()
        match = _RANGE.fullmatch(byte_range)
        if byte_range and (match is None or match.groups() == ("", "")):
            return json_error(416, f"unsupported range {byte_range!r} (one bytes=A-B range)")
        store = await self.store()
        try:
            head, body = await store.open_body(url[len(prefix) :], byte_range or None)
        except StoreError as exc:
            status = 416 if "InvalidRange" in str(exc) else 502
            if "NoSuchKey" in str(exc):
                status = 404
            return json_error(status, f"{name}: the archive answered {exc}")
        response = web.StreamResponse(status=206 if head.get("ContentRange") else 200)
        response.content_type = "audio/wav"
        response.content_length = int(head.get("ContentLength", 0))
        response.headers["Accept-Ranges"] = "bytes"
        response.headers["Cache-Control"] = "no-cache"
        if head.get("ContentRange"):
            response.headers["Content-Range"] = head["ContentRange"]
        async with body:
            await response.prepare(request)
            while chunk := await body.read(CHUNK):
                await response.write(chunk)
        await response.write_eof()
        return response
