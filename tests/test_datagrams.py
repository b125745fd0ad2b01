"""The batch readers (receiver.rtp.datagrams) on real loopback sockets, IPv4 and IPv6."""

from __future__ import annotations

import select
import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from receiver.rtp.datagrams import (
    BATCH,
    MAX_DATAGRAM,
    MmsgReader,
    Reader,
    RecvfromReader,
    enable_timestamps,
    open_reader,
)
from receiver.rtp.receiver import open_udp_socket
from tests.helpers import ServerProcess, require_tool, wait_until

FAMILIES = [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]


def readers() -> list[Reader]:
    found = [RecvfromReader(), open_reader()]
    if sys.platform == "linux":
        assert isinstance(found[1], MmsgReader), "recvmmsg must be used on Linux"
    return found


def pair(family: int, host: str) -> tuple[socket.socket, socket.socket]:
    rx = socket.socket(family, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    rx.bind((host, 0))
    rx.setblocking(False)
    enable_timestamps(rx)
    tx = socket.socket(family, socket.SOCK_DGRAM)
    tx.bind((host, 0))
    return rx, tx


def read_all(
    reader: Reader, rx: socket.socket, count: int
) -> tuple[list[bytes], list[object], list[float]]:
    """Read until `count` datagrams have come (waiting for them), then until the socket is
    empty."""
    datas: list[bytes] = []
    keys: list[object] = []
    arrivals: list[float] = []
    while True:
        batch = reader.read(rx)
        if batch is None:
            if len(datas) >= count:
                return datas, keys, arrivals
            wait_until(lambda: select.select([rx], [], [], 0)[0], f"{count} datagrams")
            continue
        assert 0 < batch.count == len(batch.lengths) == len(batch.arrivals) <= BATCH
        datas += batch.datas()
        keys += [batch.key(i) for i in range(batch.count)]
        arrivals += batch.arrivals.tolist()
        lane_keys = batch.lane_keys.tolist()
        if isinstance(reader, MmsgReader) and rx.family == socket.AF_INET:
            assert lane_keys == keys[-batch.count :]  # IPv4: the lane key is the key
        else:
            assert lane_keys == [0] * batch.count  # no fast lane


@pytest.mark.parametrize(("family", "host"), FAMILIES, ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("which", [0, 1], ids=["recvfrom", "default"])
def test_every_datagram_in_order_with_its_source(family: int, host: str, which: int) -> None:
    reader = readers()[which]
    rx, tx = pair(family, host)
    other = socket.socket(family, socket.SOCK_DGRAM)
    other.bind((host, 0))
    sent = [bytes([i % 256]) * (i % 300) for i in range(3 * BATCH + 7)]  # sizes 0..299
    started = time.monotonic()
    for i, data in enumerate(sent):
        (tx if i % 3 else other).sendto(data, rx.getsockname())
    sent_by = time.monotonic()
    # The stimulus, not a wait: reading starts 0.3 s after the last datagram came, so the kernel
    # receive timestamps (when they came) cannot be mistaken for the time they were read.
    time.sleep(0.3)
    datas, keys, arrivals = read_all(reader, rx, len(sent))
    assert datas == sent
    assert all(type(d) is bytes for d in datas)
    sources = [reader.address(k) for k in keys]
    assert sources == [(other if i % 3 == 0 else tx).getsockname() for i in range(len(sent))]
    assert len(set(keys)) == 2
    if isinstance(reader, MmsgReader):
        # Kernel receive timestamps: when the datagrams came, not when they were read.
        # (0.1 s of slack for a stall between the two clock reads of the conversion)
        assert started - 0.1 <= min(arrivals) and max(arrivals) <= sent_by + 0.1
    for s in (rx, tx, other):
        s.close()


@pytest.mark.parametrize(("family", "host"), FAMILIES, ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("which", [0, 1], ids=["recvfrom", "default"])
def test_a_detached_batch_outlives_the_next_read(family: int, host: str, which: int) -> None:
    """What the receiver reads ahead (receiver.rtp.backlog): a copy of a batch, as narrow as its
    longest datagram, that says the same after the reader has read over its buffer."""
    reader = readers()[which]
    rx, tx = pair(family, host)
    first = [bytes([i]) * (i * 7 % 200) for i in range(40)]  # sizes 0..196, the longest not last
    for data in first:
        tx.sendto(data, rx.getsockname())
    batch = reader.read(rx)  # loopback: each sendto has queued its datagram on return
    assert batch is not None and batch.count == len(first)
    copy = batch.detached()
    keys = [batch.key(i) for i in range(batch.count)]
    for data in reversed(first):  # over the reader's buffers, from another source
        tx2 = socket.socket(family, socket.SOCK_DGRAM)
        tx2.bind((host, 0))
        tx2.sendto(data[::-1] + b"x", rx.getsockname())
        tx2.close()
    read_all(reader, rx, len(first))
    assert copy.datas() == first
    assert [copy.key(i) for i in range(copy.count)] == keys
    assert copy.rows.shape[1] % 16 == 0 and copy.rows.shape[1] >= max(map(len, first))
    assert copy.rows.flags.c_contiguous
    for s in (rx, tx):
        s.close()


@pytest.mark.skipif(sys.platform != "linux", reason="recvmmsg is Linux only")
def test_an_oversized_datagram_is_counted_and_the_rest_is_intact() -> None:
    reader = open_reader()
    rx, tx = pair(socket.AF_INET, "127.0.0.1")
    tx.sendto(b"a" * 10, rx.getsockname())
    tx.sendto(b"b" * (MAX_DATAGRAM + 1), rx.getsockname())
    tx.sendto(b"c" * MAX_DATAGRAM, rx.getsockname())
    datas, _, _ = read_all(reader, rx, 2)
    assert datas == [b"a" * 10, b"c" * MAX_DATAGRAM]
    assert reader.truncated == 1
    rx.close()
    tx.close()


def test_an_empty_socket_reads_nothing() -> None:
    for reader in readers():
        rx, tx = pair(socket.AF_INET, "127.0.0.1")
        assert reader.read(rx) is None
        rx.close()
        tx.close()


def net_admin() -> bool:
    """CAP_NET_ADMIN (bit 12) among this process's effective capabilities (SO_RCVBUFFORCE)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> 12 & 1)
    return False


@pytest.mark.skipif(sys.platform != "linux", reason="Linux socket buffer rules")
def test_socket_buffer_goes_past_rmem_max_as_root() -> None:
    """The kernel caps SO_RCVBUF at net.core.rmem_max (and reports double what it keeps); with
    CAP_NET_ADMIN (root, outside a container) SO_RCVBUFFORCE goes past it."""
    rmem_max = int(Path("/proc/sys/net/core/rmem_max").read_text())
    request = 4 * rmem_max
    sock, granted = open_udp_socket("127.0.0.1", 0, request)
    try:
        assert granted == sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        if net_admin():
            assert granted == 2 * request
        else:
            assert granted == 2 * rmem_max
    finally:
        sock.close()


def test_server_warns_when_the_socket_buffer_is_capped(make_server: Any) -> None:
    """Without CAP_NET_ADMIN the kernel caps SO_RCVBUF at net.core.rmem_max: the server says so
    at start, with the sysctl that fixes it; with a request within the cap it says nothing."""
    setpriv = require_tool("setpriv")  # util-linux
    rmem_max = int(Path("/proc/sys/net/core/rmem_max").read_text())
    capped: ServerProcess = make_server(
        "--no-auth", "--rtp-recv-buffer", str(4 * rmem_max), start=False
    )
    capped.args = [setpriv, "--bounding-set=-net_admin", *capped.args]
    capped.start()
    assert f"RTP socket buffer is {rmem_max} bytes, not the {4 * rmem_max}" in capped.log()
    assert f"sysctl -w net.core.rmem_max={4 * rmem_max}" in capped.log()
    within: ServerProcess = make_server("--no-auth", "--rtp-recv-buffer", str(rmem_max // 2))
    assert f"kernel granted {rmem_max}" in within.log()
    assert "RTP socket buffer is" not in within.log()
