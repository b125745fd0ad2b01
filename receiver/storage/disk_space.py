"""Free space on the recordings disk (the `min_free_space` floor is checked against it), and
whether a file can be created there at all."""

from __future__ import annotations

import os
import tempfile


def free_bytes(directory: os.PathLike[str] | str) -> int:
    stats = os.statvfs(directory)
    return stats.f_bavail * stats.f_frsize


def unwritable_reason(directory: os.PathLike[str] | str) -> str | None:
    """None if a file can be created in `directory`, else why not in the system's words
    (`Read-only file system`, `Permission denied`). Creates an unnamed file (O_TMPFILE where
    the system has it): nothing is left behind, nothing is seen by a reader of the directory."""
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        return exc.strerror or str(exc)
    return None
