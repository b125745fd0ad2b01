"""Test harness: the real server in its own process, on free loopback ports, with its own
recordings directory; helpers to wait for and read back the real files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import soundfile

from bench.net import free_port

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "test-token-0123456789"


def require_tool(name: str) -> str:
    """Path of an outside tool. Missing: skip locally, fail under CI (where .ci/run installs it)."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI must install it: see .ci/run)")
        pytest.skip(message)
    return path


def noise(n: int, seed: int) -> bytes:
    """n random G.711 bytes, the same for the same seed."""
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


class ServerProcess:
    """`python -m receiver` as a user would run it."""

    def __init__(self, recordings: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.recordings = recordings
        self.http_port = free_port()
        self.rtp_port = free_port()
        self.log_path = recordings.parent / f"server-{self.http_port}.log"
        self.args = [
            sys.executable, "-m", "receiver",
            "--host", "127.0.0.1",
            "--http-port", str(self.http_port),
            "--rtp-port", str(self.rtp_port),
            "--recordings", str(recordings),
            "--flush-interval", "0.2",
            "--min-free-space", "1M",  # CI machines may have little disk; tests of it set their own
            *extra,
        ]  # fmt: skip
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.popen_kwargs: dict[str, Any] = {}  # e.g. preexec_fn to set resource limits

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 15.0) -> ServerProcess:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.args, cwd=ROOT, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, **self.popen_kwargs)  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            if self.health() is not None:
                return self
            time.sleep(0.05)
        raise RuntimeError(f"server did not become healthy:\n{self.log()}")

    def health(self) -> dict[str, Any] | None:
        try:
            with socket.create_connection(("127.0.0.1", self.http_port), timeout=1) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
        except OSError:
            return None
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            return None
        result: dict[str, Any] = json.loads(body)
        return result

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self._log.close()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Any]:
    """Factory: a really small tmpfs mounted under tmp_path (needs root; skipped otherwise)."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        mount_point = tmp_path / f"tmpfs{len(mounted)}"
        mount_point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                 str(mount_point)], capture_output=True, text=True)  # fmt: skip
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(mount_point)
        return mount_point

    yield mount
    for mount_point in mounted:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Any]:
    """Factory: start a server with extra flags; every one started is stopped at the end."""
    started: list[ServerProcess] = []

    def make(*extra: str, recordings: Path | None = None, env: dict[str, str] | None = None,
             start: bool = True) -> ServerProcess:  # fmt: skip
        rec = recordings or tmp_path / f"recordings{len(started)}"
        server = ServerProcess(rec, *extra, env=env)
        started.append(server)
        return server.start() if start else server

    yield make
    for server in started:
        if server.proc is not None and server.proc.poll() is None:
            server.stop()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One shared server with a token and short timers, for tests that only add taps."""
    recordings = tmp_path_factory.mktemp("shared") / "recordings"
    proc = ServerProcess(recordings, "--token", TOKEN, "--rtp-idle-timeout", "1").start()
    yield proc
    code = proc.stop()
    assert code == 0, proc.log()


async def ws_connect_status(url: str) -> int:
    """101 when a WebSocket upgrade succeeds (a frame is sent, then closed), else the refusal's
    HTTP status."""
    async with aiohttp.ClientSession() as session:
        try:
            async with session.ws_connect(url) as ws:
                await ws.send_bytes(b"\xff" * 160)
                await ws.close()
                return 101
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status


def wait_for_sidecar(
    recordings: Path, name: str, state: str = "finished", timeout: float = 10.0
) -> dict[str, Any]:
    """Wait until `<name>.json` exists with the given state; return it."""
    path = recordings / f"{name}.json"
    deadline = time.monotonic() + timeout
    data: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        if data.get("state") == state:
            return data
        time.sleep(0.02)
    raise AssertionError(f"{path} did not reach state {state!r}; last seen: {data}")


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """Samples as int16 of shape (frames,) for mono or (frames, channels), and the rate."""
    data, rate = soundfile.read(path, dtype="int16", always_2d=False)
    return data, rate


def assert_header_matches_data(path: Path) -> int:
    """The WAV header's frame count equals the PCM bytes actually in the file. Returns frames."""
    raw = path.read_bytes()
    assert raw[:4] in (b"RIFF", b"RF64") and raw[8:12] == b"WAVE", raw[:16]
    pos = 12
    data_offset = data_size = fmt_channels = None
    while pos + 8 <= len(raw):
        chunk, size = raw[pos : pos + 4], int.from_bytes(raw[pos + 4 : pos + 8], "little")
        if chunk == b"fmt ":
            fmt_channels = int.from_bytes(raw[pos + 10 : pos + 12], "little")
        if chunk == b"data":
            data_offset, data_size = pos + 8, size
            break
        pos += 8 + size + (size & 1)
    assert data_offset is not None and fmt_channels, "no data chunk"
    assert raw[:4] == b"RF64" or int.from_bytes(raw[4:8], "little") == len(raw) - 8
    assert data_size == len(raw) - data_offset, (data_size, len(raw) - data_offset)
    info = soundfile.info(str(path))
    assert info.frames * 2 * fmt_channels == data_size
    return int(info.frames)
