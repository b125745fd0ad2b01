"""glibc's malloc, told to keep the memory it frees for the next allocation.

Every flush builds and frees buffers of megabytes: each tap's audio of the last second, pickled to
the disk writer and unpickled there (8 MB at 1 000 taps). glibc serves allocations above its
mmap threshold with fresh pages from the kernel and gives them back when they are freed, so every
flush page-faulted its buffers in anew: a 1 000-tap flush took 36 ms of the event loop, against
10 ms with the freed memory kept (measured on this project's 2-core machines). The cost is that up
to TRIM_THRESHOLD of freed memory stays with the process.

Elsewhere (musl, macOS) there is no mallopt and nothing changes.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1  # malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest: smaller blocks come from the heap, and are reused
TRIM_THRESHOLD = 64 << 20  # free memory at the top of the heap kept before it is given back


def keep_freed_memory() -> bool:
    """Set the thresholds (before the process allocates much); False where there is no mallopt."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
