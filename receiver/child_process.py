"""What the server's helper processes (the disk writer, the archiver) do first."""

from __future__ import annotations

import ctypes
import signal


def die_with_parent() -> None:
    """Linux: be killed when the server dies (kill -9 included)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
