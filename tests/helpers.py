"""Plain helpers shared by the test modules (fixtures live in conftest.py): the real server in its
own process, real clients, waiting on an observable state, and reading back the real files.

Waiting: a test never sleeps to let the server get somewhere. It waits on the state itself
(`wait_until` and the helpers built on it: /healthz counters, an active tap's `live` counters, a
sidecar's state, the frames a WAV header announces) with a generous deadline that only bounds a
hang. Sleeping between packets to pace a sender at real time is not waiting, and stays. From a
coroutine, run a wait in a thread (`await asyncio.to_thread(wait_for_live_frames, ...)`): the
event loop goes on serving the test's own clients meanwhile.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import aiohttp
import numpy as np
import pytest
import soundfile

from bench.net import free_port
from tests import reference

__all__ = ["free_port"]  # re-exported: tests take it from here

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "test-token-0123456789"
#: How long a wait may take before it counts as a hang. Generous on purpose: a busy or slow
#: machine only makes a test slower, never makes it fail.
DEADLINE = 30.0
#: How often a wait looks again. The only sleep in the waiting helpers: it bounds how much CPU a
#: waiting test takes from the server it waits on.
POLL = 0.02

T = TypeVar("T")


def in_ci() -> bool:
    return bool(os.environ.get("CI"))


def missing(message: str) -> None:
    """Something a test needs is not there: skip locally, fail under CI (where .ci/run provides
    it), so nothing skips silently in CI."""
    if in_ci():
        pytest.fail(message + " (CI=true: CI must provide it, see .ci/run)", pytrace=False)
    pytest.skip(message)


def require_tool(name: str) -> str:
    """Path of an outside tool. Missing: skip locally, fail under CI (where .ci/run installs it)."""
    path = shutil.which(name)
    if path is None:
        missing(f"{name} is not installed")
    assert path is not None
    return path


def require_module(name: str) -> ModuleType:
    """An importable module of the test extras (pyproject.toml); missing: as `require_tool`."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        missing(f"cannot import {name} ({exc}); the test extras install it")
        raise  # not reached


def noise(n: int, seed: int) -> bytes:
    """n random G.711 bytes, the same for the same seed."""
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def new_id(prefix: str = "tap") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# -- waiting on a state ---------------------------------------------------------------------------


def wait_until(
    predicate: Callable[[], T], what: str, timeout: float = DEADLINE, interval: float = POLL
) -> T:
    """Call `predicate` until it returns something truthy, and return that. After `timeout`
    seconds (a hang, not slowness) fail with `what` and the last value seen. An exception in
    the predicate ends the wait at once (a state from which the awaited one cannot come)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"waited {timeout:g} s for {what}; last seen: {value!r}")
        time.sleep(interval)  # the poll interval (see POLL)


def wait_for_health(
    server: ServerProcess,
    predicate: Callable[[dict[str, Any]], Any],
    what: str,
    timeout: float = DEADLINE,
) -> dict[str, Any]:
    """Wait until /healthz answers with something `predicate` accepts; return that answer."""

    def check() -> dict[str, Any] | None:
        health = server.health()
        return health if health is not None and predicate(health) else None

    return wait_until(check, f"/healthz: {what}", timeout)


def wait_for_live(
    server: ServerProcess,
    name: str,
    predicate: Callable[[dict[str, Any]], Any],
    what: str,
    timeout: float = DEADLINE,
) -> dict[str, Any]:
    """Wait until the active tap `name` (GET /api/taps/{name}) has `live` counters that
    `predicate` accepts, and return them. Fails at once if the tap is no longer active (its
    recording's sidecar says it ended, and there are no live counters)."""

    def check() -> dict[str, Any] | None:
        status, body = server.api_get(f"/api/taps/{name}")
        if status == 404:
            return None  # not started yet
        assert status == 200, (status, body)
        live, sidecar = body["live"], body["sidecar"]
        if live is None and (sidecar is None or sidecar.get("state") == "recording"):
            # The writer has claimed the name (a file, maybe its first sidecar) and the server
            # has not heard yet which tap it is: that message is on its way.
            return None
        assert live is not None, f"{name} ended while waiting for {what}: {sidecar}"
        return live if predicate(live) else None

    return wait_until(check, f"{name}: {what}", timeout)


def wait_for_live_frames(
    server: ServerProcess, name: str, frames: int, timeout: float = DEADLINE
) -> dict[str, Any]:
    """Wait until the active tap `name` holds exactly `frames` frames (its timeline has placed
    everything sent so far); return its `live` counters."""
    return wait_for_live(
        server, name, lambda live: live["frames"] == frames, f"{frames} frames", timeout
    )


def wait_for_sidecar(
    recordings: Path, name: str, state: str = "finished", timeout: float = DEADLINE
) -> dict[str, Any]:
    """Wait until `<name>.json` exists with the given state; return it."""
    path = recordings / f"{name}.json"

    def check() -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return data if data.get("state") == state else None

    return wait_until(check, f"{path} in state {state!r}", timeout)


def wav_frames(path: Path) -> int | None:
    """The frames the WAV header announces, or None while there is no readable header."""
    try:
        return int(soundfile.info(str(path)).frames)
    except (OSError, RuntimeError, soundfile.LibsndfileError):
        return None


def wait_for_wav_frames(path: Path, frames: int, timeout: float = DEADLINE) -> None:
    """Wait until the header of `path` announces `frames` frames: that much audio is on disk."""
    wait_until(lambda: wav_frames(path) == frames, f"{path.name} to hold {frames} frames", timeout)


# -- the real server ------------------------------------------------------------------------------


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

    @property
    def token(self) -> str | None:
        """The token this server requires: --token, or the one it generated; None with --no-auth."""
        if "--no-auth" in self.args:
            return None
        if "--token" in self.args:
            return self.args[self.args.index("--token") + 1]
        token_file = self.recordings / ".receiver-token"
        return token_file.read_text().strip() if token_file.exists() else None

    def start(self, timeout: float = DEADLINE) -> ServerProcess:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(self.args, cwd=ROOT, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, **self.popen_kwargs)  # fmt: skip

        def healthy() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            return self.health() is not None

        try:
            wait_until(healthy, "the server to answer /healthz", timeout)
        except AssertionError:
            raise RuntimeError(f"server did not become healthy:\n{self.log()}") from None
        return self

    def health(self, timeout: float = 10.0) -> dict[str, Any] | None:
        """/healthz, or None when the server does not answer it within `timeout` seconds."""
        try:
            with socket.create_connection(("127.0.0.1", self.http_port), timeout=timeout) as sock:
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

    def api_get(self, target: str) -> tuple[int, Any]:
        """GET an API path with this server's token; the status and the JSON body."""
        return self.api("GET", target)

    def api(self, method: str, target: str) -> tuple[int, Any]:
        """`method` on an API path with this server's token; the status and the JSON body."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        request = urllib.request.Request(self.base_url + target, headers=headers, method=method)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=DEADLINE) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = DEADLINE) -> int:
        """Send `sig` (SIGTERM) and wait for the exit code; SIGKILL only if it hangs."""
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


class NatsServer:
    """A real `nats-server` (Debian's package) on a free loopback port; `kill9` and `start` again
    on the same port play an outage and a restart."""

    def __init__(self, directory: Path) -> None:
        self.binary = require_tool("nats-server")
        self.port = free_port()
        self.log_path = directory / f"nats-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        with self.log_path.open("ab") as log:
            args = [self.binary, "-a", "127.0.0.1", "-p", str(self.port)]
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

        def listening() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited: {self.log_path.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    return sock.recv(4).startswith(b"INFO")
            except OSError:
                return False

        wait_until(listening, "nats-server to listen")
        return self

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# -- clients --------------------------------------------------------------------------------------


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


async def send_tap(
    url: str,
    frames: list[bytes | str],
    headers: dict[str, str] | None = None,
    pause: float = 0.0,
) -> dict[str, Any]:
    """Connect, send frames (bytes = binary, str = text), close; report what the server did.
    `pause` paces the sender: that many seconds between frames."""
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, headers=headers, max_msg_size=0) as ws,
    ):
        for frame in frames:
            if isinstance(frame, str):
                await ws.send_str(frame)
            else:
                await ws.send_bytes(frame)
            if pause:
                await asyncio.sleep(pause)  # pacing: a sender that spreads its frames out
        await ws.close()
        return {"close_code": ws.close_code}


def tap_url(server: ServerProcess, tap_id: str, query: str = "") -> str:
    return f"{server.ws_url}/t/{TOKEN}/tap/{tap_id}{query}"


#: Tap ids the server must refuse (400) and never turn into a file name.
BAD_IDS = [
    "..",
    "../x",
    "../../etc/passwd",
    "%2e%2e",
    "%2e%2e%2fescape",
    "a%2Fb",
    "a%5Cb",
    "a/b",
    ".hidden",
    "-dash",
    "",
    "a%00b",
    "x" * 129,
    "sp%20ace",
    "caf%C3%A9",
]


# -- the files ------------------------------------------------------------------------------------


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


def check_recording(server: ServerProcess, name: str, codec: str, sent: bytes) -> dict[str, Any]:
    """A finished mono 8 kHz G.711 recording is exactly `sent`, decoded; returns its sidecar."""
    sidecar = wait_for_sidecar(server.recordings, name)
    wav = server.recordings / f"{name}.wav"
    samples, rate = read_wav(wav)
    expected = reference.decode(codec, sent)
    assert rate == 8000
    assert samples.dtype == np.int16 and samples.ndim == 1
    assert len(samples) == len(expected) == len(sent)
    assert np.array_equal(samples, expected)
    assert assert_header_matches_data(wav) == len(sent)
    assert sidecar["frames_written"] == len(sent)
    assert sidecar["duration_seconds"] == pytest.approx(len(sent) / 8000)
    return sidecar


# -- TLS ------------------------------------------------------------------------------------------


@dataclass
class Certificates:
    ca: Any  # trustme.CA: the root the clients trust
    cert: Path  # server certificate chain: leaf, then the intermediate CA
    key: Path

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context


def make_certificates(directory: Path) -> Certificates:
    """A root CA, an intermediate, and a server certificate for 127.0.0.1 and localhost signed by
    the intermediate: the server must send the whole chain for a client that trusts the root."""
    trustme = require_module("trustme")
    directory.mkdir(parents=True, exist_ok=True)
    root = trustme.CA()
    leaf = root.create_child_ca().issue_cert("127.0.0.1", "localhost")
    cert, key = directory / "cert.pem", directory / "key.pem"
    cert.write_bytes(b"".join(pem.bytes() for pem in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    for path in (cert, key):
        path.chmod(0o644)  # readable by a container's unprivileged user, too
    return Certificates(root, cert, key)


# -- signals ---------------------------------------------------------------------------------


def talk(seconds: float, seed: int) -> np.ndarray:
    """Something like a call: bursts of a wavering voice-band tone at about -16 dBFS, and
    between them the quiet of a line (a few LSB of noise)."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(8000 * seconds)) / 8000
    speaking = (t % 0.7) < 0.4
    voice = 5000 * np.sin(2 * np.pi * (250 + 60 * np.sin(2 * np.pi * 3 * t)) * t)
    voice *= 1 + 0.3 * rng.standard_normal(len(t))
    signal = np.where(speaking, voice, 0.0) + 8 * rng.standard_normal(len(t))
    return np.clip(signal, -32768, 32767).astype(np.int16)


def g711_encode(codec: str, samples: np.ndarray) -> bytes:
    compress = reference.g191_ulaw_compress if codec == "PCMU" else reference.g191_alaw_compress
    return bytes(compress(int(x)) for x in samples)


# -- the start-up banner --------------------------------------------------------------------------


BANNER = "tap-receiver is ready. Paste these"


def banner(server: ServerProcess) -> dict[str, str]:
    """The start-up banner's rows from the server's log, once it is there (under --workers the
    parent logs it as the workers start)."""
    wait_until(lambda: BANNER in server.log(), "the start-up banner")
    return banner_rows(server.log())


def banner_rows(log: str) -> dict[str, str]:
    """The banner's rows (`WebSocket tap`, `RTP tap`, `recordings page`, ...) from a text log;
    fails unless there is exactly one banner."""
    lines = log.splitlines()
    starts = [i for i, line in enumerate(lines) if BANNER in line]
    assert len(starts) == 1, log
    rows: dict[str, str] = {}
    for line in lines[starts[0] + 1 :]:
        if not line.startswith("    "):
            break
        label, sep, value = line.strip().partition(":  ")
        if sep and not label.startswith("("):
            rows[label] = value.strip()
    return rows


def upgrade_by_hand(sock: socket.socket, path: str) -> socket.socket:
    """Ask for a WebSocket on `path` over a connected socket, without a client library (so that
    the test controls every byte and buffer); asserts the 101 and returns the socket."""
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock
