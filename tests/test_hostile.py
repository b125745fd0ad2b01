"""An attacker's story (issue 16): hostile requests, files and directories against the real server
and the real command line. Each answer must be a clear status, close code or message; nothing
may cost the server its life, a traceback in its log, or another tap its recording."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from receiver.rtp.packet import RtpPacket
from tests import reference
from tests.helpers import (
    DEADLINE,
    ROOT,
    TOKEN,
    ServerProcess,
    free_port,
    g711_encode,
    noise,
    read_wav,
    require_tool,
    talk,
    upgrade_by_hand,
    wait_for_health,
    wait_for_sidecar,
    wait_until,
)


def raw_http(server: ServerProcess, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `request` byte for byte (no client library to clean it up); the status, the headers
    (lower-case names) and the body of the answer."""
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=DEADLINE) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(1 << 20):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def log_lines(server: ServerProcess) -> list[str]:
    return server.log().splitlines()


# -- 4: non-UTF-8 bytes in `Authorization: Bearer` ---------------------------------------------


def test_non_utf8_bearer_token_is_a_plain_401_everywhere(make_server: Any) -> None:
    server = make_server("--token", TOKEN)
    for target in (b"/tap/utf8-probe", b"/t/wrong/tap/utf8-probe", b"/api/taps", b"/metrics"):
        before = len(log_lines(server))
        status, headers, body = raw_http(
            server,
            b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer \xff\xfe" + TOKEN.encode() + b"\xff\r\n"
            b"Connection: close\r\n\r\n",
        )
        assert status == 401, (target, status, body)
        assert headers["content-type"].startswith("application/json")
        assert json.loads(body)["status"] == 401
        assert len(log_lines(server)) - before <= 1, log_lines(server)[before:]
    assert server.health() is not None
    assert "Traceback" not in server.log()


# -- 8: malformed control bodies ---------------------------------------------------------------


def post_bytes(server: ServerProcess, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    status, headers, answer = raw_http(
        server,
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n".encode()
        + body,
    )
    assert headers["content-type"].startswith("application/json"), (path, status, answer)
    return status, json.loads(answer)


def ws_status_event(uri: str) -> bytes:
    device = {"type": "ws", "params": {"uri": uri}}
    params = {"control_id": "ctl-uri", "state": "tapping", "device": device}
    return json.dumps({"event_type": "calling.call.tap", "params": params}).encode()


def test_malformed_control_bodies_get_400_json(make_server: Any) -> None:
    server = make_server("--token", TOKEN)
    hostile = [
        b"[" * 5000 + b"]" * 5000,
        b'{"a":' * 5000 + b"1" + b"}" * 5000,
        b"[" * 100_000,
        b'{"tap_id": "\xff\xfe"}',
        b"",
        b"null",
    ]
    for path in ("/api/taps", "/signalwire/tap-status", f"/t/{TOKEN}/signalwire/tap-status"):
        for body in hostile:
            status, answer = post_bytes(server, path, body)
            assert status == 400 and answer["status"] == 400, (path, body[:20], answer)
    for uri in ("ws://[::1", "wss://[fe80::1/t/x/tap/a", "ws://a\uff03b/tap/x"):
        status, answer = post_bytes(server, "/signalwire/tap-status", ws_status_event(uri))
        assert status == 400 and "uri" in answer["error"], (uri, answer)
    # a URI that parses still works, and so does the server
    status, answer = post_bytes(server, "/signalwire/tap-status", ws_status_event("ws://h/tap/a"))
    assert status == 200 and answer["result"].startswith("linked")
    assert server.health() is not None
    assert "Traceback" not in server.log()


# -- 12: exact answers: an empty suffix range, the close code a protocol error sent -------------


def raw_websocket(server: ServerProcess, path: str) -> socket.socket:
    """A WebSocket upgraded by hand, so that frames no client library would send can be sent."""
    sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=DEADLINE)
    return upgrade_by_hand(sock, path)


def masked(opcode_byte: int, payload: bytes) -> bytes:
    """A client frame (FIN and opcode in the first byte), masked with a zero key."""
    if len(payload) < 126:
        length = bytes([0x80 | len(payload)])
    else:
        assert len(payload) < 65536
        length = bytes([0x80 | 126]) + len(payload).to_bytes(2, "big")
    return bytes([opcode_byte]) + length + b"\0\0\0\0" + payload


def close_code_received(sock: socket.socket) -> int:
    """The code of the close frame the server sends (skipping any other frame)."""
    data = b""
    while True:
        chunk = sock.recv(4096)
        assert chunk, "connection closed without a close frame"
        data += chunk
        while len(data) >= 2:
            length = data[1] & 0x7F
            if len(data) < 2 + length:
                break
            if data[0] & 0x0F == 0x8:
                return int.from_bytes(data[2:4], "big")
            data = data[2 + length :]


def test_protocol_errors_record_the_close_code_sent(make_server: Any) -> None:
    server = make_server("--token", TOKEN)
    audio = masked(0x82, b"\xff" * 100)
    cases = {  # tap id: (what the peer sends, the code the server closes with, the sidecar's)
        "bad-utf8": (masked(0x81, b"ok \xff\xfe"), 1007, 1007),
        "reserved-bits": (masked(0xC2, b"\xff" * 10), 1002, 1002),
        "close-1005": (masked(0x88, (1005).to_bytes(2, "big")), 1002, 1002),
        "peer-says-1007": (masked(0x88, (1007).to_bytes(2, "big") + b"bad data"), 1000, 1007),
        "peer-says-4001": (masked(0x88, (4001).to_bytes(2, "big")), 1000, 4001),
    }
    for tap_id, (frame, answer, code) in cases.items():
        with raw_websocket(server, f"/t/{TOKEN}/tap/{tap_id}") as sock:
            sock.sendall(audio + frame)
            assert close_code_received(sock) == answer, tap_id
        sidecar = wait_for_sidecar(server.recordings, tap_id)
        assert sidecar["close_code"] == code, (tap_id, sidecar)
        assert sidecar["frames_written"] == 100  # what came before is kept
    assert "Traceback" not in server.log()


def test_an_empty_suffix_range_is_416(make_server: Any) -> None:
    server = make_server("--token", TOKEN)
    with raw_websocket(server, f"/t/{TOKEN}/tap/ranged") as sock:
        sock.sendall(masked(0x82, b"\xff" * 100) + masked(0x88, (1000).to_bytes(2, "big")))
        close_code_received(sock)
    wait_for_sidecar(server.recordings, "ranged")
    size = (server.recordings / "ranged.wav").stat().st_size
    auth = f"Authorization: Bearer {TOKEN}\r\n"

    def get(range_value: str) -> tuple[int, dict[str, str], bytes]:
        return raw_http(
            server,
            f"GET /api/taps/ranged/audio HTTP/1.1\r\nHost: x\r\n{auth}Range: {range_value}\r\n"
            "Connection: close\r\n\r\n".encode(),
        )

    for empty in ("bytes=-0", "bytes=-000"):
        status, headers, _ = get(empty)
        assert status == 416 and headers["content-range"] == f"bytes */{size}", (empty, status)
    # every other suffix still works, the smallest included
    status, headers, body = get("bytes=-1")
    assert status == 206 and headers["content-range"] == f"bytes {size - 1}-{size - 1}/{size}"
    assert body == (server.recordings / "ranged.wav").read_bytes()[-1:]
    status, _, body = get(f"bytes=-{size + 10}")
    assert status == 206 and len(body) == size


# -- 6: links and special files in the recordings directory ------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """`tap-receiver ARGS` (as `python -m receiver`), bounded so that a hang fails the test."""
    return subprocess.run(
        [sys.executable, "-m", "receiver", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def plain_wav(samples: int = 800, rate: int = 8000, channels: int = 1, bits: int = 16,
              block_align: int | None = None, data: bytes | None = None) -> bytes:  # fmt: skip
    """A 44-byte-header PCM WAV built by hand, any field as given (sane or not)."""
    block = channels * bits // 8 if block_align is None else block_align
    audio = noise(samples * 2, 5) if data is None else data
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * block, block, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data"
    body += struct.pack("<I", len(audio)) + audio
    return b"RIFF" + struct.pack("<I", len(body)) + body


def test_links_and_special_files_are_never_followed_or_opened(
    make_server: Any, tmp_path: Path
) -> None:
    recordings = tmp_path / "rec"
    recordings.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    # a WAV outside whose header recovery would "repair" (RIFF size 0) if it followed a link
    target = outside / "victim.wav"
    target.write_bytes(b"RIFF\0\0\0\0" + plain_wav()[8:])
    secret = outside / "secret.json"
    secret.write_text(json.dumps({"state": "finished", "tap_id": "secret", "password": "x"}))
    before = {p.name: p.read_bytes() for p in outside.iterdir()}
    (recordings / "passwd.wav").symlink_to("/etc/passwd")
    (recordings / "evil.wav").symlink_to(target)
    (recordings / "evil2.wav").symlink_to(target)
    (recordings / "evil2.json").write_text(json.dumps({"state": "recording", "tap_id": "evil2"}))
    (recordings / "leak.wav").write_bytes(plain_wav())
    (recordings / "leak.json").symlink_to(secret)
    (recordings / ".planted.json.tmp").symlink_to(outside / "planted.json")
    os.mkfifo(recordings / "fifo.wav")
    os.mkfifo(recordings / "fifo2.json")
    (recordings / "fifo2.wav").write_bytes(plain_wav())
    (recordings / "dir.wav").mkdir()

    server = make_server("--token", TOKEN, recordings=recordings)  # starts: no fifo waited on
    wait_for_health(server, lambda h: h["recovery"]["state"] == "done", "recovery done")
    assert "recovery skips evil.wav: not a regular file" in server.log()
    sidecar = wait_for_sidecar(recordings, "evil2", "failed")
    assert "not a regular file" in sidecar["error"]
    with raw_websocket(server, f"/t/{TOKEN}/tap/planted") as sock:
        sock.sendall(masked(0x82, b"\xff" * 80) + masked(0x88, (1000).to_bytes(2, "big")))
        close_code_received(sock)
    assert wait_for_sidecar(recordings, "planted")["frames_written"] == 80

    def get(target: str) -> tuple[int, bytes]:
        status, _, body = raw_http(
            server,
            f"GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Connection: close\r\n\r\n".encode(),
        )
        return status, body

    for name in ("passwd", "evil", "fifo", "dir"):
        for action in ("", "/audio", "/waveform", "/spectrogram", "/levels"):
            status, body = get(f"/api/taps/{name}{action}")
            assert status == 404, (name, action, status, body[:200])
            assert b"root:" not in body
    status, body = get("/api/taps?limit=1000")
    listed = {tap["name"] for tap in json.loads(body)["taps"]}
    assert not listed & {"passwd", "evil", "fifo", "dir"}
    # its WAV is real, its sidecar a link: never read (recovery gave the WAV a sidecar of its
    # own, in place of the link; the file the link pointed to is untouched, see below)
    status, body = get("/api/taps/leak")
    assert status == 200 and b"password" not in body

    ls = run_cli("ls", "--json", "--recordings", str(recordings))
    assert ls.returncode == 0 and "passwd" not in ls.stdout and "password" not in ls.stdout
    for name in ("passwd", "evil", "fifo"):
        inspected = run_cli("inspect", name, "--recordings", str(recordings))
        assert inspected.returncode == 1, inspected
        assert "not a regular file" in inspected.stderr and "root:" not in inspected.stdout
        assert "Traceback" not in inspected.stderr
    repaired = run_cli("repair", "--force", str(recordings))
    assert "skipped evil.wav: not a regular file" in repaired.stdout, repaired.stdout
    assert "Traceback" not in repaired.stderr
    assert {p.name: p.read_bytes() for p in outside.iterdir()} == before  # nothing outside
    assert (recordings / "passwd.wav").is_symlink() and (recordings / "evil.wav").is_symlink()
    assert server.health() is not None
    assert "Traceback" not in server.log()


# -- 5: the server starts whatever recovery finds ----------------------------------------------


def test_recovery_handles_each_file_on_its_own_and_the_server_starts(
    make_server: Any, tmp_path: Path
) -> None:
    recordings = tmp_path / "rec"
    recordings.mkdir()
    hostile = {
        "rate0.wav": plain_wav(rate=0),
        "deep.json": b'{"state": "recording", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "deep.wav": plain_wav(),
        "deeper.json": b"[" * 100_000,
        "garbage.wav": noise(3000, 7),
        "empty.wav": b"",
        "badrate.json": json.dumps({"state": "recording", "sample_rate": "x"}).encode(),
        "badrate.wav": plain_wav(),
        "tracks.json": json.dumps({"state": "recording", "track_files": {"a": "../../x.wav",
                                                                        "b": 7}}).encode(),
        "tracks.wav": plain_wav(),
    }  # fmt: skip
    for name, content in hostile.items():
        (recordings / name).write_bytes(content)
    good = plain_wav(1600)
    (recordings / "good.wav").write_bytes(b"RIFF\0\0\0\0" + good[8:])  # a crash's zeroed size

    server = make_server("--token", TOKEN, recordings=recordings)
    wait_for_health(server, lambda h: h["recovery"]["state"] == "done", "recovery done")
    sidecar = wait_for_sidecar(recordings, "good")
    assert sidecar["recovered"] is True and sidecar["frames_written"] == 1600
    assert (recordings / "good.wav").read_bytes() == good  # repaired
    log = server.log()
    for name in hostile:
        stem = name.rpartition(".")[0]
        assert stem in log, f"nothing logged about {name}"
    assert "Traceback" not in log
    assert server.health() is not None


# -- 7: odd WAVs and sidecars in the inspection API and the command line ------------------------


def float_wav_header(frames: int) -> bytes:
    """The header of a mono 32-bit float WAV of `frames` frames (data not included)."""
    fmt = struct.pack("<HHIIHH", 3, 1, 8000, 32000, 4, 32)
    size = 4 * frames
    return (b"RIFF" + struct.pack("<I", 36 + size) + b"WAVE" + b"fmt " + struct.pack("<I", 16)
            + fmt + b"data" + struct.pack("<I", size))  # fmt: skip


def odd_recordings(directory: Path) -> set[str]:
    """WAVs whose headers lie, and sidecars no server wrote; returns their names."""
    wavs = {
        "rate0": plain_wav(rate=0),
        "ch65535": plain_wav(50, channels=65535, bits=8, data=bytes(65535 * 50)),
        "ch65535-16": plain_wav(50, channels=65535, block_align=2, data=bytes(65535 * 100)),
        "block3": plain_wav(block_align=3),
        "bits0": plain_wav(bits=0, block_align=1),
        "hugerate": plain_wav(rate=4_000_000_000 // 2),
        "deep": plain_wav(),
        "deep900": plain_wav(),
        "typed": plain_wav(),
        "fine": plain_wav(),
    }
    for name, content in wavs.items():
        (directory / f"{name}.wav").write_bytes(content)
    with (directory / "bigfloat.wav").open("wb") as fh:  # sparse: 160 MB that take no disk
        fh.write(float_wav_header(40_000_000))
        fh.truncate(44 + 4 * 40_000_000)
    (directory / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (directory / "deep900.json").write_text('{"state": "finished", "x": ' + "[" * 900
                                            + "]" * 900 + "}")  # fmt: skip
    (directory / "typed.json").write_text(json.dumps({
        "state": ["finished"], "started_at": 5, "ended_at": {}, "duration_seconds": "long",
        "rtp": {"lost": "many", "received": [], "ssrcs": [1, None], "dtmf": [1, {"start": "x"}],
                "discontinuities": "none"},
        "events": [None, {"type": "dtmf", "at": 1e308, "digit": {}}, {"type": 5, "at": "x"}],
        "counters": [1, 2], "track_files": [1], "tap_id": {"a": 1}, "transport": 5,
    }))  # fmt: skip
    return {*wavs, "bigfloat"}


def test_odd_wavs_and_sidecars_get_clear_answers_and_bounded_memory(make_server: Any) -> None:
    server = make_server("--token", TOKEN, start=False)
    server.recordings.mkdir(parents=True)
    # memory per request must not follow a header: 2 GiB of address space is plenty
    gib = 1 << 30
    server.popen_kwargs["preexec_fn"] = lambda: resource.setrlimit(
        resource.RLIMIT_AS, (2 * gib, 2 * gib)
    )
    server.start()
    names = odd_recordings(server.recordings)  # after recovery: the server sees them as they are

    def get(target: str) -> tuple[int, dict[str, str], bytes]:
        return raw_http(
            server,
            f"GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Connection: close\r\n\r\n".encode(),
        )

    status, _, body = get("/api/taps?limit=1000")
    assert status == 200
    assert {tap["name"] for tap in json.loads(body)["taps"]} == names
    for name in sorted(names):
        for action in ("", "/audio", "/waveform?width=10000", "/spectrogram?width=4000&height=1024",
                       "/levels"):  # fmt: skip
            status, headers, body = get(f"/api/taps/{name}{action}")
            assert status in (200, 422), (name, action, status, body[:300])
            if status == 422:
                assert headers["content-type"].startswith("application/json")
                assert json.loads(body)["error"].startswith(f"cannot read {name}.wav")
    for bad in ("rate0", "ch65535", "ch65535-16", "block3", "bits0", "bigfloat"):
        assert get(f"/api/taps/{bad}/levels")[0] == 422, bad
    assert get("/api/taps/fine/levels")[0] == 200
    assert get("/api/taps/hugerate/spectrogram")[0] == 200  # odd but readable
    assert server.health() is not None
    assert "Traceback" not in server.log()

    ls = run_cli("ls", "--recordings", str(server.recordings))
    assert ls.returncode == 0 and "Traceback" not in ls.stderr, ls.stderr
    assert f"{len(names)} recording(s)" in ls.stdout
    assert "deep.json is not valid JSON" in ls.stderr and "deep900.json nests" in ls.stderr
    as_json = run_cli("ls", "--json", "--recordings", str(server.recordings))
    assert {json.loads(line)["name"] for line in as_json.stdout.splitlines()} == names
    for name in sorted(names):
        inspected = run_cli("inspect", name, "--recordings", str(server.recordings))
        assert "Traceback" not in inspected.stderr, (name, inspected.stderr)
        if name in ("rate0", "ch65535", "ch65535-16", "block3", "bits0", "bigfloat"):
            said = "bad fmt chunk" in inspected.stderr or "too many to decode" in inspected.stderr
            assert inspected.returncode == 1 and said, (name, inspected.stderr)
        else:
            assert inspected.returncode == 0, (name, inspected.stderr)


# -- 10: every file the server writes can be listed, fetched and deleted -----------------------


def test_a_128_character_id_used_twice_is_listed_fetched_and_deleted(make_server: Any) -> None:
    server = make_server("--token", TOKEN)
    tap_id = "L" + "o" * 126 + "g"
    for n in range(2):
        with raw_websocket(server, f"/t/{TOKEN}/tap/{tap_id}") as sock:
            sock.sendall(masked(0x82, bytes([n]) * 80) + masked(0x88, (1000).to_bytes(2, "big")))
            close_code_received(sock)
    second = f"{tap_id}.1"
    wait_for_sidecar(server.recordings, tap_id)
    assert wait_for_sidecar(server.recordings, second)["file"] == f"{second}.wav"

    def call(method: str, target: str) -> tuple[int, bytes]:
        status, _, body = raw_http(
            server,
            f"{method} {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Connection: close\r\n\r\n".encode(),
        )
        return status, body

    status, body = call("GET", "/api/taps")
    assert {t["name"] for t in json.loads(body)["taps"]} == {tap_id, second}
    ls = run_cli("ls", "--recordings", str(server.recordings))
    assert second in ls.stdout and "2 recording(s)" in ls.stdout
    assert run_cli("inspect", second, "--recordings", str(server.recordings)).returncode == 0
    for action in ("", "/audio", "/waveform", "/levels", "/spectrogram"):
        status, body = call("GET", f"/api/taps/{second}{action}")
        assert status == 200, (action, body[:200])
    assert body.startswith(b"\x89PNG")
    status, body = call("GET", f"/api/taps/{second}/audio")
    assert body == (server.recordings / f"{second}.wav").read_bytes()
    for name in (second, tap_id):
        status, body = call("DELETE", f"/api/taps/{name}")
        assert status == 200, body
    assert not [p for p in server.recordings.iterdir() if not p.name.startswith(".")]
    # what is not a name the server writes is still refused
    for bad in ("x" * 129, f"{tap_id}.12345", f"{tap_id}.a", f"{tap_id}x.1"):
        assert call("GET", f"/api/taps/{bad}")[0] == 400, bad


# -- 11: the command line in pipes, and repair --dry-run as a check ----------------------------


def many_recordings(directory: Path, count: int) -> None:
    """`count` small finished recordings, written as the server would leave them."""
    directory.mkdir(parents=True, exist_ok=True)
    for n in range(count):
        (directory / f"pipe-{n:04d}.wav").write_bytes(plain_wav(80))
        (directory / f"pipe-{n:04d}.json").write_text(json.dumps({
            "tap_id": f"pipe-{n:04d}", "transport": "websocket", "codec": "PCMU",
            "sample_rate": 8000, "channels": 1, "state": "finished", "duration_seconds": 0.01,
            "started_at": f"2026-01-01T00:00:{n % 60:02d}.000Z",
        }))  # fmt: skip


def test_cli_output_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    recordings = tmp_path / "rec"
    many_recordings(recordings, 600)  # ls --json writes far more than a pipe holds
    for command in ("ls --json", "ls", "inspect pipe-0001 --json"):
        shell = (f"set -o pipefail; {sys.executable} -m receiver {command} "
                 f"--recordings {recordings} | head -1")  # fmt: skip
        result = subprocess.run(["bash", "-c", shell], cwd=ROOT, capture_output=True, text=True,
                                timeout=60)  # fmt: skip
        assert len(result.stdout.splitlines()) == 1, (command, result.stdout[:300])
        assert result.stderr == "", (command, result.stderr)
        assert result.returncode in (0, 141), (command, result.returncode)
    # a reader that is gone before anything is written: the first write fails, every time
    for command in (["ls", "--json"], ["inspect", "pipe-0001"], ["repair", "--dry-run"]):
        proc = subprocess.Popen([sys.executable, "-m", "receiver", *command, "--recordings",
                                 str(recordings)], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)  # fmt: skip
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        stderr = proc.stderr.read().decode()
        assert proc.wait(timeout=60) == 141, (command, stderr)
        assert stderr == "", (command, stderr)


def test_repair_dry_run_exit_status_says_whether_fixes_are_needed(tmp_path: Path) -> None:
    healthy = tmp_path / "healthy"
    healthy.mkdir()
    wav = healthy / "a.wav"
    wav.write_bytes(plain_wav())
    os.utime(wav, (time.time() - 3600, time.time() - 3600))
    assert run_cli("repair", "--dry-run", str(healthy)).returncode == 0
    wav.write_bytes(b"RIFF\0\0\0\0" + plain_wav()[8:])  # a crash's zeroed RIFF size
    os.utime(wav, (time.time() - 3600, time.time() - 3600))
    checked = run_cli("repair", "--dry-run", str(healthy))
    assert checked.returncode == 3 and "would fix a.wav" in checked.stdout
    assert wav.read_bytes()[4:8] == b"\0\0\0\0"  # a dry run changes nothing
    assert run_cli("repair", str(healthy)).returncode == 0  # fixed
    assert run_cli("repair", "--dry-run", str(healthy)).returncode == 0  # nothing left to fix
    (healthy / "b.wav").write_bytes(b"not a wav at all")
    os.utime(healthy / "b.wav", (time.time() - 3600, time.time() - 3600))
    assert run_cli("repair", "--dry-run", str(healthy)).returncode == 1  # cannot be repaired


# -- 3: the token never leaves in what is stored, served, sent or logged -----------------------


def test_the_token_is_redacted_everywhere_it_could_leave(make_server: Any) -> None:
    hooked: list[bytes] = []
    device = {
        "type": "ws",
        "params": {
            "uri": f"wss://tap.example.com/t/{TOKEN}/tap/early?token={TOKEN}",
            "codec": "PCMU",
            "headers": {"Authorization": f"Bearer {TOKEN}"},
        },
    }
    params = {"call_id": "c-1", "node_id": "n-1", "tap": {"params": {"direction": "both"}},
              "device": device}  # fmt: skip
    custom = {"token": TOKEN, "Authorization": f"Bearer {TOKEN}",
              "callback": f"https://x.example/t/{TOKEN}/hook?token={TOKEN}"}  # fmt: skip
    media_format = {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
    start = {"event": "start", "start": {"streamSid": "MZ1", "tracks": ["inbound"],
                                         "customParameters": custom,
                                         "mediaFormat": media_format}}  # fmt: skip

    async def run(server: ServerProcess) -> dict[str, bytes]:
        served: dict[str, bytes] = {}
        auth = {"Authorization": f"Bearer {TOKEN}"}
        status_url = f"{server.base_url}/t/{TOKEN}/signalwire/tap-status"
        async with aiohttp.ClientSession() as session:
            tapping = {"params": {**params, "control_id": "ctl-early", "state": "tapping"}}
            async with session.post(status_url, json=tapping) as answer:
                served["tapping"] = await answer.read()
            async with session.ws_connect(f"{server.ws_url}/t/{TOKEN}/tap/early") as ws:
                await ws.send_bytes(b"\xff" * 800)
                await asyncio.to_thread(wait_until, lambda: (server.recordings / "ctl-early.json")
                                        .exists(), "the first sidecar")  # fmt: skip
                async with session.get(f"{server.base_url}/api/taps/ctl-early",
                                       headers=auth) as answer:  # fmt: skip
                    served["live"] = await answer.read()
            async with session.ws_connect(f"{server.ws_url}/stream/streamed?token={TOKEN}") as ws:
                await ws.send_str(json.dumps(start))
                await ws.send_bytes(b"")
            finished = {"params": {**params, "control_id": "ctl-early", "state": "finished"}}
            async with session.post(status_url, json=finished) as answer:
                served["finished"] = await answer.read()
            for name in ("ctl-early", "streamed"):
                await asyncio.to_thread(wait_for_sidecar, server.recordings, name)
                async with session.get(f"{server.base_url}/api/taps/{name}",
                                       headers=auth) as answer:  # fmt: skip
                    served[name] = await answer.read()
            async with session.get(f"{server.base_url}/api/taps", headers=auth) as answer:
                served["list"] = await answer.read()
        await asyncio.to_thread(wait_until, lambda: len(hooked) >= 2, "both webhooks")
        return served

    async def main() -> tuple[ServerProcess, dict[str, bytes]]:
        async def hook(request: web.Request) -> web.Response:
            hooked.append(await request.read())
            return web.Response()

        app = web.Application()
        app.router.add_post("/hook", hook)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        hook_url = f"http://127.0.0.1:{port}/hook"
        server = make_server("--token", TOKEN, "--webhook-url", hook_url, "--webhook-secret", "s")
        try:
            return server, await run(server)
        finally:
            await runner.cleanup()

    server, served = asyncio.run(main())
    # a request line aiohttp refuses is logged with a traceback that quotes it
    raw_http(server, f"GET /t/{TOKEN}/tap/x\xff HTTP/1.1\r\nHost: x\r\n\r\n".encode("latin-1"))
    secret = TOKEN.encode()
    sidecar = json.loads((server.recordings / "ctl-early.json").read_text())
    assert sidecar["signalwire"]["device"]["params"]["uri"] == (
        "wss://tap.example.com/t/<redacted>/tap/early?token=<redacted>"
    )
    for path in server.recordings.glob("*.json"):
        assert secret not in path.read_bytes(), path.name
    for what, body in served.items():
        assert secret not in body, (what, body[:500])
    assert len(hooked) == 2 and not [body for body in hooked if secret in body]
    cli_json = run_cli("inspect", "streamed", "--json", "--recordings", str(server.recordings))
    assert cli_json.returncode == 0 and TOKEN not in cli_json.stdout
    assert server.stop() == 0
    # Only the start-up banner shows it (the URIs to paste): one log record of several lines.
    leaking = [line for line in server.log().splitlines() if TOKEN in line]
    assert len(leaking) == 2, leaking
    assert "WebSocket tap:" in leaking[0] and "recordings page:" in leaking[1], leaking


def test_sidecars_written_before_redaction_serve_no_token(make_server: Any, tmp_path: Path) -> None:
    recordings = tmp_path / "rec"
    recordings.mkdir()
    (recordings / "old.wav").write_bytes(plain_wav())
    old = {"tap_id": "old", "state": "finished", "started_at": "2026-01-01T00:00:00.000Z",
           "signalwire": {"device": {"params": {"uri": f"wss://h/t/{TOKEN}/tap/old"}}}}  # fmt: skip
    (recordings / "old.json").write_text(json.dumps(old))
    server = make_server("--token", TOKEN, recordings=recordings)
    for target in ("/api/taps", "/api/taps/old"):
        status, _, body = raw_http(
            server,
            f"GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Connection: close\r\n\r\n".encode(),
        )
        assert status == 200 and TOKEN.encode() not in body
        assert target == "/api/taps" or b"/t/<redacted>/tap/old" in body
    for args in (("inspect", "old"), ("inspect", "old", "--json"), ("ls", "--json")):
        shown = run_cli(*args, "--recordings", str(recordings))
        assert shown.returncode == 0 and TOKEN not in shown.stdout, args


# -- 9: what a status callback for a tap not yet connected keeps -------------------------------


def rss_kib(server: ServerProcess) -> int:
    assert server.proc is not None
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])


def test_pending_names_keep_only_small_signalwire_fields(make_server: Any) -> None:
    server = make_server("--token", TOKEN)
    url = f"/t/{TOKEN}/signalwire/tap-status"
    padding = "p" * 450_000

    def callback(n: int) -> bytes:
        device = {
            "type": "ws",
            "params": {
                "uri": f"wss://h/tap/later-{n}",
                "codec": "PCMU",
                "junk": padding,
                "nested": {"a": [padding[:1000]]},
            },
        }
        params = {"control_id": f"ctl-later-{n}", "state": "tapping", "call_id": padding,
                  "node_id": {"deep": padding[:1000]}, "device": device}  # fmt: skip
        return json.dumps({"event_type": "calling.call.tap", "params": params}).encode()

    post_bytes(server, url, callback(0))  # the first one grows the heap for good
    before = rss_kib(server)
    for n in range(1, 300):
        status, answer = post_bytes(server, url, callback(n))
        assert status == 200 and answer["result"].startswith("linked"), answer
    grown = rss_kib(server) - before
    health = server.health()
    assert health is not None and health["names"]["pending"] == 300
    assert grown < 100_000, f"300 pending names hold {grown} KiB"  # 0.9 MB each were kept
    with raw_websocket(server, f"/t/{TOKEN}/tap/later-7") as sock:
        sock.sendall(masked(0x82, b"\xff" * 80) + masked(0x88, (1000).to_bytes(2, "big")))
        close_code_received(sock)
    sidecar = wait_for_sidecar(server.recordings, "ctl-later-7")
    assert sidecar["signalwire"] == {
        "control_id": "ctl-later-7",
        "call_id": padding[:256],
        "node_id": None,
        "segment_id": None,
        "direction": None,
        "device": {"type": "ws", "params": {"uri": "wss://h/tap/later-7", "codec": "PCMU"}},
    }
    assert (server.recordings / "ctl-later-7.json").stat().st_size < 10_000


# -- 2: a recordings directory that stops taking files -----------------------------------------


@pytest.fixture
def read_only_mounts() -> Iterator[Any]:
    """Factory: make a directory read-only with a bind mount over it (the files already open
    stay writable through the mount below, as when a volume is remounted read-only under a
    running server); returns a function that makes it writable again. Needs root: under CI=true
    (which runs as root) a failure to mount fails the test instead of skipping it."""
    mounted: list[Path] = []

    def make_read_only(directory: Path) -> Any:
        for command in (["mount", "--bind", str(directory), str(directory)],
                        ["mount", "-o", "remount,ro,bind", str(directory)]):  # fmt: skip
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                if os.environ.get("CI"):
                    pytest.fail(f"{' '.join(command)}: {result.stderr.strip()} (CI runs as root)")
                pytest.skip(f"cannot make a read-only bind mount here: {result.stderr.strip()}")
            if command[1] == "--bind":
                mounted.append(directory)

        def make_writable() -> None:
            subprocess.run(["umount", str(directory)], check=True)
            mounted.remove(directory)

        return make_writable

    yield make_read_only
    for directory in mounted:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def close_frame_received(sock: socket.socket) -> tuple[int, str]:
    """The code and reason of the close frame the server sends (skipping other frames)."""
    data = b""
    while True:
        chunk = sock.recv(4096)
        assert chunk, "connection closed without a close frame"
        data += chunk
        while len(data) >= 2:
            length = data[1] & 0x7F
            if len(data) < 2 + length:
                break
            if data[0] & 0x0F == 0x8:
                return int.from_bytes(data[2:4], "big"), data[4 : 2 + length].decode()
            data = data[2 + length :]


def test_a_read_only_recordings_directory_refuses_taps_and_recovers(
    make_server: Any, read_only_mounts: Any
) -> None:
    server = make_server("--token", TOKEN)
    recordings = server.recordings
    sent = noise(1600, 21)
    during = raw_websocket(server, f"/t/{TOKEN}/tap/during")
    during.sendall(masked(0x82, sent[:100]))
    wait_for_sidecar(recordings, "during", "recording")
    late = raw_websocket(server, f"/t/{TOKEN}/tap/late")  # upgraded, no frame yet: no files
    make_writable = read_only_mounts(recordings)

    # accepted before the directory turned read-only: refused once its files cannot be made
    late.sendall(masked(0x82, b"\xff" * 100))
    code, reason = close_frame_received(late)
    late.close()
    assert code == 1011 and "Read-only file system" in reason, (code, reason)
    # known before the upgrade: 503, for WebSocket and RTP alike
    wait_until(lambda: (server.health() or {}).get("recordings", {}).get("writable") is False,
               "the health check to report the directory")  # fmt: skip
    status, _, body = raw_http(
        server,
        f"GET /t/{TOKEN}/tap/refused HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade, close\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode(),
    )
    assert status == 503 and "not writable" in json.loads(body)["error"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rtp:
        rtp.sendto(RtpPacket(0, True, 1, 160, 7, b"\xff" * 160).serialize(),
                   ("127.0.0.1", server.rtp_port))  # fmt: skip
        wait_until(lambda: (server.health() or {}).get("rtp", {}).get("refused_unwritable"),
                   "the RTP source to be refused")  # fmt: skip
    health = server.health()
    assert health is not None
    assert health["recordings"]["problem"] == "Read-only file system"
    assert health["recordings"]["taps_refused_without_files"] == 1
    assert health["websocket"]["rejected_unwritable"] == 1
    checked = subprocess.run([sys.executable, "-m", "receiver.server.healthcheck", "--host",
                              "127.0.0.1", "--http-port", str(server.http_port)],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
    assert checked.returncode == 1 and "not writable" in checked.stderr

    # a tap that was recording goes on, and ends while nothing can be created
    during.sendall(masked(0x82, sent[100:]) + masked(0x88, (1000).to_bytes(2, "big")))
    close_code_received(during)
    during.close()
    wait_until(lambda: (server.health() or {}).get("recordings", {}).get("sidecars_pending"),
               "the final sidecar to wait for the directory")  # fmt: skip
    status, _, _ = raw_http(
        server,
        f"DELETE /api/taps/during HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    assert status == 409  # still being finalized

    make_writable()
    sidecar = wait_for_sidecar(recordings, "during")  # finalized once it could be
    assert sidecar["frames_written"] == len(sent) and sidecar["close_code"] == 1000
    samples, _ = read_wav(recordings / "during.wav")
    assert np.array_equal(samples, reference.decode("PCMU", sent))
    assert not list(recordings.glob("late*")) and not list(recordings.glob("refused*"))
    wait_until(lambda: (server.health() or {}).get("recordings", {}).get("writable"),
               "the directory to be writable again")  # fmt: skip
    with raw_websocket(server, f"/t/{TOKEN}/tap/after") as sock:
        sock.sendall(masked(0x82, b"\xff" * 100) + masked(0x88, (1000).to_bytes(2, "big")))
        assert close_code_received(sock) == 1000
    assert wait_for_sidecar(recordings, "after")["frames_written"] == 100
    assert "Traceback" not in server.log()


# -- a recordings directory the server's uid cannot write: say how to fix it -------------------


def test_an_unwritable_recordings_directory_names_the_uid_and_the_fix(tmp_path: Path) -> None:
    setpriv = shutil.which("setpriv")
    if setpriv is None or os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("needs setpriv (util-linux) and root, which CI has")
        pytest.skip("needs setpriv (util-linux) and root to run the server as uid 10001")
    top = Path(tempfile.mkdtemp(prefix="perm-"))  # tmp_path's parents are 0700: 10001 can't
    try:
        top.chmod(0o755)
        owned_by_root = top / "recordings"
        owned_by_root.mkdir(mode=0o755)
        for directory, owner in (
            (owned_by_root, owned_by_root),
            (owned_by_root / "sub", owned_by_root),
        ):
            result = subprocess.run(
                [setpriv, "--reuid", "10001", "--regid", "10001", "--clear-groups",
                 sys.executable, "-m", "receiver", "--recordings", str(directory)],
                cwd=ROOT, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert result.returncode == 2, result.stderr
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in result.stderr, lines
            assert "uid 10001" in lines[0] and f"chown 10001:10001 {owner}" in lines[0], lines[0]
            assert "--build-arg UID=" in lines[0]
    finally:
        shutil.rmtree(top)


# -- A-law sent to a tap that expects µ-law (and the reverse): detected, reported, kept ---------


def test_the_other_g711_law_is_detected_reported_and_recorded_as_declared(
    make_server: Any,
) -> None:
    server = make_server("--token", TOKEN)
    alaw = g711_encode("PCMA", talk(2.0, 1))
    ulaw = g711_encode("PCMU", talk(2.0, 2))
    cases = {  # tap id: (query, audio, what the check must say: likely law or None)
        "alaw-as-ulaw": ("", alaw, "PCMA"),
        "ulaw-as-alaw": ("?codec=pcma", ulaw, "PCMU"),
        "alaw-as-alaw": ("?codec=pcma", alaw, None),
        "ulaw-as-ulaw": ("", ulaw, None),
        "random-bytes": ("", noise(16000, 3), None),
    }
    for tap_id, (query, audio, likely) in cases.items():
        with raw_websocket(server, f"/t/{TOKEN}/tap/{tap_id}{query}") as sock:
            for i in range(0, len(audio), 160):
                sock.sendall(masked(0x82, audio[i : i + 160]))
            if tap_id == "alaw-as-ulaw":  # reported while it records, too
                wait_until(lambda: (get_detail(server, "alaw-as-ulaw").get("sidecar") or {})
                           .get("codec_mismatch"), "the live report")  # fmt: skip
            sock.sendall(masked(0x88, (1000).to_bytes(2, "big")))
            close_code_received(sock)
        sidecar = wait_for_sidecar(server.recordings, tap_id)
        declared = "PCMA" if query else "PCMU"
        samples, _ = read_wav(server.recordings / f"{tap_id}.wav")
        assert np.array_equal(samples, reference.decode(declared, audio))  # as declared, always
        if likely is None:
            assert "codec_mismatch" not in sidecar, (tap_id, sidecar.get("codec_mismatch"))
            continue
        mismatch = sidecar["codec_mismatch"]
        assert (mismatch["declared"], mismatch["likely"]) == (declared, likely), tap_id
        assert f"?codec={likely.lower()}" in mismatch["message"]
        assert get_detail(server, tap_id)["sidecar"]["codec_mismatch"] == mismatch
        warned = [line for line in server.log().splitlines() if f"tap {tap_id}: the audio" in line]
        assert len(warned) == 1, warned  # once per tap

    # RTP: payload type 0 (µ-law) that carries A-law
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rtp:
        rtp.bind(("127.0.0.1", 0))
        for n in range(len(alaw) // 160):
            packet = RtpPacket(0, n == 0, n, 160 * n, 9, alaw[160 * n : 160 * (n + 1)])
            rtp.sendto(packet.serialize(), ("127.0.0.1", server.rtp_port))
            time.sleep(0.02)  # in real time: audio ahead of the clock is not for this test
        name = f"rtp-127.0.0.1-{rtp.getsockname()[1]}"
        assert wait_until(lambda: (get_detail(server, name).get("sidecar") or {})
                          .get("codec_mismatch"), "the RTP report")["likely"] == "PCMA"  # fmt: skip
    assert "Traceback" not in server.log()


def get_detail(server: ServerProcess, name: str) -> dict[str, Any]:
    status, _, body = raw_http(
        server,
        f"GET /api/taps/{name} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    return json.loads(body) if status == 200 else {}


def test_the_page_shows_the_codec_warning(make_server: Any) -> None:
    executable = require_tool("chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    server = make_server("--token", TOKEN)
    alaw = g711_encode("PCMA", talk(1.5, 4))
    for tap_id, audio in (("mixed-up", alaw), ("random", noise(12000, 4))):
        with raw_websocket(server, f"/t/{TOKEN}/tap/{tap_id}") as sock:
            for i in range(0, len(audio), 160):
                sock.sendall(masked(0x82, audio[i : i + 160]))
            sock.sendall(masked(0x88, (1000).to_bytes(2, "big")))
            close_code_received(sock)
        wait_for_sidecar(server.recordings, tap_id)
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=executable, args=["--headless", "--no-sandbox", "--disable-gpu"]
        )
        try:
            page = chromium.new_page()
            page.goto(f"{server.base_url}/t/{TOKEN}/#/tap/mixed-up")
            badge = page.locator("#d-codec-warning")
            badge.wait_for(state="visible", timeout=10_000)
            assert badge.inner_text().lower() == "looks like pcma"
            facts = page.locator("#d-facts").inner_text()
            assert "Codec check" in facts and "A-law (PCMA)" in facts
            page.goto(f"{server.base_url}/t/{TOKEN}/#/tap/random")
            page.wait_for_function("() => document.getElementById('d-facts').innerText"
                                   ".includes('random.wav')")  # fmt: skip
            assert page.locator("#d-codec-warning").count() == 0
        finally:
            chromium.close()


# -- requests aiohttp cannot parse: a 400 and one line, never a traceback per request -----------


def test_unparsable_requests_are_one_log_line_each(make_server: Any) -> None:
    server = make_server("--token", TOKEN)
    garbage = [
        b"GET /tap/x\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /api/taps?token=\xff HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nBroken header without a colon\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
    ]
    for request in garbage:
        before = len(log_lines(server))
        status, _, _ = raw_http(server, request)
        assert status == 400, request
        new = log_lines(server)[before:]
        assert len(new) <= 1, new
    assert "Traceback" not in server.log()
    assert server.health() is not None


def test_a_tap_whose_files_do_not_fit_is_closed_with_1011(make_server: Any, tmpfs: Any) -> None:
    disk = tmpfs("1m")
    recordings = disk / "rec"
    server = make_server("--token", TOKEN, "--min-free-space", "0", recordings=recordings)
    filler = disk / "filler"
    # fill the disk to the last block
    with filler.open("wb", buffering=0) as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"\0" * 4096)
    with raw_websocket(server, f"/t/{TOKEN}/tap/no-room") as sock:
        sock.sendall(masked(0x82, b"\xff" * 160))
        code, reason = close_frame_received(sock)
    assert code == 1011 and reason.endswith("No space left on device"), (code, reason)
    assert not list(recordings.glob("no-room*"))  # nothing half-made is left
    health = server.health()
    assert health is not None and health["recordings"]["taps_refused_without_files"] == 1
    filler.unlink()
    with raw_websocket(server, f"/t/{TOKEN}/tap/room") as sock:
        sock.sendall(masked(0x82, b"\xff" * 160) + masked(0x88, (1000).to_bytes(2, "big")))
        assert close_code_received(sock) == 1000
    assert wait_for_sidecar(recordings, "room")["frames_written"] == 160
    assert "Traceback" not in server.log()
