"""Reading many datagrams per system call: recvmmsg(2) through ctypes on Linux, a recvfrom loop
elsewhere.

Measured on the project's 2-core machines at 100k datagrams/s (bench/, one core): a uvloop
datagram endpoint spends ~3.6 µs of CPU per datagram, most of it waking up and calling Python once
per datagram; reading every 2 ms with a recvfrom loop ~2.0 µs; with recvmmsg ~1.0 µs. The
standard library has no recvmmsg and the PyPI wrappers are unmaintained, so it is bound here with
ctypes (no compiler needed), behind `open_reader()`, which falls back to `RecvfromReader`.

A reader returns one `Batch` per call: the datagrams as rows of a reused buffer (valid until the
next read), a key per datagram that identifies its source, and the arrival times, as numpy
arrays for the vectorised path (`fast_lane.py`). `address(key)` turns a key into the
(host, port, ...) tuple the socket module would have given. With recvmmsg the arrival
times are the kernel's receive timestamps (SO_TIMESTAMPNS), so waiting for the next batch does not
show up as jitter; the fallback stamps a whole batch with the time it was read.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import platform
import socket
import sys
import time
from collections.abc import Hashable
from typing import Any, Protocol

import numpy as np

MAX_DATAGRAM = 4096  # larger datagrams are cut by recvmmsg and counted as truncated
BATCH = 512  # datagrams per read

_SO_TIMESTAMPNS = 35  # asm-generic/socket.h (SO_TIMESTAMPNS_OLD), the value on 64-bit Linux
_NAME = 128  # sizeof(struct sockaddr_storage)
_CONTROL = 32  # CMSG_SPACE(sizeof(struct timespec)) on 64-bit Linux
_AGAIN = {errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR}
_LINUX_64 = sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64")


class Batch:
    """Up to BATCH datagrams, valid until the reader's next read.

    Datagram i is `rows[i, :lengths[i]]`; `lane_keys[i]` is a non-zero integer identifying an
    IPv4 source (0 otherwise), for the vectorised path; `key(i)` identifies any source."""

    __slots__ = ("_keys", "_reader", "arrivals", "count", "lane_keys", "lengths", "rows")

    def __init__(
        self,
        reader: Reader,
        count: int,
        rows: np.ndarray,
        lengths: np.ndarray,
        lane_keys: np.ndarray,
        arrivals: np.ndarray,
        keys: list[Hashable] | None = None,
    ) -> None:
        self._reader = reader
        self.count = count
        self.rows = rows  # (count, MAX_DATAGRAM) uint8
        self.lengths = lengths  # (count,) int64
        self.lane_keys = lane_keys  # (count,) uint64
        self.arrivals = arrivals  # (count,) float64, time.monotonic() seconds
        self._keys = keys

    def data(self, i: int) -> bytes:
        return self.rows[i, : int(self.lengths[i])].tobytes()

    def key(self, i: int) -> Hashable:
        if self._keys is not None:
            return self._keys[i]
        return self._reader.key(i)

    def datas(self) -> list[bytes]:
        return [self.data(i) for i in range(self.count)]

    def detached(self) -> Batch:
        """A copy that stays valid after the reader's next read: its rows only as wide as its
        longest datagram (rounded up to 16 bytes, the vectorised path reads whole words), its
        keys taken now. (lengths, lane_keys and arrivals are the batch's own arrays already.)"""
        width = min(MAX_DATAGRAM, max(16, (int(self.lengths.max()) + 15) & ~15))
        if self._keys is not None:
            keys = self._keys
        elif self.lane_keys.all():  # IPv4 only: a lane key is the source's key
            keys = self.lane_keys.tolist()
        else:
            keys = [self.key(i) for i in range(self.count)]
        rows = self.rows[:, :width].copy()
        return Batch(self._reader, self.count, rows, self.lengths, self.lane_keys, self.arrivals,
                     keys)  # fmt: skip


class Reader(Protocol):
    truncated: int  # datagrams longer than MAX_DATAGRAM, dropped

    def read(self, sock: socket.socket) -> Batch | None: ...

    def key(self, i: int) -> Hashable: ...

    def address(self, key: Hashable) -> Any: ...


class RecvfromReader:
    """Portable: one recvfrom_into per datagram until the socket is empty (or BATCH are read).
    Its batches carry no lane keys (every datagram takes the general path)."""

    def __init__(self) -> None:
        self.truncated = 0
        self._buffer = bytearray(BATCH * MAX_DATAGRAM)
        self._rows = np.frombuffer(self._buffer, dtype=np.uint8).reshape(BATCH, MAX_DATAGRAM)
        self._view = memoryview(self._buffer)
        self._zeros = np.zeros(BATCH, dtype=np.uint64)

    def read(self, sock: socket.socket) -> Batch | None:
        keys: list[Hashable] = []
        lengths: list[int] = []
        receive = sock.recvfrom_into
        view = self._view
        try:
            for i in range(BATCH):
                length, addr = receive(view[i * MAX_DATAGRAM : (i + 1) * MAX_DATAGRAM])
                if length >= MAX_DATAGRAM:  # cut (as with recvmmsg)
                    self.truncated += 1
                    length = -1
                lengths.append(length)
                keys.append(addr)
        except (BlockingIOError, InterruptedError):
            pass
        if not keys:
            return None
        count = len(keys)
        arrivals = np.full(count, time.monotonic())
        batch = Batch(self, count, self._rows[:count], np.array(lengths, dtype=np.int64),
                      self._zeros[:count], arrivals, keys)  # fmt: skip
        if min(lengths) < 0:
            return _without(batch, np.array(lengths) < 0)
        return batch

    def key(self, i: int) -> Hashable:
        raise AssertionError("RecvfromReader batches carry their keys")

    def address(self, key: Hashable) -> Any:
        return key


def _without(batch: Batch, drop: np.ndarray) -> Batch | None:
    """The batch without the datagrams `drop` marks (copies: rare)."""
    keep = np.flatnonzero(~drop)
    if not keep.size:
        return None
    keys = [batch.key(i) for i in keep.tolist()]
    return Batch(batch._reader, int(keep.size), batch.rows[keep], batch.lengths[keep],
                 batch.lane_keys[keep], batch.arrivals[keep], keys)  # fmt: skip


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [
        ("msg_name", ctypes.c_void_p),
        ("msg_namelen", ctypes.c_uint32),
        ("msg_iov", ctypes.POINTER(_Iovec)),
        ("msg_iovlen", ctypes.c_size_t),
        ("msg_control", ctypes.c_void_p),
        ("msg_controllen", ctypes.c_size_t),
        ("msg_flags", ctypes.c_int),
    ]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


def _field_view(array: Any, offset: int, dtype: str) -> np.ndarray:
    """One field of every element of a ctypes struct array, as a strided numpy view."""
    size = ctypes.sizeof(array) // len(array)
    raw = np.frombuffer(array, dtype=np.uint8)[offset : offset + np.dtype(dtype).itemsize]
    return np.lib.stride_tricks.as_strided(raw.view(dtype), shape=(len(array),), strides=(size,))


class MmsgReader:
    """recvmmsg(2): up to BATCH datagrams, their source addresses and kernel timestamps per call.

    Keys: an int for IPv4 (family, port and address as one little-endian u64), bytes for IPv6
    (port, address and scope id; the flow label is left out so it cannot split a stream)."""

    def __init__(self, recvmmsg: Any) -> None:
        self.truncated = 0
        self._recvmmsg = recvmmsg
        self._buffer = bytearray(BATCH * MAX_DATAGRAM)
        self._names = bytearray(BATCH * _NAME)
        self._control = bytearray(BATCH * _CONTROL)
        buffers = (ctypes.c_char * len(self._buffer)).from_buffer(self._buffer)
        names = (ctypes.c_char * len(self._names)).from_buffer(self._names)
        control = (ctypes.c_char * len(self._control)).from_buffer(self._control)
        self._iovecs = (_Iovec * BATCH)()
        self._messages = (_Mmsghdr * BATCH)()
        for i in range(BATCH):
            self._iovecs[i].iov_base = ctypes.addressof(buffers) + i * MAX_DATAGRAM
            self._iovecs[i].iov_len = MAX_DATAGRAM
            header = self._messages[i].msg_hdr
            header.msg_name = ctypes.addressof(names) + i * _NAME
            header.msg_iov = ctypes.pointer(self._iovecs[i])
            header.msg_iovlen = 1
            header.msg_control = ctypes.addressof(control) + i * _CONTROL
        self._keep = (buffers, names, control)  # the ctypes views pin the bytearrays
        self._rows = np.frombuffer(self._buffer, dtype=np.uint8).reshape(BATCH, MAX_DATAGRAM)
        hdr = _Mmsghdr.msg_hdr.offset
        self._lengths = _field_view(self._messages, _Mmsghdr.msg_len.offset, "<u4")
        self._namelens = _field_view(self._messages, hdr + _Msghdr.msg_namelen.offset, "<u4")
        self._flags = _field_view(self._messages, hdr + _Msghdr.msg_flags.offset, "<i4")
        self._controllens = _field_view(self._messages, hdr + _Msghdr.msg_controllen.offset, "<u8")
        self._namelens[:] = _NAME
        self._controllens[:] = _CONTROL
        self._families = np.frombuffer(self._names, dtype="<u2")[:: _NAME // 2]
        self._v4_keys = np.frombuffer(self._names, dtype="<u8")[:: _NAME // 8]
        stamps = np.frombuffer(self._control, dtype="<i8").reshape(BATCH, _CONTROL // 8)
        self._cmsg_types = np.frombuffer(self._control, dtype="<i4")[3 :: _CONTROL // 4]
        self._seconds, self._nanoseconds = stamps[:, 2], stamps[:, 3]
        self._pointer = ctypes.cast(self._messages, ctypes.POINTER(_Mmsghdr))

    def read(self, sock: socket.socket) -> Batch | None:
        count = self._recvmmsg(sock.fileno(), self._pointer, BATCH, socket.MSG_DONTWAIT, None)
        if count <= 0:
            if count < 0:
                code = ctypes.get_errno()
                if code not in _AGAIN:
                    raise OSError(code, f"recvmmsg: {errno.errorcode.get(code, code)}")
            return None
        now = time.monotonic()
        stamped = self._cmsg_types[:count] == _SO_TIMESTAMPNS
        stamped &= self._controllens[:count] >= _CONTROL
        if stamped.all():
            # CLOCK_REALTIME from the kernel -> this process's monotonic clock.
            shift = now - time.time()
            arrivals = self._seconds[:count] + self._nanoseconds[:count] * 1e-9 + shift
        else:
            arrivals = np.full(count, now)
        lane_keys = self._v4_keys[:count].copy()
        lane_keys[self._families[:count] != socket.AF_INET] = 0
        batch = Batch(self, count, self._rows[:count], self._lengths[:count].astype(np.int64),
                      lane_keys, arrivals)  # fmt: skip
        # The kernel wrote the actual sizes into these; give the next call the full sizes.
        self._namelens[:count] = _NAME
        self._controllens[:count] = _CONTROL
        cut = (self._flags[:count] & socket.MSG_TRUNC) != 0
        if cut.any():
            self.truncated += int(cut.sum())
            return _without(batch, cut)
        return batch

    def key(self, i: int) -> Hashable:
        """Datagram i's source in the last batch read: an int for IPv4, bytes for IPv6."""
        name = self._names[i * _NAME : i * _NAME + 28]
        if name[0] | name[1] << 8 == socket.AF_INET:
            return int(self._v4_keys[i])
        return bytes(name[2:4] + name[8:28])

    def address(self, key: Hashable) -> Any:
        if isinstance(key, int):
            raw = key.to_bytes(8, "little")
            return socket.inet_ntop(socket.AF_INET, raw[4:8]), int.from_bytes(raw[2:4], "big")
        assert isinstance(key, bytes)
        host = socket.inet_ntop(socket.AF_INET6, key[2:18])
        return host, int.from_bytes(key[:2], "big"), 0, int.from_bytes(key[18:22], "little")


def enable_timestamps(sock: socket.socket) -> None:
    """Ask for kernel receive timestamps on this socket (MmsgReader reads them)."""
    if _LINUX_64:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)


def open_reader(prefer_mmsg: bool = True) -> Reader:
    """The recvmmsg reader where the C library has it (Linux, 64-bit), else the recvfrom loop."""
    if prefer_mmsg and _LINUX_64:
        try:
            # PyDLL: the call keeps the GIL. It never blocks (MSG_DONTWAIT) and takes microseconds;
            # releasing the GIL around it would let the disk-writer thread take it each time, and
            # the event loop would then wait up to the switch interval (5 ms) per read to get it
            # back (the convoy effect): with 16 reads a tick, stalls of tens of milliseconds.
            recvmmsg = ctypes.PyDLL(None, use_errno=True).recvmmsg
        except (OSError, AttributeError):
            pass
        else:
            recvmmsg.argtypes = [
                ctypes.c_int,
                ctypes.POINTER(_Mmsghdr),
                ctypes.c_uint,
                ctypes.c_int,
                ctypes.c_void_p,
            ]
            recvmmsg.restype = ctypes.c_int
            return MmsgReader(recvmmsg)
    return RecvfromReader()
