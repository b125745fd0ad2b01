"""The archive's recordings, for the inspection API's listing: read from the sidecars the
archivers of the fleet uploaded (`<prefix>/<name>.json`), so that a receiver also lists what
another one (sharing the bucket and prefix) recorded, or what is no longer on its own disk.

Cheap by construction: the store is listed at most every LIST_INTERVAL seconds, in a task of
its own (a listing request waits for it at most REFRESH_WAIT, then answers with what it has);
each sidecar object is fetched once and kept by key and ETag (a bounded LRU), at most
FETCH_PER_REFRESH new ones per refresh. Encrypted sidecars (`.json.age`, with
archive_recipients) cannot be read without a recipient's identity: they are counted, not listed.

A store that cannot be listed is logged once per outage; meanwhile the listing is local-only
and says `archive.state: "unreachable"`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from receiver.archive.reader import ArchiveReader
from receiver.archive.retention import utc_iso
from receiver.archive.store import StoreError, describe_error
from receiver.redaction import redact
from receiver.storage.sidecar import MAX_SIDECAR_BYTES, parse_sidecar
from receiver.taps.tap_id import is_valid_name

log = logging.getLogger("receiver.archive")

LIST_INTERVAL = 15.0  # seconds: the store is listed at most this often
REFRESH_WAIT = 2.0  # seconds a listing request waits for a refresh before answering without it
MAX_OBJECTS = 200_000  # objects under the prefix one refresh reads (WAVs and sidecars)
MAX_CACHED = 20_000  # archived sidecars kept in memory
FETCH_PER_REFRESH = 500  # new sidecars fetched by one refresh, newest first; the rest later
FETCH_CONCURRENCY = 4  # the reader's client also streams audio: leave it connections


@dataclass(frozen=True, slots=True)
class Archived:
    name: str
    sidecar: dict[str, Any]  # redacted, as uploaded
    key: str
    etag: str


def _is_missing(exc: StoreError) -> bool:
    return "NoSuchKey" in str(exc) or str(exc).startswith("404")


class ArchiveListing:
    """The recordings the archive holds, by name, from their archived sidecars."""

    def __init__(self, reader: ArchiveReader) -> None:
        self.reader = reader
        self._sidecars: OrderedDict[str, tuple[str, dict[str, Any] | None]] = OrderedDict()
        self._listed: dict[str, Archived] = {}
        self._task: asyncio.Task[None] | None = None
        self._refreshed: float | None = None  # monotonic, of the last attempt
        self._listed_at: float | None = None  # wall clock, of the last listing that worked
        self.problem: str | None = None
        self.encrypted = 0
        self.unreadable = 0
        self.pending = 0  # sidecars not fetched yet (more than FETCH_PER_REFRESH were new)
        self.truncated = False

    async def recordings(self) -> list[Archived]:
        """The archived recordings as last listed; a refresh first when the last one is older
        than LIST_INTERVAL (waited for at most REFRESH_WAIT). Empty during an outage."""
        stale = self._refreshed is None or time.monotonic() - self._refreshed >= LIST_INTERVAL
        if self._task is None and stale:
            self._task = asyncio.create_task(self._refresh(), name="archive-listing")
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._task), REFRESH_WAIT)
        return [] if self.problem is not None else list(self._listed.values())

    def status(self) -> dict[str, Any]:
        state = "listing" if self._listed_at is None else "ok"
        if self.problem is not None:
            state = "unreachable"
        return {
            "state": state,
            "problem": self.problem,
            "listed": len(self._listed) if self.problem is None else 0,
            "listed_at": utc_iso(self._listed_at) if self._listed_at else None,
            "encrypted": self.encrypted,
            "unreadable": self.unreadable,
            "pending": self.pending,
            "truncated": self.truncated,
        }

    async def sidecar(self, name: str) -> dict[str, Any] | None:
        """One archived recording's sidecar (None: the archive has none readable under that
        name). Raises StoreError when the store cannot be asked."""
        found = self._listed.get(name)
        if found is not None:
            return found.sidecar
        store = await self.reader.store()
        key = store.key(f"{name}.json")
        try:
            raw, etag = await store.get_bytes(key, MAX_SIDECAR_BYTES)
        except StoreError as exc:
            if _is_missing(exc):
                return None
            raise
        return await self._keep(key, etag, raw)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None

    # -- refreshing -------------------------------------------------------------------------

    async def _refresh(self) -> None:
        try:
            await self._list()
        except Exception as exc:
            problem = str(exc) if isinstance(exc, StoreError) else describe_error(exc)
            if self.problem is None:
                log.warning("archive: cannot list %s (%s); the listing shows local recordings "
                            "only until it can", self.reader.settings.bucket, problem)  # fmt: skip
            self.problem = problem
        else:
            if self.problem is not None:
                log.warning("archive: listing %s works again", self.reader.settings.bucket)
            self.problem = None
            self._listed_at = time.time()
        finally:
            self._refreshed = time.monotonic()
            self._task = None

    async def _list(self) -> None:
        store = await self.reader.store()
        objects, truncated = await store.list_keys("", MAX_OBJECTS)
        start = len(store.key(""))
        found: dict[str, tuple[str, str, Any]] = {}
        encrypted = 0
        for item in objects:
            key = str(item.get("Key", ""))
            base = key[start:]
            if base.endswith(".json.age"):
                encrypted += 1
            elif base.endswith(".json") and is_valid_name(base[:-5]):
                etag = str(item.get("ETag", "")).strip('"')
                found[base[:-5]] = (key, etag, item.get("LastModified"))
        new = [
            (name, key, modified)
            for name, (key, etag, modified) in found.items()
            if (cached := self._sidecars.get(key)) is None or cached[0] != etag
        ]
        new.sort(key=lambda n: str(n[2] or ""), reverse=True)
        gate = asyncio.Semaphore(FETCH_CONCURRENCY)

        async def fetch(key: str) -> None:
            async with gate:
                try:
                    raw, etag = await store.get_bytes(key, MAX_SIDECAR_BYTES)
                except StoreError as exc:
                    if _is_missing(exc):  # deleted since the listing
                        return
                    raise
            await self._keep(key, etag, raw)

        await asyncio.gather(*(fetch(key) for _, key, _ in new[:FETCH_PER_REFRESH]))
        listed: dict[str, Archived] = {}
        unreadable = 0
        for name, (key, etag, _) in found.items():
            cached = self._sidecars.get(key)
            if cached is None or cached[0] != etag:
                continue  # not fetched yet
            if cached[1] is None:
                unreadable += 1
                continue
            listed[name] = Archived(name, cached[1], key, etag)
        self._listed = listed
        self.encrypted = encrypted
        self.unreadable = unreadable
        self.pending = max(0, len(new) - FETCH_PER_REFRESH)
        self.truncated = truncated

    async def _keep(self, key: str, etag: str, raw: bytes) -> dict[str, Any] | None:
        sidecar = await asyncio.to_thread(_parse, raw, key)
        self._sidecars[key] = (etag, sidecar)
        self._sidecars.move_to_end(key)
        while len(self._sidecars) > MAX_CACHED:
            self._sidecars.popitem(last=False)
        return sidecar


def _parse(raw: bytes, key: str) -> dict[str, Any] | None:
    """In a thread: an archived sidecar, redacted (None when it is not a readable one)."""
    sidecar, _problem = parse_sidecar(raw, key)
    return redact(sidecar) if sidecar is not None else None
