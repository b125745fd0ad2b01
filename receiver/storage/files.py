"""Opening files in the recordings directory without trusting what is there.

Anyone who can write into the directory could leave a symbolic link (`passwd.wav ->
/etc/passwd`), a fifo (whose open waits for a writer forever) or a device node under a
recording's name. Readers and repairers here only ever open regular files, never through a
link: `lstat` first (a device is never opened), then `O_NOFOLLOW | O_NONBLOCK` (a link or a fifo
swapped in meanwhile neither is followed nor blocks), then `fstat` on what was opened.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO


class NotRegularFile(OSError):
    """The path is a symbolic link, a fifo, a directory or a device: not opened."""


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link (not followed)"
    if stat.S_ISFIFO(mode):
        return "a fifo"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device or other special file"


def regular_stat(path: Path) -> os.stat_result | None:
    """The file's own stat if it is a regular file (a link is not followed), else None."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def check_regular(path: Path) -> os.stat_result:
    """lstat, raising FileNotFoundError or NotRegularFile unless `path` is a regular file."""
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(f"{path.name} is not a regular file: it is {_kind(st.st_mode)}")
    return st


def open_regular(path: Path, write: bool = False) -> BinaryIO:
    """Open a regular file for reading (or reading and writing) without following a link.
    Raises FileNotFoundError, NotRegularFile or another OSError."""
    check_regular(path)
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # replaced by a link since the lstat
            link = f"{path.name} is not a regular file: it is a symbolic link"
            raise NotRegularFile(link) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(f"{path.name} is not a regular file: it is {_kind(mode)}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "r+b" if write else "rb")
    except BaseException:
        os.close(fd)
        raise
