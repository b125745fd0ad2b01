"""Inspecting recordings over HTTP: the JSON API under `/api/taps` and the page at `/`.

Same token as the taps (`Authorization: Bearer`, `?token=` or a `/t/{token}/` prefix); every
route also exists under that prefix, so a page opened at `/t/{token}/` reaches its API with
relative URLs. Directory scans, header reads and the numpy work run in a small thread pool,
never on the event loop; waveforms, spectrograms and levels are cached by file size and mtime.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from receiver.archive.listing import Archived, ArchiveListing
from receiver.archive.reader import ArchiveReader
from receiver.archive.store import StoreError
from receiver.fleet import Fleet, listing
from receiver.http.auth import Auth
from receiver.http.errors import json_error
from receiver.inspect import analysis
from receiver.inspect.catalog import STATES, Busy, Catalog, Recording, loss_percent, markers
from receiver.live.endpoint import serve_live
from receiver.live.hub import LiveHub
from receiver.storage.files import open_regular, regular_stat
from receiver.storage.sidecar import TapState, read_sidecar
from receiver.storage.wav_header import WavError, check_wav
from receiver.taps.registry import TapRegistry
from receiver.taps.tap import Tap, utc_now_iso
from receiver.taps.tap_id import NAME_RULE, is_valid_name

PAGE_DIR = Path(__file__).parent / "page"
STATIC_FILES = {"app.js", "style.css", "favicon.svg"}
ACTIONS = ("audio", "waveform", "spectrogram", "levels", "live")
CACHE_ENTRIES = 64
MAX_PAGE = 1000
WHERES = ("local", "archive")  # on this disk; only in the object store (archive_url)
_EMPTY_SUFFIX_RANGE = re.compile(r"bytes=-0+")

T = TypeVar("T")
LiveStats = Callable[[Tap], dict[str, Any] | None]  # a transport's counters of a live tap


class BadRequest(ValueError):
    """A query parameter out of range: a 400 with this message."""


def int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer") from None
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low} and {high}")
    return value


class ResultCache:
    """Bounded LRU of computed response bodies, shared by the worker threads."""

    def __init__(self, entries: int) -> None:
        self.entries = entries
        self._items: OrderedDict[tuple[object, ...], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get_or_compute(self, key: tuple[object, ...], compute: Callable[[], bytes]) -> bytes:
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                return found
        value = compute()  # outside the lock: two threads may compute the same thing once
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.entries:
                self._items.popitem(last=False)
        return value


class RecordingsApi:
    def __init__(
        self,
        recordings: Path,
        auth: Auth,
        registry: TapRegistry,
        live_stats: dict[str, LiveStats] | None = None,
        live: LiveHub | None = None,
        heartbeat: float = 30.0,
    ) -> None:
        self.auth = auth
        self.registry = registry
        self.live = live  # live listeners (GET /api/taps/{name}/live)
        self.heartbeat = heartbeat  # of their WebSockets (ws_heartbeat)
        self.live_stats = live_stats or {}  # by transport
        self.catalog = Catalog(recordings, run_started_at=utc_now_iso())
        self.cache = ResultCache(CACHE_ENTRIES)
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="inspect")
        self.archive: ArchiveReader | None = None  # archived audio whose local WAV is gone
        self.archived: ArchiveListing | None = None  # the archive's recordings, listed too
        self.fleet: Fleet | None = None  # with nats_url: the listing shows the whole fleet
        # Why a recording may not be deleted now (a call's leg waiting for its call), or None.
        self.held: Callable[[str], str | None] | None = None

    def add_routes(self, app: web.Application) -> None:
        for prefix in ("", "/t/{token}"):
            app.router.add_get(prefix + "/api/taps", self.auth.required(self.list_taps))
            # `{rest:.*}` so that bad ids (dots, encoded slashes) get a clear 400, not a 404
            app.router.add_get(prefix + "/api/taps/{rest:.*}", self.auth.required(self.get_tap))
            app.router.add_delete(
                prefix + "/api/taps/{rest:.*}", self.auth.required(self.delete_tap)
            )
            app.router.add_get(prefix + "/static/{file}", self.static)
        app.router.add_get("/", self.page)
        app.router.add_get("/t/{token}/", self.page)
        app.router.add_get("/t/{token}", self.page_with_slash)
        app.on_cleanup.append(self._close)

    async def _close(self, _: web.Application) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self.archived is not None:
            await self.archived.close()
        if self.archive is not None:
            await self.archive.close()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    # -- the page -------------------------------------------------------------------------------

    async def page(self, _: web.Request) -> web.StreamResponse:
        return web.FileResponse(PAGE_DIR / "index.html", headers=_page_headers("text/html"))

    async def page_with_slash(self, request: web.Request) -> web.StreamResponse:
        query = f"?{request.query_string}" if request.query_string else ""
        raise web.HTTPPermanentRedirect(f"{request.path}/{query}")

    async def static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["file"]
        if name not in STATIC_FILES:
            return json_error(404, "not found")
        kinds = {"js": "text/javascript", "css": "text/css", "svg": "image/svg+xml"}
        kind = kinds[name.rpartition(".")[2]]
        return web.FileResponse(PAGE_DIR / name, headers=_page_headers(kind))

    # -- the API --------------------------------------------------------------------------------

    def _active(self) -> dict[str, Tap]:
        """Active taps by file name, their per-track WAVs included (those are live files too)."""
        active: dict[str, Tap] = {}
        for tap in self.registry.active:
            if tap.name:
                active[tap.name] = tap
                if tap.sink is not None:
                    for track_name in tap.sink.info.track_names:
                        active[track_name] = tap
        return active

    def _live(self, tap: Tap) -> dict[str, Any]:
        # The transport's counters first: reading them brings the tap's buffer up to date.
        stats = self.live_stats.get(tap.transport)
        rtp = stats(tap) if stats is not None else None
        frames = tap.buffer.frames
        sink = tap.sink
        return {
            "frames": frames,
            "frames_written": sink.info.frames_written if sink is not None else 0,
            "duration_seconds": round(frames / tap.sample_rate, 3),
            "elapsed_seconds": round(time.monotonic() - tap.started_monotonic, 3),
            "rtp": rtp,
        }

    def _summary(self, recording: Recording, tap: Tap | None) -> dict[str, Any]:
        summary = recording.summary()
        if tap is not None:
            live = self._live(tap)
            summary["state"] = TapState.RECORDING
            summary["duration_seconds"] = live["duration_seconds"]
            summary["loss_percent"] = loss_percent(live["rtp"])
            if self.fleet is not None:
                summary["instance"] = self.fleet.instance
        return summary

    async def list_taps(self, request: web.Request) -> web.StreamResponse:
        """`?state=&transport=&where=&q=&limit=&offset=`: newest first. With a fleet
        (nats_url), the live taps of every instance too, each with the `instance` that holds
        it; with archive_url, the archived recordings this disk does not have (`where:
        "archive"`)."""
        try:
            limit = int_param(request, "limit", 100, 1, MAX_PAGE)
            offset = int_param(request, "offset", 0, 0, 10**9)
            states = _list_param(request, "state", STATES)
            transports = _list_param(request, "transport", None)
            wheres = _list_param(request, "where", WHERES)
        except BadRequest as exc:
            return json_error(400, str(exc))
        text = request.query.get("q", "").strip().lower()
        recordings = await self._run(self.catalog.scan)
        active = self._active()
        summaries = [self._summary(r, active.get(r.name)) for r in recordings]
        live = len(active)
        fleet_view: dict[str, Any] | None = None
        if self.fleet is not None:
            answers = listing.clean(await self.fleet.ask("taps", {}))
            summaries = listing.merge(summaries, answers, self.fleet.storage)
            live += sum(len(a["taps"]) for a in answers.answers)
            fleet_view = {
                "instance": self.fleet.instance,
                "answered": sorted(a["instance"] for a in answers.answers),
                "missing": answers.missing,
                "reachable": answers.reachable,
                "truncated": sum(a["truncated"] for a in answers.answers),
            }
        archive_view: dict[str, Any] | None = None
        if self.archived is not None:
            archived = await self.archived.recordings()
            summaries = _with_archived(summaries, archived)
            archive_view = self.archived.status()
        selected = [
            summary
            for summary in summaries
            if (not states or summary["state"] in states)
            and (not transports or summary["transport"] in transports)
            and (not wheres or summary.get("where") in wheres)
            and (not text or _matches(summary, text))
        ]
        body: dict[str, Any] = {
            "taps": selected[offset : offset + limit],
            "total": len(selected),
            "offset": offset,
            "limit": limit,
            "active": live,
            "auth": self.auth.enabled,
        }
        if fleet_view is not None:
            body["fleet"] = fleet_view
        if archive_view is not None:
            body["archive"] = archive_view
        return web.json_response(body)

    def live_summaries(self) -> list[dict[str, Any]]:
        """This instance's live taps as listing entries, for the fleet's listing."""
        summaries = []
        for tap in list(self.registry.active)[: listing.MAX_TAPS_PER_ANSWER]:
            name = tap.name or tap.tap_id
            recording = Recording(
                name, tap.describe(), TapState.RECORDING, None, None, tap.started_at
            )
            summaries.append(self._summary(recording, tap))
        return summaries

    async def get_tap(self, request: web.Request) -> web.StreamResponse:
        name, action = _split(request.match_info["rest"])
        if not is_valid_name(name):
            return json_error(400, NAME_RULE)
        try:
            if action == "live":
                return await self._listen(request, name)
            if action == "audio":
                return await self._audio(request, name)
            if action == "waveform":
                width = int_param(request, "width", 1000, 1, 10_000)
                return await self._computed(name, "waveform", (width,), "application/json")
            if action == "spectrogram":
                width = int_param(request, "width", 800, 16, 4000)
                height = int_param(request, "height", 200, 16, 1024)
                return await self._computed(name, "spectrogram", (width, height), "image/png")
            if action == "levels":
                silence = int_param(request, "silence_db", -60, -120, 0)
                return await self._computed(name, "levels", (silence,), "application/json")
        except BadRequest as exc:
            return json_error(400, str(exc))
        return await self._detail(name)

    async def _detail(self, name: str) -> web.StreamResponse:
        recording = await self._run(self.catalog.load, name)
        tap = self._active().get(name)
        if recording is None and tap is None:
            return await self._archived_detail(name)
        if recording is None:  # an active tap whose files are being created right now
            recording = Recording(
                name, None, TapState.RECORDING, 0.0, None, tap.started_at if tap else None
            )
        body = self._summary(recording, tap)
        sidecar = dict(recording.sidecar or {})
        live = None
        if tap is not None:
            live = self._live(tap)
            sidecar.update(tap.describe())
            if live["rtp"] is not None:
                sidecar["rtp"] = live["rtp"]
        body["sidecar"] = sidecar or None
        body["live"] = live
        body["markers"] = markers(sidecar)
        body["wav"] = await self._run(_wav_info, self.catalog.wav_path(name))
        return web.json_response(body)

    async def _archived_detail(self, name: str) -> web.StreamResponse:
        """A recording only the archive holds: its archived sidecar, no live figures, no WAV
        here (its audio is streamed from the store)."""
        try:
            sidecar = await self._archived_sidecar(name)
        except StoreError as exc:
            return json_error(502, f"{name}: the archive answered {exc}")
        if sidecar is None:
            return json_error(404, f"no recording {name!r}")
        body = Recording.from_archive(name, sidecar).summary()
        body.update(sidecar=sidecar, live=None, markers=markers(sidecar), wav=None)
        return web.json_response(body)

    async def _archived_sidecar(self, name: str) -> dict[str, Any] | None:
        """The archived sidecar of a recording this disk has no files of (None: none either).
        Raises StoreError."""
        if self.archived is None:
            return None
        return await self.archived.sidecar(name)

    async def _listen(self, request: web.Request, name: str) -> web.StreamResponse:
        """The live audio of a tap being recorded (receiver.live.endpoint); a per-track file's
        name gives that channel alone."""
        hub = self.live
        tap = self._active().get(name)
        if hub is None or tap is None or tap.sink is None:
            if hub is not None:
                hub.refused["not_recording"] += 1
            if await self._run(self.catalog.load, name) is None:
                return json_error(404, f"no recording {name!r}")
            return json_error(
                409, f"{name!r} is not being recorded: its audio is at /api/taps/{name}/audio"
            )
        tracks = tap.sink.info.track_names
        channel = tracks.index(name) if name != tap.name and name in tracks else None
        registry = self.registry
        return await serve_live(
            request, hub, tap, name, channel, lambda: registry.is_active(tap), self.heartbeat
        )

    async def _audio(self, request: web.Request, name: str) -> web.StreamResponse:
        path = self.catalog.wav_path(name)
        # Only a regular file, never through a link (`passwd.wav -> /etc/passwd`); a fifo
        # or a device under a recording's name is no recording either.
        try:
            fh = await self._run(open_regular, path)
        except OSError:
            if self.archive is not None and not os.path.lexists(path):
                sidecar = await self._run(read_sidecar, self.catalog.sidecar_path(name))
                if sidecar is None:  # none here: recorded elsewhere, or deleted here
                    try:
                        sidecar = await self._archived_sidecar(name)
                    except StoreError as exc:
                        return json_error(502, f"{name}: the archive answered {exc}")
                return await self.archive.audio(request, name, sidecar)
            return json_error(404, f"no recording {name!r}")
        if _EMPTY_SUFFIX_RANGE.fullmatch(request.headers.get("Range", "")):
            # "the last 0 bytes" can never be satisfied (RFC 9110 14.1.2); aiohttp reads it as
            # "from byte 0" and sends the whole file as a 206
            with fh:
                size = os.fstat(fh.fileno()).st_size
            answer = json_error(416, "the range bytes=-0 selects no byte")
            answer.headers["Content-Range"] = f"bytes */{size}"
            return answer
        headers = {"Content-Type": "audio/wav", "Cache-Control": "no-cache"}
        if request.query.get("download"):
            headers["Content-Disposition"] = f'attachment; filename="{name}.wav"'
        return OpenedFileResponse(fh, path, headers)

    async def _computed(
        self, name: str, kind: str, params: tuple[int, ...], content_type: str
    ) -> web.StreamResponse:
        path = self.catalog.wav_path(name)
        try:
            body = await self._run(self._compute, path, kind, params)
        except FileNotFoundError:
            return json_error(404, f"no recording {name!r}")
        except (OSError, WavError) as exc:
            return json_error(422, f"cannot read {path.name}: {exc}")
        return web.Response(
            body=body, content_type=content_type, headers={"Cache-Control": "no-cache"}
        )

    def _compute(self, path: Path, kind: str, params: tuple[int, ...]) -> bytes:
        """In a worker thread: the cached body, or compute it from the file as it is now."""
        st = regular_stat(path)
        if st is None:
            raise FileNotFoundError(path.name)
        key = (path.name, st.st_size, st.st_mtime_ns, kind, *params)
        return self.cache.get_or_compute(key, lambda: _render(path, kind, params))

    async def delete_tap(self, request: web.Request) -> web.StreamResponse:
        name, action = _split(request.match_info["rest"])
        if not is_valid_name(name):
            return json_error(400, NAME_RULE)
        if action:
            return json_error(405, "only a recording itself can be deleted")
        if name in self._active():
            return json_error(409, f"{name!r} is being recorded; delete it when it has finished")
        recording = await self._run(self.catalog.load, name)
        if recording is None:
            return json_error(404, f"no recording {name!r}")
        if (
            recording.state == TapState.RECORDING
        ):  # finished a moment ago; its sidecar is on its way
            return json_error(409, f"{name!r} is being finalized; try again in a moment")
        held = self.held(name) if self.held is not None else None
        if held is not None:
            return json_error(409, held)
        try:
            removed = await self._run(self.catalog.delete, name)
        except Busy as exc:
            return json_error(409, str(exc))
        return web.json_response({"deleted": name, "files": removed})


class OpenedFileResponse(web.FileResponse):
    """aiohttp's FileResponse (Range and 206, If-Range, ETag and 304, sendfile off the loop) of
    a file already opened without following a link: it opens a path, so it is given the open
    file's /proc/self/fd/N, which names that file whatever is put under the recording's name
    meanwhile (elsewhere than on Linux, the path itself). The file is closed once sent."""

    def __init__(self, fh: BinaryIO, path: Path, headers: dict[str, str]) -> None:
        opened = Path(f"/proc/self/fd/{fh.fileno()}")
        super().__init__(opened if opened.exists() else path, headers=headers)
        self._opened = fh

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        try:
            return await super().prepare(request)
        finally:
            self._opened.close()


def _render(path: Path, kind: str, params: tuple[int, ...]) -> bytes:
    audio = analysis.open_audio(path)
    if kind == "spectrogram":
        return analysis.spectrogram_png(audio, params[0], params[1])
    if kind == "levels":
        levels = analysis.measure_levels(audio, float(params[0]))
        return json.dumps({"name": path.stem, **levels.to_dict()}).encode()
    lows, highs = analysis.waveform_peaks(audio, params[0])
    return json.dumps(
        {
            "name": path.stem,
            "frames": audio.frames,
            "sample_rate": audio.sample_rate,
            "channels": audio.channels,
            "duration_seconds": round(audio.duration, 6),
            "columns": int(lows.shape[1]),
            "min": lows.tolist(),
            "max": highs.tolist(),
        },
        separators=(",", ":"),
    ).encode()


def _wav_info(path: Path) -> dict[str, Any] | None:
    try:
        plan = check_wav(path)
    except OSError:
        return None
    layout = plan.layout
    return {
        "file": path.name,
        "size_bytes": plan.file_size,
        "format": layout.format_name if layout else None,
        "frames": plan.frames,
        "data_offset": layout.data_offset if layout else None,
        "header_matches_data": plan.problem is None and not plan.needed,
        "problem": plan.problem,
    }


def _with_archived(
    summaries: list[dict[str, Any]], archived: list[Archived]
) -> list[dict[str, Any]]:
    """The listing with the archive's recordings that it does not have (by name, or by where it
    archived them: a recording this disk still has is listed once, as local), newest first."""
    names = {summary["name"] for summary in summaries}
    urls = {summary.get("archive_url") for summary in summaries} - {None}
    added = [
        Recording.from_archive(a.name, a.sidecar).summary()
        for a in archived
        if a.name not in names and (a.sidecar.get("archive") or {}).get("url") not in urls
    ]
    if not added:
        return summaries
    merged = summaries + added
    merged.sort(key=lambda s: (str(s.get("started_at") or ""), str(s.get("name"))), reverse=True)
    return merged


def _split(rest: str) -> tuple[str, str | None]:
    """`call-1/waveform` -> ("call-1", "waveform"); `call-1` -> ("call-1", None)."""
    head, _, tail = rest.rpartition("/")
    if head and tail in ACTIONS:
        return head, tail
    return rest, None


def _matches(summary: dict[str, Any], text: str) -> bool:
    """`?q=`: in the name, tap id, remote address or codec (any case)."""
    fields = (
        summary.get("name"),
        summary.get("tap_id"),
        summary.get("remote"),
        summary.get("codec"),
    )
    return any(text in str(f).lower() for f in fields if f)


def _list_param(request: web.Request, name: str, allowed: tuple[str, ...] | None) -> set[str]:
    """A comma-separated filter (`state=finished,failed`); empty means no filter."""
    values = {v.strip() for v in request.query.get(name, "").split(",") if v.strip()}
    for value in values:
        if allowed is not None and value not in allowed:
            raise BadRequest(f"{name} must be one of {', '.join(allowed)}")
        if not value.replace("_", "").isalnum() or len(value) > 32:
            raise BadRequest(f"bad {name} {value[:40]!r}")
    return values


def _page_headers(content_type: str) -> dict[str, str]:
    return {
        "Content-Type": f"{content_type}; charset=utf-8",
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",  # the page URL may carry the token
    }
