"""Retention: keep the local recordings within `retention_max_age` and `retention_max_bytes`.

Oldest first (by the WAV's last change), and never a recording in progress (its sidecar says
`recording`, or it has none yet) nor, when archiving is on, one the store has not confirmed.
With archiving on, the audio files go and the sidecar stays (it says where the audio is, and it
keeps the name taken, so a later tap with the same id never overwrites the archived object);
without it the whole recording goes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from receiver.storage.sidecar import TapState, load_sidecar, write_json_atomic


@dataclass(frozen=True, slots=True)
class LocalRecording:
    name: str  # file base name: <name>.wav, <name>.json
    mtime: float
    size: int  # bytes of its WAV


def enforce(
    recordings: Iterable[LocalRecording],
    now: float,
    max_age: float,
    max_bytes: int,
    delete: Callable[[LocalRecording, str], int | None],
) -> list[tuple[LocalRecording, int]]:
    """Delete, oldest first, the recordings older than `max_age`, then as many more as bring
    the total under `max_bytes` (0: no such limit). `delete(recording, reason)` returns the
    bytes it freed, or None when that recording may not go (it is kept and still counts).
    Returns what was deleted and what each freed."""
    ordered = sorted(recordings, key=lambda r: (r.mtime, r.name))
    total = sum(r.size for r in ordered)
    deleted = []
    for rec in ordered:
        too_old = max_age > 0 and now - rec.mtime > max_age
        too_much = max_bytes > 0 and total > max_bytes
        if not (too_old or too_much):
            break  # the next ones are younger, and the total only goes down
        freed = delete(rec, "retention_max_age" if too_old else "retention_max_bytes")
        if freed is not None:
            total -= freed
            deleted.append((rec, freed))
    return deleted


def local_recordings(directory: Path) -> list[LocalRecording]:
    """Every `<name>.wav` with its size and age (no sidecar is read here)."""
    found = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith(".") or not entry.name.endswith(".wav"):
                continue
            with contextlib.suppress(OSError):
                st = entry.stat(follow_symlinks=False)
                if entry.is_file(follow_symlinks=False):
                    found.append(LocalRecording(entry.name[:-4], st.st_mtime, st.st_size))
    return found


def utc_iso(ts: float) -> str:
    stamp = datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def audio_files(directory: Path, sidecar: dict[str, Any], name: str) -> list[Path]:
    """The recording's WAV and its per-track WAVs (names without a path only)."""
    files = [directory / f"{name}.wav"]
    tracks = sidecar.get("track_files")
    if isinstance(tracks, dict):
        files += [directory / str(f) for f in tracks.values() if "/" not in str(f)]
    return files


def delete_recording(
    directory: Path, name: str, archived: bool, reason: str, now: float
) -> int | None:
    """Delete one finished recording's audio (and, when `archived` is False, its sidecar).
    Returns the bytes freed, or None when it turned out not to be deletable (in progress, no
    sidecar, or not archived although it should be)."""
    sidecar_path = directory / f"{name}.json"
    sidecar, _problem = load_sidecar(sidecar_path)
    if sidecar is None or sidecar.get("state") == TapState.RECORDING:
        return None
    archive = sidecar.get("archive")
    if archived and not (isinstance(archive, dict) and archive.get("uploaded_at")):
        return None
    freed = 0
    for path in audio_files(directory, sidecar, name):
        with contextlib.suppress(FileNotFoundError):
            freed += path.lstat().st_size
            path.unlink()
    if archived:
        assert isinstance(archive, dict)
        archive["local_deleted_at"] = utc_iso(now)
        archive["local_deleted_because"] = reason
        write_json_atomic(sidecar_path, sidecar)
    else:
        sidecar_path.unlink(missing_ok=True)
    return freed
