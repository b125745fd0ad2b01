"""Memory settings of the server and the writer process: glibc's malloc keeps what it frees, and
the garbage collector runs less often.

glibc's malloc, told to keep the memory it frees for the next allocation:

Every flush builds and frees buffers of megabytes: each tap's audio of the last second, pickled to
the disk writer and unpickled there (8 MB at 1 000 taps). glibc serves allocations above its
mmap threshold with fresh pages from the kernel and gives them back when they are freed, so every
flush page-faulted its buffers in anew: a 1 000-tap flush took 36 ms of the event loop, against
10 ms with the freed memory kept (measured on this project's 2-core machines). The cost is that up
to TRIM_THRESHOLD of freed memory stays with the process.

Elsewhere (musl, macOS) there is no mallopt and nothing changes.

The garbage collector: with its default thresholds (700, 10, 10) it ran several times per flush in
the writer, and a burst of new RTP streams (hundreds of objects each) made the server's collector
walk the whole heap again and again: at 3 000 taps each full collection held the event loop for
60-140 ms, several times in the burst's first seconds, and the packets meanwhile waited in a
socket buffer that holds ~70 ms where the kernel caps it at 4 MiB. What was built at start-up is
frozen out of every collection, and the young generation is collected every GC_THRESHOLD
allocations: nothing here builds cycles that need collecting sooner.
"""

from __future__ import annotations

import ctypes
import gc

M_TRIM_THRESHOLD = -1  # malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest: smaller blocks come from the heap, and are reused
TRIM_THRESHOLD = 64 << 20  # free memory at the top of the heap kept before it is given back
GC_THRESHOLD = 50_000  # allocations between young-generation collections


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


def collect_less() -> None:
    """Freeze what exists now (modules, the app: it lives as long as the process) out of every
    later collection, and collect less often (see the module's docstring)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 20)
