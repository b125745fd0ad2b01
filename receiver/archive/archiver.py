"""The archiver: uploads finished recordings to the object store, then applies retention.

It runs in its own process (receiver.archive.process), never on the server's event loop.

The queue that survives `kill -9` is the recordings directory itself: a finished recording whose
sidecar has no `archive.uploaded_at` is still to be uploaded. The server hands each recording
over as it is finalized; at start-up (after crash recovery) the directory is scanned for the
ones an earlier process left. The queue in memory holds names only and is bounded; past its
bound a name is dropped and the directory is scanned again once the queue has drained.

One recording, in order: its WAV is locked (flock: a second worker never uploads it at the same
time, and the lock dies with the process), the WAV and per-track WAVs are uploaded (encrypted
first when there are recipients), then its sidecar with the `archive` field, and only then is
the local sidecar rewritten (durably) to say where and when. Object keys follow from the file
name and the recording alone, so a retry or a resumed upload writes the same objects, never a
second copy under another name: each object carries its recording (`tap id @ started_at`) in
its metadata, and where the name's keys already hold another recording (another receiver of a
fleet sharing the prefix, or a name used again after a local delete), the keys take the
recording's start as well (`<name>.<start>.wav`): nothing archived is ever overwritten. Only
after that may the local audio go (`archive_delete_local`, retention).

A store that fails (unreachable, refusing the credentials, no such bucket) is an outage: logged
once when it starts and once when it ends, shown in /healthz and /metrics; each recording
waits with exponential backoff (up to MAX_BACKOFF) and is tried again, while recording goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

from receiver.archive import retention
from receiver.archive.encryption import encrypt_bytes, encrypt_to, load_recipients
from receiver.archive.store import ObjectStore, StoreError, describe_error
from receiver.config import ArchiveSettings
from receiver.storage.sidecar import TapState, load_sidecar, write_json_atomic

log = logging.getLogger("receiver.archive")

MAX_QUEUED = 10_000  # names waiting in memory; more wait on disk until the next scan
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 300.0
RETENTION_INTERVAL = 60.0  # seconds between retention sweeps
WORK_DIR = ".archive"  # in the recordings directory: encrypted copies waiting to be uploaded


def recording_of(sidecar: dict[str, Any]) -> str:
    """What tells this recording from another of the same name: its tap id and its start."""
    return f"{sidecar.get('tap_id')}@{sidecar.get('started_at')}"


def is_archived(sidecar: dict[str, Any]) -> bool:
    archive = sidecar.get("archive")
    return isinstance(archive, dict) and bool(archive.get("uploaded_at"))


class Archiver:
    def __init__(self, settings: ArchiveSettings, directory: Path, primary: bool) -> None:
        self.settings = settings
        self.directory = directory
        self.primary = primary  # scans and retention: one worker does them
        self.recipients = load_recipients(settings.recipients) if settings.recipients else []
        self._queue: deque[str] = deque()
        self._queued: set[str] = set()
        self._wake = asyncio.Event()
        self._rescan = False  # names were dropped from a full queue
        self._backoff = FIRST_BACKOFF
        self.problem: str | None = None  # the outage now, if any
        self.outage_since: float | None = None
        self.counters = {
            "uploaded": 0,
            "uploaded_bytes": 0,
            "resumed_bytes": 0,
            "failures": 0,
            "outages": 0,
            "local_errors": 0,
            "local_deleted": 0,
            "retention_deleted": 0,
            "retention_bytes": 0,
        }
        self.in_flight = 0
        self._sweep = asyncio.Event()  # run retention now (a recording finished or was uploaded)
        self._probe = asyncio.Lock()  # during an outage, one recording at a time tries the store
        self.changed = asyncio.Event()  # the status changed (the process reports it)

    # -- the queue --------------------------------------------------------------------------

    def finished(self, name: str) -> None:
        """A recording was finalized: upload it, and keep within the retention limits."""
        if self.enabled:
            self.submit(name)
        self._sweep.set()

    def submit(self, name: str) -> None:
        if name in self._queued:
            return
        if len(self._queue) >= MAX_QUEUED:
            self._rescan = True
            return
        self._queue.append(name)
        self._queued.add(name)
        self._wake.set()
        self.changed.set()

    async def _next(self) -> str:
        while not self._queue:
            self._wake.clear()
            if self._rescan and self.primary and not self.in_flight:
                self._rescan = False
                await self.scan()
                continue
            await self._wake.wait()
        return self._queue.popleft()

    async def scan(self) -> int:
        """Queue every finished, unarchived recording in the directory. A recording this
        process was handed as well is found twice and uploaded once (the queue keeps one name;
        after the lock, an archived sidecar ends it); recovered ones count as finished."""
        names = await asyncio.to_thread(self._pending_on_disk)
        for name in names:
            self.submit(name)
        if names:
            log.info("archive: %d recordings waiting to be uploaded", len(names))
        return len(names)

    def _pending_on_disk(self) -> list[str]:
        work = self.directory / WORK_DIR
        if work.is_dir():  # encrypted copies of recordings deleted before their upload
            for copy in work.iterdir():
                source = self.directory / copy.name.removesuffix(".age")
                if not copy.name.startswith(".") and not source.exists():
                    copy.unlink(missing_ok=True)
        found = []
        for rec in retention.local_recordings(self.directory):
            sidecar, _ = load_sidecar(self.directory / f"{rec.name}.json")
            if sidecar is None or sidecar.get("state") == TapState.RECORDING:
                continue
            if not is_archived(sidecar):
                found.append((rec.mtime, rec.name))
        return [name for _, name in sorted(found)]

    # -- running ------------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    async def run(self) -> None:
        tasks = []
        if self.primary and (self.settings.retention_max_age or self.settings.retention_max_bytes):
            tasks.append(asyncio.create_task(self._retention_loop()))
        if not self.enabled:
            await asyncio.gather(*tasks)
            return
        s = self.settings
        async with ObjectStore(s.bucket, s.prefix, s.endpoint, s.part_size) as store:
            tasks += [
                asyncio.create_task(self._uploads(store)) for _ in range(self.settings.concurrency)
            ]
            tasks.append(asyncio.create_task(self._first_check(store)))
            try:
                await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()

    async def _first_check(self, store: ObjectStore) -> None:
        """Say at once when the store cannot be used, not only at the first upload."""
        try:
            await store.check()
        except StoreError as exc:
            self._failed(str(exc))
        else:
            log.info("archive: uploading to %s", store.url(store.key("")))

    async def _uploads(self, store: ObjectStore) -> None:
        while True:
            if self.problem is not None:  # one recording at a time probes a failing store
                async with self._probe:
                    await asyncio.sleep(self._backoff)
                    if self.problem is not None:
                        await self._one(store, await self._next())
                        continue
            await self._one(store, await self._next())

    async def _one(self, store: ObjectStore, name: str) -> None:
        self._queued.discard(name)
        self.in_flight += 1
        try:
            await self.archive(store, name)
        except StoreError as exc:
            self.counters["failures"] += 1
            self._failed(str(exc))
            self._requeue(name)
        except OSError as exc:
            self.counters["local_errors"] += 1
            log.error("archive: %s cannot be uploaded: %s", name, exc)
        except Exception as exc:  # a bug or an unexpected answer: the same as an outage
            self.counters["failures"] += 1
            self._failed(describe_error(exc))
            self._requeue(name)
        finally:
            self.in_flight -= 1
            self.changed.set()
            self._sweep.set()

    def _requeue(self, name: str) -> None:
        self._backoff = min(MAX_BACKOFF, self._backoff * 2)
        self.submit(name)

    def _failed(self, problem: str) -> None:
        if self.problem is None:
            self.counters["outages"] += 1
            self.outage_since = time.time()
            log.error(
                "archive: the store %s cannot be used (%s); recordings stay local and are "
                "uploaded when it is back",
                self.settings.endpoint or "s3",
                problem,
            )
        self.problem = problem
        self.changed.set()

    def _succeeded(self) -> None:
        if self.problem is not None:
            log.warning(
                "archive: the store works again after %.0f s; %d recordings waiting",
                time.time() - (self.outage_since or time.time()),
                len(self._queue),
            )
        self.problem = None
        self.outage_since = None
        self._backoff = FIRST_BACKOFF

    # -- one recording ------------------------------------------------------------------------

    async def archive(self, store: ObjectStore, name: str) -> None:
        """Upload one recording unless it is not finished, already archived or being uploaded
        by another worker. Raises StoreError or OSError."""
        wav = self.directory / f"{name}.wav"
        try:
            fd = os.open(wav, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return  # deleted meanwhile (the API, retention): nothing to upload
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # another worker's archiver has it
            await self._archive_locked(store, name)
        finally:
            os.close(fd)  # releases the lock

    async def _archive_locked(self, store: ObjectStore, name: str) -> None:
        sidecar_path = self.directory / f"{name}.json"
        sidecar, problem = load_sidecar(sidecar_path)
        if problem is not None:
            raise OSError(problem)
        if sidecar is None or sidecar.get("state") == TapState.RECORDING:
            return  # not finished (or its final sidecar is not written yet): a later scan
        if is_archived(sidecar):
            return
        encrypted = bool(self.recipients)
        suffix = ".age" if encrypted else ""
        recording = recording_of(sidecar)
        stem = await self._stem(store, name, recording, suffix)
        record: dict[str, Any] = {"encrypted": encrypted}
        resumed = 0
        tracks: dict[str, str] = {}
        for path in retention.audio_files(self.directory, sidecar, name):
            key = store.key(stem + path.name[len(name) :] + suffix)
            done = await self._upload_audio(store, key, path, suffix, recording)
            resumed += done.resumed_bytes
            self.counters["uploaded_bytes"] += done.size - done.resumed_bytes
            if path.name == f"{name}.wav":
                record.update(url=store.url(done.key), bytes=done.size, etag=done.etag)
                if done.parts:
                    record["parts"] = done.parts
            else:
                tracks[path.name] = store.url(done.key)
        if tracks:
            record["tracks"] = tracks
        if resumed:
            record["resumed_bytes"] = resumed
            self.counters["resumed_bytes"] += resumed
        record["sidecar_url"] = store.url(store.key(f"{stem}.json{suffix}"))
        record["uploaded_at"] = retention.utc_iso(time.time())
        sidecar["archive"] = record
        body = await asyncio.to_thread(_json_bytes, sidecar)
        if encrypted:
            body = await asyncio.to_thread(encrypt_bytes, body, self.recipients)
        content_type = "application/age-encryption" if encrypted else "application/json"
        await store.put_bytes(store.key(f"{stem}.json{suffix}"), body, content_type, recording)
        # The store has it all: say so locally, durably, before anything local is deleted
        # (unless the recording was deleted meanwhile: its sidecar is not brought back).
        if not await asyncio.to_thread(sidecar_path.exists):
            return
        await asyncio.to_thread(write_json_atomic, sidecar_path, sidecar)
        self.counters["uploaded"] += 1
        self._succeeded()
        log.info("archive: %s uploaded to %s (%d bytes%s)", name, record["url"], record["bytes"],
                 f", {resumed} resumed" if resumed else "")  # fmt: skip
        if self.settings.delete_local:
            freed = await asyncio.to_thread(
                retention.delete_recording,
                self.directory,
                name,
                True,
                "archive_delete_local",
                time.time(),
            )
            if freed is not None:
                self.counters["local_deleted"] += 1
                log.info("archive: %s: local audio deleted (%d bytes)", name, freed)

    async def _stem(self, store: ObjectStore, name: str, recording: str, suffix: str) -> str:
        """The base of this recording's keys: its name, unless the store holds another
        recording's WAV or sidecar there; then its name and its start."""
        start = "".join(c for c in recording.rpartition("@")[2] if c.isalnum())
        for stem in (name, f"{name}.{start or 'x'}"):
            owners = [
                await store.owner(store.key(f"{stem}.json{suffix}")),
                await store.owner(store.key(f"{stem}.wav{suffix}")),
            ]
            if all(owner in (None, recording) for owner in owners):
                if stem != name:
                    log.warning("archive: %s: the store holds another recording of that name; "
                                "archived as %s", name, stem)  # fmt: skip
                return stem
        raise StoreError(f"{name}: the store holds other recordings under its keys")

    async def _upload_audio(
        self, store: ObjectStore, key: str, path: Path, suffix: str, recording: str
    ) -> Any:
        if not suffix:
            return await store.upload_file(key, path, "audio/wav", recording)
        work = self.directory / WORK_DIR
        work.mkdir(exist_ok=True)
        copy = work / (path.name + suffix)
        # An encrypted copy left by an interrupted upload is whole (written, then renamed): it is
        # sent again as it is, so the parts the store holds still match.
        if not copy.exists():
            await asyncio.to_thread(encrypt_to, path, copy, self.recipients)
        done = await store.upload_file(key, copy, "application/age-encryption", recording)
        with contextlib.suppress(FileNotFoundError):
            copy.unlink()
        return done

    # -- retention ----------------------------------------------------------------------------

    async def _retention_loop(self) -> None:
        """A sweep after recordings finish or are uploaded (at most one a second), and every
        RETENTION_INTERVAL (sooner for a shorter retention_max_age)."""
        age = self.settings.retention_max_age
        interval = min(RETENTION_INTERVAL, age) if age else RETENTION_INTERVAL
        while True:
            self._sweep.clear()
            try:
                await asyncio.to_thread(self.apply_retention, time.time())
            except Exception:
                log.exception("retention sweep failed")
            await asyncio.sleep(1.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._sweep.wait(), interval)

    def apply_retention(self, now: float) -> None:
        s = self.settings

        def delete(rec: retention.LocalRecording, reason: str) -> int | None:
            try:
                return retention.delete_recording(self.directory, rec.name, s.enabled, reason, now)
            except OSError as exc:
                log.error("retention: cannot delete %s: %s", rec.name, exc)
                return None

        deleted = retention.enforce(
            retention.local_recordings(self.directory),
            now,
            s.retention_max_age,
            s.retention_max_bytes,
            delete,
        )
        if deleted:
            freed = sum(n for _, n in deleted)
            self.counters["retention_deleted"] += len(deleted)
            self.counters["retention_bytes"] += freed
            log.info("retention: deleted %d recordings' audio, %d bytes (%s)", len(deleted),
                     freed, ", ".join(rec.name for rec, _ in deleted[:10]))  # fmt: skip
            self.changed.set()

    # -- status -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "state": "off" if not self.enabled else "ok" if self.problem is None else "failing",
            "problem": self.problem,
            "outage_since": retention.utc_iso(self.outage_since) if self.outage_since else None,
            "pending": len(self._queue) + self.in_flight,
            "in_flight": self.in_flight,
            **self.counters,
        }


def _json_bytes(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()
