"""The sidecar: `<name>.json` next to each WAV, and the one place its states are named.

Who writes which fields:
- the tap (`receiver.taps.tap.Tap.describe`, on the event loop): `tap_id`, `transport`, `codec`,
  `sample_rate`, `channels`, `remote`, `state` (`recording`, or `failed` when the tap knows),
  `started_at`, `ended_at`, `end_reason`, `counters`, `events` and its transport's fields
  (`rtp`, `stream`, `tracks`, `dialect`, `signalwire`, `close_code`, ...);
- the disk writer (`receiver.storage.writer`): `file`, `track_files`, `frames_written`,
  `duration_seconds`, `worker`, and the final `state` (`finished`, or `failed` with `error`);
- crash recovery (`receiver.storage.recovery`): `recovered`, `header_repairs`, and the final
  state of what a dead process left `recording`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from enum import StrEnum
from pathlib import Path
from typing import Any


class TapState(StrEnum):
    RECORDING = "recording"
    FINISHED = "finished"
    FAILED = "failed"
    # Only in listings, never written: a sidecar that says `recording` although the server
    # that wrote it is gone; a WAV without a sidecar.
    INTERRUPTED = "interrupted"
    UNKNOWN = "unknown"


def write_json_atomic(path: Path, data: dict[str, Any], durable: bool = True) -> None:
    """Write JSON next to `path` and rename it into place: readers never see half a file.

    `durable` fsyncs it before the rename. A tap's sidecars skip that (the disk writer's): an
    fsync costs milliseconds, and a sidecar lost or left empty by a power cut is rebuilt by
    recovery from its WAV like a missing one; recovery's own are durable.

    On a full disk the temporary file cannot be written; then the existing file is rewritten in
    place (its blocks are already allocated), so a failed tap can still say why it failed.
    """
    text = json.dumps(data, indent=2) + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write(text)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if exc.errno != errno.ENOSPC or not path.exists():
            raise
        with path.open("r+", encoding="utf-8") as fh:
            fh.write(text)
            fh.truncate()
            fh.flush()
            os.fsync(fh.fileno())


def write_json_new(path: Path, data: dict[str, Any]) -> None:
    """A tap's first sidecar, written in place (one file creation, where write_json_atomic makes
    two): a reader may meet it empty for an instant, which `read_sidecar` takes for no sidecar,
    as it does one that a power cut left empty (recovery then rebuilds it from the WAV)."""
    text = (json.dumps(data, indent=2) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, text)
    finally:
        os.close(fd)


def read_sidecar(path: Path) -> dict[str, Any] | None:
    """The sidecar as a dict, or None if it is missing, unreadable or not a JSON object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None
