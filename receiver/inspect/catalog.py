"""The recordings directory as a catalog: one entry per sidecar (or stray WAV), summarised for
listing, with the sidecar's events turned into markers on the file's timeline.

Synchronous file reads: on the event loop, call `Catalog.scan` and friends in an executor.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from receiver.redaction import redact
from receiver.storage.files import regular_stat
from receiver.storage.sidecar import TapState, load_sidecar, read_sidecar
from receiver.storage.wav_header import WavError, frames_on_disk
from receiver.taps.tap_id import is_valid_name

STATES = tuple(state.value for state in TapState)


@dataclass(slots=True)
class Recording:
    name: str  # file base name: `<name>.wav`, `<name>.json`
    sidecar: dict[str, Any] | None
    state: str
    duration_seconds: float | None
    size_bytes: int | None  # of the WAV; None when it is gone
    started_at: str | None
    problem: str | None = None  # why its sidecar (or the entry) could not be read
    where: str = "local"  # "archive": only in the object store (receiver.archive.listing)

    @classmethod
    def from_archive(cls, name: str, sidecar: dict[str, Any]) -> Recording:
        """A recording the archive holds and this machine's disk does not: all from its
        archived sidecar (its size is the archived WAV's)."""
        archive = sidecar.get("archive")
        size = _number(archive.get("bytes")) if isinstance(archive, dict) else None
        return cls(
            name=name,
            sidecar=sidecar,
            state=_text(sidecar.get("state")) or TapState.UNKNOWN,
            duration_seconds=_number(sidecar.get("duration_seconds")),
            size_bytes=int(size) if size is not None else None,
            started_at=_text(sidecar.get("started_at")),
            where="archive",
        )

    @property
    def loss_percent(self) -> float | None:
        return loss_percent((self.sidecar or {}).get("rtp"))

    def summary(self) -> dict[str, Any]:
        side = self.sidecar or {}
        summary = {
            "name": self.name,
            "tap_id": side.get("tap_id", self.name),
            "transport": side.get("transport"),
            "codec": side.get("codec"),
            "sample_rate": side.get("sample_rate"),
            "channels": side.get("channels"),
            "channel_names": channel_names(side),
            "remote": side.get("remote"),
            "state": self.state,
            "started_at": self.started_at,
            "ended_at": side.get("ended_at"),
            "duration_seconds": self.duration_seconds,
            "size_bytes": self.size_bytes,
            "loss_percent": self.loss_percent,
            "archive_url": _archive_url(side),
            "where": self.where,
        }
        if self.problem is not None:
            summary["problem"] = self.problem
        return summary


def _archive_url(sidecar: dict[str, Any]) -> str | None:
    """Where the object store has the audio (receiver.archive), once it confirmed the upload."""
    archive = sidecar.get("archive")
    if isinstance(archive, dict) and archive.get("uploaded_at") and archive.get("url"):
        return str(archive["url"])
    return None


MAX_CHANNEL_NAME = 32


def channel_names(sidecar: dict[str, Any]) -> list[str] | None:
    """What each channel carries (`inbound`, `outbound`; `caller`, `callee`), from the sidecar's
    `channel_names`, or for Media Streams recordings made before it, from their `tracks`."""
    channels = sidecar.get("channels")
    names = sidecar.get("channel_names")
    tracks = sidecar.get("tracks")
    if not isinstance(names, list) and isinstance(tracks, dict):
        names = list(tracks) if sidecar.get("dialect") == "media-streams" else None
    if not names or len(names) != channels or not all(isinstance(n, str) for n in names):
        return None
    return [n[:MAX_CHANNEL_NAME] for n in names]


def loss_percent(rtp: Any) -> float | None:
    """Packets lost as a share of packets expected (received + lost); None without RTP stats
    (or with counters that are not numbers: a sidecar is a file anyone may have edited)."""
    if not rtp or not isinstance(rtp, dict):
        return None
    lost, received = _number(rtp.get("lost", 0)), _number(rtp.get("received", 0))
    if lost is None or received is None:
        return None
    expected = lost + received
    return round(100.0 * lost / expected, 2) if expected else 0.0


def _number(value: Any) -> float | None:
    """A JSON number as such (not a bool, not NaN or infinite), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value if math.isfinite(value) else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _items(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def wav_duration(path: Path) -> float | None:
    """Seconds of audio actually in the file (the header may lag behind a file being written)."""
    try:
        layout, frames = frames_on_disk(path)
    except (OSError, WavError):
        return None
    return round(frames / layout.sample_rate, 6) if layout.sample_rate else None


def markers(sidecar: dict[str, Any]) -> list[dict[str, Any]]:
    """Points (and DTMF spans) on the file's timeline, in seconds, sorted by time: DTMF digits,
    discontinuities, SSRC changes, timestamp jumps. From `events`, completed by `rtp.dtmf` and
    `rtp.discontinuities` (the same records, when both are there)."""
    found: dict[tuple[str, float], dict[str, Any]] = {}
    rtp = sidecar.get("rtp")
    rtp = rtp if isinstance(rtp, dict) else {}
    sources = [
        *_items(sidecar.get("events")),
        *({"type": "dtmf", **e} for e in _items(rtp.get("dtmf")) if isinstance(e, dict)),
        *(
            {"type": "discontinuity", **e}
            for e in _items(rtp.get("discontinuities"))
            if isinstance(e, dict)
        ),
    ]
    for event in sources:
        if not isinstance(event, dict):
            continue
        kind = str(event.get("type", "event"))[:64]
        at = _number(event.get("start", event.get("at")))
        if at is None:
            continue
        marker: dict[str, Any] = {"type": kind, "at": round(float(at), 6)}
        if kind == "dtmf":
            marker["label"] = str(event.get("digit", "?"))[:16]
            marker["duration"] = _number(event.get("duration", 0)) or 0
        elif kind == "discontinuity":
            marker["label"] = f"gap {_number(event.get('skipped', 0)) or 0:.1f} s"
        elif kind == "ssrc_change":
            marker["label"] = f"SSRC {str(event.get('to', ''))[:16]}".strip()
        elif kind == "timestamp_jump":
            marker["label"] = f"jump {_number(event.get('jump', 0)) or 0:+.2f} s"
        else:
            marker["label"] = kind.replace("_", " ")
        found.setdefault((kind, marker["at"]), marker)
    return sorted(found.values(), key=lambda m: (m["at"], m["type"]))


def _mtime_iso(path: Path) -> str | None:
    st = regular_stat(path)
    if st is None:
        return None
    stamp = st.st_mtime
    moment = datetime.fromtimestamp(stamp, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _stat_key(path: Path) -> tuple[int, int] | None:
    """Only regular files count: a link (`passwd.wav -> /etc/passwd`), a fifo or a directory
    under a recording's name is not a recording."""
    st = regular_stat(path)
    return None if st is None else (st.st_mtime_ns, st.st_size)


def _is_regular(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_file(follow_symlinks=False)
    except OSError:
        return False


class Catalog:
    """Recordings in one directory. `scan` re-reads only entries whose files changed."""

    def __init__(self, directory: Path, run_started_at: str | None = None) -> None:
        self.directory = directory
        # sidecars that say "recording" and started before this run are interrupted recordings
        self.run_started_at = run_started_at
        self._cache: dict[str, tuple[object, Recording]] = {}
        self._lock = threading.Lock()  # scans may run in several executor threads

    def wav_path(self, name: str) -> Path:
        return self.directory / f"{name}.wav"

    def sidecar_path(self, name: str) -> Path:
        return self.directory / f"{name}.json"

    def _names(self) -> tuple[set[str], set[str]]:
        sidecars: set[str] = set()
        wavs: set[str] = set()
        try:
            entries = list(os.scandir(self.directory))
        except OSError:
            return sidecars, wavs
        for entry in entries:
            stem, dot, ext = entry.name.rpartition(".")
            if dot and is_valid_name(stem) and _is_regular(entry):
                if ext == "json":
                    sidecars.add(stem)
                elif ext == "wav":
                    wavs.add(stem)
        return sidecars, wavs

    def load(self, name: str) -> Recording | None:
        """One entry, read now (None if neither file exists)."""
        wav, side = self.wav_path(name), self.sidecar_path(name)
        key = (_stat_key(side), _stat_key(wav))
        if key == (None, None):
            return None
        with self._lock:
            cached = self._cache.get(name)
        if cached is not None and cached[0] == key:
            return cached[1]
        sidecar, problem = load_sidecar(side) if key[0] is not None else (None, None)
        if sidecar is not None:  # one written before tokens were redacted serves none either
            sidecar = redact(sidecar)
        # A sidecar is a file anyone may have edited: a field of the wrong type is no field.
        state = (_text(sidecar.get("state")) if sidecar else None) or TapState.UNKNOWN
        started = _text(sidecar.get("started_at")) if sidecar else None
        if (
            state == TapState.RECORDING
            and self.run_started_at
            and (started or "") < self.run_started_at
        ):
            state = TapState.INTERRUPTED
        duration = _number(sidecar.get("duration_seconds")) if sidecar else None
        if duration is None or state in (
            TapState.RECORDING,
            TapState.INTERRUPTED,
        ):
            duration = wav_duration(wav) if key[1] is not None else None
        recording = Recording(
            name=name,
            sidecar=sidecar,
            state=state,
            duration_seconds=duration,
            size_bytes=key[1][1] if key[1] is not None else None,
            started_at=started or _mtime_iso(wav),
            problem=problem,
        )
        with self._lock:
            self._cache[name] = (key, recording)
        return recording

    def _load_listed(self, name: str) -> Recording | None:
        """`load`, for a listing: whatever goes wrong with one entry is said in its `problem`,
        and the others are listed."""
        try:
            return self.load(name)
        except Exception as exc:
            problem = f"cannot read it: {type(exc).__name__}: {exc}"
            return Recording(name, None, TapState.UNKNOWN, None, None, None, problem)

    def scan(self) -> list[Recording]:
        """Every recording, newest first. WAVs named in a sidecar's `track_files` belong to
        that recording and are not listed on their own."""
        sidecars, wavs = self._names()
        found = [r for r in (self._load_listed(name) for name in sidecars) if r is not None]
        owned: set[str] = set()
        for recording in found:
            tracks = (recording.sidecar or {}).get("track_files") or {}
            if isinstance(tracks, dict):
                owned.update(str(f).removesuffix(".wav") for f in tracks.values())
        for name in wavs - sidecars - owned:
            stray = self._load_listed(name)
            if stray is not None:
                found.append(stray)
        with self._lock:
            for gone in set(self._cache) - sidecars - wavs:
                del self._cache[gone]
        found.sort(key=lambda r: (r.started_at or "", r.name), reverse=True)
        return found

    def delete(self, name: str) -> list[str]:
        """Remove a recording's files (WAV, sidecar, per-track WAVs); returns the names removed.
        The WAV goes first: while its sidecar exists, a new tap cannot take the name."""
        sidecar = read_sidecar(self.sidecar_path(name)) or {}
        tracks = sidecar.get("track_files") or {}
        paths = [self.wav_path(name)]
        if isinstance(tracks, dict):
            paths += [
                self.directory / str(f)
                for f in tracks.values()
                if str(f).endswith(".wav") and is_valid_name(str(f)[:-4])
            ]
        paths.append(self.sidecar_path(name))
        removed = []
        with _unless_locked(self.wav_path(name)):
            for path in paths:
                try:
                    path.unlink()
                except FileNotFoundError:
                    continue
                removed.append(path.name)
        with self._lock:
            self._cache.pop(name, None)
        return removed


class Busy(Exception):
    """The recording's WAV is locked by the archiver (an upload in progress)."""


@contextlib.contextmanager
def _unless_locked(wav: Path) -> Iterator[None]:
    """Hold the WAV's lock (flock, as the archiver takes it for an upload) while its files are
    deleted: an upload is never cut short, and never finishes by name into a newer recording
    that took the name meanwhile. Raises Busy when the archiver has it."""
    try:
        fd = os.open(wav, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        yield  # no WAV (already gone, or never written): nothing to upload either
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(
                f"{wav.stem!r} is being uploaded to the archive; try again in a moment"
            ) from None
        yield
    finally:
        os.close(fd)
