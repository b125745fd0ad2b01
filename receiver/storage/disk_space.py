"""Free space on the recordings disk (the `min_free_space` floor is checked against it)."""

from __future__ import annotations

import os


def free_bytes(directory: os.PathLike[str] | str) -> int:
    stats = os.statvfs(directory)
    return stats.f_bavail * stats.f_frsize
