"""Fixtures: the real server in its own process, on free loopback ports, with its own recordings
directory, and a really small disk. Plain helpers are in tests/helpers.py."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import TOKEN, ServerProcess, missing


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Any]:
    """Factory: a really small tmpfs mounted under tmp_path, a disk that really fills up. Needs
    root (CAP_SYS_ADMIN): without it, skipped locally and a failure under CI (.ci/run runs as
    root)."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        mount_point = tmp_path / f"tmpfs{len(mounted)}"
        mount_point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                                 str(mount_point)], capture_output=True, text=True)  # fmt: skip
        if result.returncode != 0:
            missing(f"cannot mount a {size} tmpfs (needs root): {result.stderr.strip()}")
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
