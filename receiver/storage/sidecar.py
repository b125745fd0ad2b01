"""The sidecar: `<name>.json` next to each WAV, and the one place its states are named.

Who writes which fields:
- the tap (`receiver.taps.tap.Tap.describe`, on the event loop): `tap_id`, `transport`, `codec`,
  `sample_rate`, `channels`, `remote`, `state` (`recording`, or `failed` when the tap knows),
  `started_at`, `ended_at`, `end_reason`, `counters`, `events` and its transport's fields
  (`rtp`, `stream`, `tracks`, `dialect`, `signalwire`, `close_code`, ...);
- the disk writer (`receiver.storage.writer`): `file`, `track_files`, `frames_written`,
  `duration_seconds`, `worker`, `codec_mismatch` (G.711 of the other law, likely:
  `receiver.codecs.law_check`), and the final `state` (`finished`, or `failed` with `error`);
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

import orjson

from receiver.storage.files import open_regular

#: Deepest JSON nesting a text frame may have. Real messages nest 3 levels; much deeper ones
#: would make the sidecar's encoder (and repr) exceed Python's recursion limit.
MAX_JSON_DEPTH = 32
#: A sidecar holds at most MAX_JSON_DEPTH levels of a sender's data under a few of its own.
MAX_SIDECAR_DEPTH = 64
#: Real sidecars are a few KiB (events are capped at 1 000 per tap); reading stops past this.
MAX_SIDECAR_BYTES = 8 << 20


def too_deep(value: object, limit: int = MAX_JSON_DEPTH) -> bool:
    """True if a parsed JSON value nests containers deeper than `limit` (iterative: no recursion
    on hostile input)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = (
            item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        )
        if children and depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


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
        # Whatever is under the temporary name (left by a crash, or a link planted there) is
        # removed, not written through: O_EXCL creates a new file or fails.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with open(fd, "w", encoding="utf-8") as fh:
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
        with (
            open_regular(path, write=True) as raw,
            open(raw.fileno(), "w", encoding="utf-8", closefd=False) as fh,
        ):
            fh.write(text)
            fh.truncate()
            fh.flush()
            os.fsync(fh.fileno())


def write_json_new(path: Path, data: dict[str, Any]) -> None:
    """A tap's first sidecar, written in place (one file creation, where write_json_atomic makes
    two): a reader may meet it empty for an instant, which `read_sidecar` takes for no sidecar,
    as it does one that a power cut left empty (recovery then rebuilds it from the WAV)."""
    text = (json.dumps(data, indent=2) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, text)
    finally:
        os.close(fd)


def load_sidecar(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The sidecar as a dict, or None and why not (None and None: there is no sidecar). Only a
    regular file is read (a link is not followed, a fifo not waited on), up to MAX_SIDECAR_BYTES,
    nested at most MAX_SIDECAR_DEPTH deep: what the API and the command line serve from it
    must encode again without hitting Python's recursion limit."""
    try:
        with open_regular(path) as fh:
            raw = fh.read(MAX_SIDECAR_BYTES + 1)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"cannot read {path.name}: {exc.strerror or exc}"
    return parse_sidecar(raw, path.name)


def parse_sidecar(raw: bytes, label: str) -> tuple[dict[str, Any] | None, str | None]:
    """A sidecar's bytes (a file's, an archived object's) as a dict, or None and why not."""
    if len(raw) > MAX_SIDECAR_BYTES:
        return None, f"{label} is larger than {MAX_SIDECAR_BYTES} bytes"
    try:
        data = orjson.loads(raw)  # no recursion; refuses nesting past 1024 levels
    except orjson.JSONDecodeError as exc:
        try:  # what json.dumps may write and orjson refuses: NaN, integers past 64 bits
            data = json.loads(raw)
        except (ValueError, RecursionError):
            return None, f"{label} is not valid JSON: {exc}"
    if not isinstance(data, dict):
        return None, f"{label} is not a JSON object"
    if too_deep(data, MAX_SIDECAR_DEPTH):
        return None, f"{label} nests JSON deeper than {MAX_SIDECAR_DEPTH} levels"
    return data, None


def read_sidecar(path: Path) -> dict[str, Any] | None:
    """The sidecar as a dict, or None if it is missing, unreadable or not a JSON object."""
    return load_sidecar(path)[0]
