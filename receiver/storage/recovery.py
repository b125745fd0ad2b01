"""Crash recovery at start-up: recordings whose sidecar still says `recording` were left by a
process that died (kill -9, power loss). Their WAV header is made to match the data on disk and
the sidecar is finalized as `finished` with `recovered: true`.

Runs once per start, in the background once the server listens (a directory of thousands of
interrupted recordings must not keep it from taking new taps): it touches only files last
changed before `before`, the moment the server started, so the files of new taps are never
taken for interrupted ones; and a new tap is never named over one being recovered, since a name
whose sidecar or WAV exists is never reused.
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from receiver.storage.files import regular_stat
from receiver.storage.sidecar import TapState, load_sidecar, read_sidecar, write_json_atomic
from receiver.storage.wav_header import repair_wav

log = logging.getLogger("receiver.recovery")


def recover_one(sidecar_path: Path) -> dict[str, Any] | None:
    """Finalize one interrupted recording; returns its new sidecar (None if not interrupted).
    Raises ValueError for a sidecar that cannot be read."""
    sidecar, problem = load_sidecar(sidecar_path)
    if problem is not None:
        raise ValueError(problem)
    if sidecar is None or sidecar.get("state") != TapState.RECORDING:
        return None
    wav = sidecar_path.with_suffix(".wav")
    st = regular_stat(wav)
    if st is None:
        missing = "is missing" if not os.path.lexists(wav) else "is not a regular file"
        sidecar.update(state=TapState.FAILED, error=f"recovered after a crash: the WAV {missing}")
        sidecar["recovered"] = True
        write_json_atomic(sidecar_path, sidecar)
        return sidecar
    plan = repair_wav(wav)
    tracks = sidecar.get("track_files")
    if isinstance(tracks, dict):  # per-track WAVs were being written as well
        for name in tracks.values():
            track_wav = sidecar_path.parent / str(name)
            if "/" not in str(name) and regular_stat(track_wav) is not None:
                repair_wav(track_wav)
    if plan.problem is not None:
        sidecar.update(state=TapState.FAILED, error=f"recovered after a crash: {plan.problem}")
    else:
        rate = sidecar.get("sample_rate")
        if not isinstance(rate, int) or rate <= 0:  # the header's, if the sidecar's is no rate
            rate = plan.layout.sample_rate if plan.layout and plan.layout.sample_rate else 8000
        sidecar["state"] = TapState.FINISHED
        sidecar["frames_written"] = plan.frames
        sidecar["duration_seconds"] = round(plan.frames / rate, 6)
        sidecar["header_repairs"] = plan.describe()
    modified = datetime.fromtimestamp(st.st_mtime, UTC)
    sidecar["ended_at"] = modified.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    sidecar["end_reason"] = "recovered after a crash"
    sidecar["recovered"] = True
    write_json_atomic(sidecar_path, sidecar)
    return sidecar


def adopt_orphan(wav: Path) -> dict[str, Any]:
    """A WAV without a sidecar (the process died between creating one and writing the other):
    repair its header and give it a sidecar saying what is known."""
    plan = repair_wav(wav)
    modified = datetime.fromtimestamp(os.lstat(wav).st_mtime, UTC)
    sidecar: dict[str, Any] = {
        "tap_id": wav.stem,
        "file": wav.name,
        "state": TapState.FINISHED if plan.problem is None else TapState.FAILED,
        "ended_at": modified.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "end_reason": "recovered after a crash (the sidecar was never written)",
        "recovered": True,
    }
    if plan.problem is None and plan.layout is not None:
        sidecar.update(
            sample_rate=plan.layout.sample_rate,
            channels=plan.layout.channels,
            frames_written=plan.frames,
            duration_seconds=round(plan.frames / plan.layout.sample_rate, 6),
            header_repairs=plan.describe(),
        )
    else:
        sidecar["error"] = f"recovered after a crash: {plan.problem}"
    write_json_atomic(wav.with_suffix(".json"), sidecar)
    return sidecar


def _orphans(recordings: Path) -> list[Path]:
    """WAVs that no sidecar names (per-track WAVs are named by their recording's sidecar). A
    sidecar that cannot be read counts as missing: a tap's first sidecar is not fsynced, so a
    power cut can leave it empty."""
    named: set[str] = set()
    readable: set[str] = set()  # sidecars that parse: every other WAV has none to speak of
    for sidecar_path in recordings.glob("*.json"):
        sidecar = read_sidecar(sidecar_path)
        if sidecar is not None:
            readable.add(sidecar_path.name)
            named.add(str(sidecar.get("file") or sidecar_path.with_suffix(".wav").name))
            tracks = sidecar.get("track_files")
            if isinstance(tracks, dict):
                named.update(str(name) for name in tracks.values())
    return [
        wav
        for wav in _regular_files(recordings, "*.wav")
        if wav.name not in named and wav.with_suffix(".json").name not in readable
    ]


LOG_EACH = 100  # recovered recordings logged one by one; beyond that, one summary line


def _older(path: Path, before: float | None) -> bool:
    try:
        return before is None or path.lstat().st_mtime < before
    except OSError:
        return False


def _regular_files(recordings: Path, pattern: str) -> list[Path]:
    """The directory's regular files matching `pattern`, hidden ones left out. Anything else
    under such a name (a link, a fifo, a directory) is logged and left alone: recovery never
    follows a link out of the directory, nor waits on a fifo."""
    found = []
    for path in sorted(recordings.glob(pattern)):
        if path.name.startswith("."):
            continue
        if regular_stat(path) is None:
            log.warning("recovery skips %s: not a regular file", path.name)
            continue
        found.append(path)
    return found


def _skip(path: Path, exc: Exception) -> None:
    """One line, no traceback: a file recovery cannot handle is left as it is, and the server
    starts anyway (whatever is in the directory, it must not keep the others from recording)."""
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    log.error("could not recover %s, left as it is: %s: %s", path.name, type(exc).__name__,
              detail)  # fmt: skip


def recover(recordings: Path, before: float | None = None) -> list[dict[str, Any]]:
    """Finalize every interrupted recording in the directory (files changed before `before`,
    a time.time(), if given), each file on its own; log what was done and what was skipped."""
    recovered = []
    for wav in [w for w in _orphans(recordings) if _older(w, before)]:
        try:
            adopted = adopt_orphan(wav)
        except Exception as exc:
            _skip(wav, exc)
            continue
        recovered.append(adopted)
        if len(recovered) <= LOG_EACH:
            log.warning("recovered %s after a crash: it had no sidecar; now %s", wav.name,
                        adopted["state"])  # fmt: skip
    for sidecar_path in _regular_files(recordings, "*.json"):
        if not _older(sidecar_path, before):
            continue
        try:
            result = recover_one(sidecar_path)
        except Exception as exc:
            _skip(sidecar_path, exc)
            continue
        if result is not None:
            recovered.append(result)
            if len(recovered) > LOG_EACH:
                continue
            log.warning(
                "recovered %s after a crash: %s, %s frames%s",
                result.get("file") or sidecar_path.with_suffix(".wav").name,
                result["state"],
                result.get("frames_written"),
                f" ({'; '.join(result['header_repairs'])})" if result.get("header_repairs") else "",
            )
    if len(recovered) > LOG_EACH:
        log.warning("recovered %d recordings after a crash (the first %d are logged above)",
                    len(recovered), LOG_EACH)  # fmt: skip
    return recovered
