"""The Docker image as a user runs it: build it, run it as the tap destination with a host folder
mounted at /recordings, record a WebSocket tap and an RTP stream, `stop` it (SIGTERM) while a tap
is still open, and read the files back on the host.

Needs a container engine that really answers (`docker info` or `podman info`) and the image's base
image: without them, skipped locally and a failure under CI=true (.ci/run prepares podman and a
local base image through ../shared/container/prepare.sh where that exists).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from receiver.rtp.packet import PT_PCMU, RtpPacket
from tests import reference
from tests.helpers import (
    BANNER,
    DEADLINE,
    ROOT,
    assert_header_matches_data,
    banner_rows,
    free_port,
    make_certificates,
    missing,
    noise,
    read_wav,
    wait_for_sidecar,
    wait_until,
)

pytestmark = [pytest.mark.container, pytest.mark.timeout(900)]

#: One tag per checkout: worktrees of this repository share the machine's image storage.
IMAGE = f"tap-receiver:test-{hashlib.sha256(str(ROOT).encode()).hexdigest()[:8]}"
BUILD_TIMEOUT = 600


@dataclass
class Image:
    engine: str  # path of docker or podman
    name: str
    config: dict[str, Any]  # the image's inspect output
    build_seconds: float

    @property
    def is_podman(self) -> bool:
        return Path(self.engine).name.startswith("podman")

    def run(
        self, *args: str, timeout: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.engine, *args], capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{self.engine} {' '.join(args)} failed:\n{result.stderr}")
        return result

    @property
    def healthcheck(self) -> list[str]:
        """The HEALTHCHECK test (docker keeps it in Config, podman next to it)."""
        health = self.config["Config"].get("Healthcheck") or self.config.get("Healthcheck") or {}
        return list(health.get("Test") or [])

    @property
    def uid(self) -> int:
        user = self.config["Config"].get("User") or "0"
        name = user.split(":")[0]
        if name.isdigit():
            return int(name)
        return int(self.run("run", "--rm", "--entrypoint", "id", self.name, "-u").stdout)


def find_engine() -> tuple[str | None, str]:
    """The first of docker/podman whose `info` succeeds, or None and why none did."""
    reasons = []
    for name in ("docker", "podman"):
        path = shutil.which(name)
        if path is None:
            reasons.append(f"{name}: not installed")
            continue
        try:
            info = subprocess.run([path, "info"], capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            reasons.append(f"{name} info: timed out")
            continue
        if info.returncode == 0:
            return path, ""
        last = (info.stderr.strip().splitlines() or ["exit code " + str(info.returncode)])[-1]
        reasons.append(f"{name} info: {last}")
    return None, "; ".join(reasons)


def base_images(dockerfile: Path) -> list[str]:
    """Images named by FROM lines, not counting the Dockerfile's own stages."""
    images: list[str] = []
    stages: set[str] = set()
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if not words or words[0].upper() != "FROM":
            continue
        args = [w for w in words[1:] if not w.startswith("--")]
        if args and args[0] not in stages and args[0] != "scratch":
            images.append(args[0])
        if len(args) >= 3 and args[1].upper() == "AS":
            stages.add(args[2])
    return images


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    engine, why = find_engine()
    if engine is None:
        missing(f"no container engine answers ({why})")
    assert engine is not None
    for base in base_images(ROOT / "Dockerfile"):
        present = subprocess.run(
            [engine, "image", "inspect", base], capture_output=True, timeout=60
        )
        if present.returncode == 0:
            continue
        pulled = subprocess.run(
            [engine, "pull", base], capture_output=True, text=True, timeout=BUILD_TIMEOUT
        )
        if pulled.returncode != 0:
            last = (pulled.stderr.strip().splitlines() or ["?"])[-1]
            missing(f"base image {base} is not available and cannot be pulled: {last}")
    build = [engine, "build", "-t", IMAGE]
    if Path(engine).name.startswith("podman"):
        # --format docker: OCI image configs have no HEALTHCHECK; host network: no bridge setup
        build += ["--pull=never", "--network=host", "--format", "docker"]
    log_path = tmp_path_factory.mktemp("build") / "build.log"
    started = time.monotonic()
    with log_path.open("w") as log:
        result = subprocess.run(
            [*build, str(ROOT)], stdout=log, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT
        )
    seconds = time.monotonic() - started
    if result.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        pytest.fail(f"{' '.join(build)} failed ({result.returncode}):\n{tail}")
    inspect = subprocess.run(
        [engine, "image", "inspect", IMAGE], capture_output=True, text=True, check=True
    )
    print(f"\nbuilt {IMAGE} with {engine} in {seconds:.1f} s")
    return Image(engine, IMAGE, json.loads(inspect.stdout)[0], seconds)


def test_image_is_configured_for_deployment(image: Image) -> None:
    config = image.config["Config"]
    assert image.uid != 0, "the image must not run as root"
    assert {"8080/tcp", "5004/udp"} <= set(config.get("ExposedPorts") or {})
    assert "RECEIVER_RECORDINGS=/recordings" in config["Env"]
    assert "/recordings" in (config.get("Volumes") or {})
    # exec form: the server is PID 1 and gets SIGTERM itself (no shell in between)
    assert config["Entrypoint"] == ["tap-receiver"]
    assert image.healthcheck[:1] == ["CMD"], image.healthcheck  # exec form, python only
    size_mb = int(image.config.get("Size") or 0) / 1e6
    print(f"image size {size_mb:.0f} MB")


# -- running it -----------------------------------------------------------------------------------


def get_health(url: str, context: ssl.SSLContext | None = None) -> dict[str, Any] | None:
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    try:
        with opener.open(f"{url}/healthz", timeout=10) as response:
            result: dict[str, Any] = json.load(response)
            return result
    except (OSError, ValueError):
        return None


@dataclass
class Container:
    image: Image
    name: str
    recordings: Path
    http_port: int
    rtp_port: int
    scheme: str = "http"
    context: ssl.SSLContext | None = None

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.http_port}"

    def health(self) -> dict[str, Any] | None:
        return get_health(self.url, self.context)

    def logs(self) -> str:
        result = self.image.run("logs", self.name, check=False)
        return result.stdout + result.stderr

    def inspect(self, template: str) -> str:
        return self.image.run("inspect", "--format", template, self.name).stdout.strip()

    def check_healthcheck(self) -> None:
        """The image's HEALTHCHECK passes (podman runs it on demand; docker on its timer), and
        fails when pointed at a port where nothing listens (it honours RECEIVER_HTTP_PORT)."""
        wrong_port = ["exec", "-e", f"RECEIVER_HTTP_PORT={free_port()}", self.name]
        result = self.image.run(*wrong_port, *self.image.healthcheck[1:], check=False)
        assert result.returncode == 1, result.stdout + result.stderr
        if self.image.is_podman:
            result = self.image.run("healthcheck", "run", self.name, check=False)
            assert result.returncode == 0, result.stdout + result.stderr
            return
        try:
            wait_until(lambda: self.inspect("{{.State.Health.Status}}") == "healthy", "healthy")
        except AssertionError:
            raise AssertionError(self.inspect("{{json .State.Health}}")) from None

    def stop(self) -> float:
        """`stop -t 10` (SIGTERM, SIGKILL after 10 s); returns how long it took."""
        started = time.monotonic()
        self.image.run("stop", "-t", "10", self.name, timeout=60)
        return time.monotonic() - started


@pytest.fixture
def start_container(image: Image, tmp_path: Path) -> Iterator[Callable[..., Container]]:
    """Run the image on free host ports with a fresh host folder mounted at /recordings."""
    names: list[str] = []

    def start(
        env: dict[str, str] | None = None,
        volumes: tuple[str, ...] = (),
        scheme: str = "http",
        context: ssl.SSLContext | None = None,
    ) -> Container:
        recordings = tmp_path / f"recordings{len(names)}"
        recordings.mkdir()
        if os.geteuid() == 0:
            os.chown(recordings, image.uid, image.uid)  # what a user does for a bind mount
        else:
            recordings.chmod(0o777)  # rootless engines map the image's user to another host uid
        name = f"tap-receiver-test-{uuid.uuid4().hex[:8]}"
        http_port, rtp_port = free_port(), free_port()
        settings = {
            "RECEIVER_HOST": "127.0.0.1",  # host network: not on the machine's interfaces
            "RECEIVER_HTTP_PORT": str(http_port),
            "RECEIVER_RTP_PORT": str(rtp_port),
            "RECEIVER_RTP_IDLE_TIMEOUT": "1",
            "RECEIVER_FLUSH_INTERVAL": "0.2",
            "RECEIVER_MIN_FREE_SPACE": "1M",  # CI machines may have little disk
            **(env or {}),
        }
        args = ["run", "-d", "--name", name, "--network=host"]
        for volume in (f"{recordings}:/recordings:Z", *volumes):
            args += ["-v", volume]
        for key, value in settings.items():
            args += ["-e", f"{key}={value}"]
        if not image.is_podman:
            args.append("--health-interval=1s")  # docker's first check is one interval in
        names.append(name)
        image.run(*args, image.name)
        container = Container(image, name, recordings, http_port, rtp_port, scheme, context)

        def ready() -> bool:
            if container.inspect("{{.State.Running}}") != "true":
                pytest.fail(f"container exited before it was ready:\n{container.logs()}")
            return container.health() is not None

        try:
            wait_until(ready, "the container to answer /healthz", timeout=2 * DEADLINE)
        except AssertionError as exc:
            pytest.fail(f"container not ready ({exc}):\n{container.logs()}")
        return container

    yield start
    for name in names:
        image.run("rm", "-f", name, check=False)


def assert_stopped_cleanly(container: Container) -> None:
    """Exit code 0: the server handled SIGTERM (after `stop -t 10` gives up, SIGKILL makes it
    137), finished, and said so."""
    log = container.logs()
    assert container.inspect("{{.State.ExitCode}}") == "0", log
    assert "stopped after" in log, log
    assert "Traceback" not in log, log


def send_rtp(port: int, payload: bytes, ptime: float = 0.02) -> int:
    """PCMU in 20 ms packets at real-time pace from one socket; returns the source port."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        source_port = int(sock.getsockname()[1])
        start = time.monotonic()
        for i, offset in enumerate(range(0, len(payload), 160)):
            packet = RtpPacket(
                payload_type=PT_PCMU,
                marker=i == 0,
                sequence=(31000 + i) & 0xFFFF,
                timestamp=(987_654_321 + 160 * i) & 0xFFFFFFFF,
                ssrc=0x5EED1234,
                payload=payload[offset : offset + 160],
            )
            delay = start + i * ptime - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing: real time, a packet every ptime
            sock.sendto(packet.serialize(), ("127.0.0.1", port))
    return source_port


def wait_for_bytes_written(container: Container, expected: int) -> None:
    def written() -> bool:
        health = container.health()
        return health is not None and health["writer"]["bytes_written"] == expected

    wait_until(written, f"the writer to have written {expected} bytes")


def check_on_host(recordings: Path, name: str, sent: bytes, uid: int) -> dict[str, Any]:
    """The finished recording as the host sees it: complete, bit-exact, owned by the image user."""
    sidecar = json.loads((recordings / f"{name}.json").read_text())
    assert sidecar["state"] == "finished", sidecar
    wav = recordings / f"{name}.wav"
    samples, rate = read_wav(wav)
    expected = reference.decode("PCMU", sent)
    assert rate == 8000
    assert len(samples) == len(expected) == len(sent)
    assert np.array_equal(samples, expected)
    assert assert_header_matches_data(wav) == len(sent)
    assert sidecar["frames_written"] == len(sent)
    for path in (wav, recordings / f"{name}.json"):
        assert path.stat().st_uid != 0, path
        if os.geteuid() == 0:  # rootful engine: container uids are host uids
            assert path.stat().st_uid == uid, (path, path.stat().st_uid, uid)
    return sidecar


def test_container_records_taps_and_stops_cleanly(
    start_container: Callable[..., Container],
) -> None:
    # No token configured: the server generates one into the volume, as a first `docker run` does.
    container = start_container()
    recordings = container.recordings
    assert (recordings / ".receiver-token").exists()
    match = re.search(r"/t/([A-Za-z0-9._~-]+)/tap/", container.logs())
    assert match, container.logs()
    base = f"ws://127.0.0.1:{container.http_port}/t/{match.group(1)}/tap"
    container.check_healthcheck()

    # 1. A WebSocket tap that ends normally.
    ws_done = noise(160 * 150, seed=101)  # 3 s
    ws_open = noise(160 * 100, seed=102)  # still open when the container is stopped

    async def closed_tap() -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{base}/ws-done") as ws,
        ):
            for i in range(0, len(ws_done), 160):
                await ws.send_bytes(ws_done[i : i + 160])

    asyncio.run(closed_tap())
    wait_for_sidecar(recordings, "ws-done")

    # 2. An RTP stream, 3 s in real time, ended by the idle timeout.
    rtp_audio = noise(160 * 150, seed=103)
    source_port = send_rtp(container.rtp_port, rtp_audio)
    rtp_name = f"rtp-127.0.0.1-{source_port}"
    assert wait_for_sidecar(recordings, rtp_name)["end_reason"] == "idle timeout"

    # 3. A WebSocket tap still open while `stop` sends SIGTERM.
    async def open_tap_during_stop() -> tuple[float, aiohttp.WSMessage]:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{base}/ws-open") as ws,
        ):
            for i in range(0, len(ws_open), 160):
                await ws.send_bytes(ws_open[i : i + 160])
            total = 2 * (len(ws_done) + len(rtp_audio) + len(ws_open))  # 16-bit PCM on disk
            await asyncio.to_thread(wait_for_bytes_written, container, total)
            seconds = await asyncio.to_thread(container.stop)
            return seconds, await ws.receive(timeout=DEADLINE)

    stop_seconds, close = asyncio.run(open_tap_during_stop())
    print(f"\nstop -> exit: {stop_seconds:.2f} s")
    assert_stopped_cleanly(container)
    # the open tap was told why (its sidecar says "closed": the server does not record who closed)
    assert close.type == aiohttp.WSMsgType.CLOSE and close.data == 1001, close
    assert close.extra == "server shutting down"

    uid = container.image.uid
    check_on_host(recordings, "ws-done", ws_done, uid)
    rtp = check_on_host(recordings, rtp_name, rtp_audio, uid)
    assert rtp["transport"] == "rtp" and rtp["codec"] == "PCMU"
    check_on_host(recordings, "ws-open", ws_open, uid)
    sidecars = sorted(p.name for p in recordings.glob("*.json"))
    assert sidecars == sorted(["ws-done.json", "ws-open.json", f"{rtp_name}.json"])
    wavs = sorted(p.name for p in recordings.glob("*.wav"))
    assert wavs == [name.replace(".json", ".wav") for name in sidecars]


def test_container_serves_wss_with_mounted_certificate(
    start_container: Callable[..., Container], tmp_path: Path
) -> None:
    """RECEIVER_TLS_CERT/KEY from a read-only mount: wss:// taps, and the HEALTHCHECK uses https."""
    certs = make_certificates(tmp_path / "tls")
    container = start_container(
        env={
            "RECEIVER_TLS_CERT": "/tls/cert.pem",
            "RECEIVER_TLS_KEY": "/tls/key.pem",
            "RECEIVER_NO_AUTH": "1",
        },
        volumes=(f"{certs.cert.parent}:/tls:ro,Z",),
        scheme="https",
        context=certs.client_context(),
    )
    assert get_health(f"http://127.0.0.1:{container.http_port}") is None  # TLS only
    container.check_healthcheck()
    sent = noise(160 * 50, seed=104)

    async def tap() -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(
                f"wss://127.0.0.1:{container.http_port}/tap/wss-tap", ssl=container.context
            ) as ws,
        ):
            await ws.send_bytes(sent)

    asyncio.run(tap())
    wait_for_sidecar(container.recordings, "wss-tap")
    container.stop()
    assert_stopped_cleanly(container)
    check_on_host(container.recordings, "wss-tap", sent, container.image.uid)


def test_send_from_the_host_checks_the_container(
    start_container: Callable[..., Container],
) -> None:
    """The first five minutes against the image: its log's banner gives the URIs, and
    `tap-receiver send` from the host records through them and finds the recordings matching."""
    container = start_container()
    wait_until(lambda: BANNER in container.logs(), "the start-up banner")
    rows = banner_rows(container.logs())
    assert rows["recordings in"] == "/recordings"
    assert rows["RTP tap"] == f"rtp://127.0.0.1:{container.rtp_port}"

    def send(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "receiver", "send", *args, "--seconds", "1"],
            capture_output=True, text=True, timeout=120, cwd=ROOT,
            env={k: v for k, v in os.environ.items() if not k.startswith("RECEIVER_")},
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        assert "MATCH: every sample as sent" in result.stdout, result.stdout
        return result.stdout

    send(rows["WebSocket tap"], "--tap-id", "from-host")
    send(rows["RTP tap"], "--api", rows["recordings page"], "--loss", "0.05", "--seed", "3")
    send(rows["WebSocket tap"], "--tap-id", "from-host-ms", "--media-streams", "--tracks", "both")
    container.stop()
    assert_stopped_cleanly(container)
    sidecar = json.loads((container.recordings / "from-host-ms.json").read_text())
    assert sidecar["channel_names"] == ["inbound", "outbound"]
