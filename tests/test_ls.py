"""`tap-receiver ls`: the format of each recording (codec, rate, channels and what they carry),
and where it looks: `--recordings`, else the server's own `recordings` setting
(RECEIVER_RECORDINGS, the RECEIVER_CONFIG file), else ./recordings; a bad setting is one line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.helpers import ServerProcess, new_id, wait_for_sidecar

LS = [sys.executable, "-m", "receiver", "ls"]


def ls(*args: str, cwd: Path, env: dict[str, str] | None = None) -> Any:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RECEIVER_")}
    return subprocess.run([*LS, *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          env={**clean, **(env or {})})  # fmt: skip


def send(*args: str) -> None:
    """Record with the real sender (tests/test_send.py checks it sample for sample)."""
    result = subprocess.run([sys.executable, "-m", "receiver", "send", *args],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def rows(output: str) -> dict[str, list[str]]:
    lines = output.splitlines()
    return {line.split()[0]: line.split() for line in lines[1:-1]}


def test_ls_shows_rate_and_named_channels(server: ServerProcess, tmp_path: Path) -> None:
    stereo, mono = new_id("ls-stereo"), new_id("ls-mono")
    uri = f"{server.ws_url}/t/{server.token}/tap/{{tap_id}}"
    send(uri, "--media-streams", "--tracks", "both", "--seconds", "0.4", "--tap-id", stereo)
    send(uri, "--seconds", "0.4", "--tap-id", mono, "--codec", "pcma")
    directory = tmp_path / "recordings"
    directory.mkdir()
    for name in (stereo, mono):
        wait_for_sidecar(server.recordings, name)
        for ext in ("wav", "json"):
            shutil.copy(server.recordings / f"{name}.{ext}", directory)
    result = ls("--recordings", str(directory), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    table = rows(result.stdout)
    assert table[stereo][1:8] == ["finished", "websocket", "PCMU", "8000", "2", "(inbound,",
                                  "outbound)"]  # fmt: skip
    assert table[mono][1:6] == ["finished", "websocket", "PCMA", "8000", "1"]
    assert "0:00.400" in table[stereo] and "0:00.400" in table[mono]


def test_ls_finds_the_recordings_setting(server: ServerProcess, tmp_path: Path) -> None:
    name = new_id("ls-where")
    send(f"{server.ws_url}/t/{server.token}/tap/{{tap_id}}", "--seconds", "0.2", "--tap-id", name)
    wait_for_sidecar(server.recordings, name)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    # nothing configured: ./recordings, which is not there
    nothing = ls(cwd=elsewhere)
    assert nothing.returncode == 1 and "no directory 'recordings'" in nothing.stderr
    # RECEIVER_RECORDINGS, as the server reads it
    by_env = ls(cwd=elsewhere, env={"RECEIVER_RECORDINGS": str(server.recordings)})
    assert by_env.returncode == 0 and name in rows(by_env.stdout), by_env.stderr
    assert f"in {server.recordings}" in by_env.stdout
    # the RECEIVER_CONFIG file's `recordings`
    config = tmp_path / "receiver.toml"
    config.write_text(f'recordings = "{server.recordings}"\n')
    by_file = ls(cwd=elsewhere, env={"RECEIVER_CONFIG": str(config)})
    assert by_file.returncode == 0 and name in rows(by_file.stdout), by_file.stderr
    # --recordings wins over both
    empty = tmp_path / "empty"
    empty.mkdir()
    flag = ls("--recordings", str(empty), cwd=elsewhere,
              env={"RECEIVER_RECORDINGS": str(server.recordings)})  # fmt: skip
    assert flag.returncode == 0 and flag.stdout.strip().endswith(f"0 recording(s) in {empty}")


def test_ls_with_a_bad_config_says_so_in_one_line(tmp_path: Path) -> None:
    result = ls(cwd=tmp_path, env={"RECEIVER_CONFIG": str(tmp_path / "missing.toml")})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tap-receiver: configuration error: ")
    assert "does not exist" in lines[0]
