"""Start-up, auth defaults, shutdown by signal, kill -9, and a disk that fills up mid-tap."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from receiver.rtp.packet import RtpPacket
from tests import reference
from tests.helpers import (
    DEADLINE,
    ServerProcess,
    assert_header_matches_data,
    banner,
    noise,
    read_wav,
    wait_for_live_frames,
    wait_for_sidecar,
    wait_for_wav_frames,
    ws_connect_status,
)


async def open_tap(url: str) -> tuple[aiohttp.ClientSession, aiohttp.ClientWebSocketResponse]:
    session = aiohttp.ClientSession()
    return session, await session.ws_connect(url)


def test_health_reports_both_listeners(make_server: Any) -> None:
    server = make_server("--no-auth")
    health = server.health()
    assert health is not None
    assert health["status"] == "ok"
    assert health["http_port"] == server.http_port
    assert health["rtp_port"] == server.rtp_port
    assert health["active_taps"] == 0
    assert health["auth"] is False
    # the UDP port is really bound by the server: binding it again fails
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock, pytest.raises(OSError):
        sock.bind(("127.0.0.1", server.rtp_port))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_finalizes_every_open_tap(make_server: Any, sig: int) -> None:
    server = make_server("--no-auth", "--rtp-idle-timeout", "60")
    ws_audio = {f"open-{i}": noise(4000 + 100 * i, i) for i in range(3)}
    rtp_audio = noise(160 * 25, 99)

    async def run() -> int:
        clients = []
        for tap_id, data in ws_audio.items():
            session, ws = await open_tap(f"{server.ws_url}/tap/{tap_id}")
            await ws.send_bytes(data)
            clients.append((session, ws))
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        for n in range(25):
            datagram = RtpPacket(0, False, n, 160 * n, 7, rtp_audio[n * 160 : (n + 1) * 160])
            udp.sendto(datagram.serialize(), ("127.0.0.1", server.rtp_port))
        rtp_name = f"rtp-127.0.0.1-{udp.getsockname()[1]}"
        for name, sent in [*ws_audio.items(), (rtp_name, rtp_audio)]:  # all of it has arrived
            await asyncio.to_thread(wait_for_live_frames, server, name, len(sent))
        health = server.health()
        assert health is not None and health["active_taps"] == 4
        # the clients keep reading, as a real sender's stack does, to answer the close
        readers = [asyncio.create_task(ws.receive(timeout=DEADLINE)) for _, ws in clients]
        # a shutdown that hangs is killed after DEADLINE: its exit code is not 0
        code = await asyncio.get_running_loop().run_in_executor(None, server.stop, sig)
        for reader, (session, _) in zip(readers, clients, strict=True):
            msg = await reader
            assert msg.type == aiohttp.WSMsgType.CLOSE
            assert msg.data == 1001  # going away
            await session.close()
        udp.close()
        return code

    assert asyncio.run(run()) == 0
    for tap_id, data in ws_audio.items():
        sidecar = wait_for_sidecar(server.recordings, tap_id)
        assert sidecar["end_reason"] == "shutdown" and sidecar["close_code"] == 1001
        samples, _ = read_wav(server.recordings / f"{tap_id}.wav")
        assert np.array_equal(samples, reference.decode("PCMU", data))
        assert assert_header_matches_data(server.recordings / f"{tap_id}.wav") == len(data)
    (rtp_json,) = server.recordings.glob("rtp-*.json")
    sidecar = json.loads(rtp_json.read_text())
    assert sidecar["state"] == "finished" and sidecar["end_reason"] == "shutdown"
    samples, _ = read_wav(server.recordings / sidecar["file"])
    assert np.array_equal(samples, reference.decode("PCMU", rtp_audio))
    assert "stopped after" in server.log()


def test_kill_9_leaves_a_wav_whose_header_matches_its_data(make_server: Any) -> None:
    server = make_server("--no-auth", "--flush-interval", "0.1")
    sent = noise(8000 * 3, 5)

    async def run() -> None:
        session, ws = await open_tap(f"{server.ws_url}/tap/crash")
        for i in range(0, len(sent) // 2, 160):
            await ws.send_bytes(sent[i : i + 160])
            await asyncio.sleep(0.002)  # pacing: the audio reaches the disk over several batches
        # the header says everything sent is on disk
        wav = server.recordings / "crash.wav"
        await asyncio.to_thread(wait_for_wav_frames, wav, len(sent) // 2)
        server.kill9()
        await session.close()

    asyncio.run(run())
    wav = server.recordings / "crash.wav"
    frames = assert_header_matches_data(wav)
    assert frames > 0
    samples, _ = read_wav(wav)
    # what is on disk is exactly the beginning of what was sent
    assert np.array_equal(samples, reference.decode("PCMU", sent[:frames]))
    assert frames == len(sent) // 2
    sidecar = json.loads((server.recordings / "crash.json").read_text())
    assert sidecar["state"] == "recording"  # honest: it never finished


def test_token_is_generated_once_and_reused(make_server: Any, tmp_path: Path) -> None:
    recordings = tmp_path / "rec"
    first = make_server(recordings=recordings)
    token_file = recordings / ".receiver-token"
    token = token_file.read_text().strip()
    assert len(token) >= 32
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    tap_uri = f"ws://127.0.0.1:{first.http_port}/t/{token}/tap/{{tap_id}}"
    assert banner(first)["WebSocket tap"] == tap_uri
    assert first.stop() == 0
    second = make_server(recordings=recordings)
    assert token_file.read_text().strip() == token
    assert "using the token" in second.log()

    assert asyncio.run(ws_connect_status(f"{second.ws_url}/tap/secured")) == 401
    assert asyncio.run(ws_connect_status(f"{second.ws_url}/t/{token}/tap/secured")) == 101
    assert wait_for_sidecar(recordings, "secured")["frames_written"] == 160


def test_healthcheck_command_follows_the_settings(make_server: Any) -> None:
    server = make_server("--no-auth")
    env = {**os.environ, "RECEIVER_HTTP_PORT": str(server.http_port), "RECEIVER_HOST": "127.0.0.1"}
    ok = subprocess.run([sys.executable, "-m", "receiver.server.healthcheck"], env=env, timeout=30)
    assert ok.returncode == 0
    env["RECEIVER_HTTP_PORT"] = str(server.http_port + 1 if server.http_port < 65535 else 1)
    bad = subprocess.run([sys.executable, "-m", "receiver.server.healthcheck"], env=env, timeout=30,
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 1 and "healthcheck:" in bad.stderr


def test_no_auth_warns_and_accepts(make_server: Any) -> None:
    server = make_server("--no-auth")
    assert "authentication is OFF" in server.log()
    assert not (server.recordings / ".receiver-token").exists()


def test_port_in_use_is_one_clear_line(make_server: Any) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        server: ServerProcess = make_server("--no-auth", start=False)
        server.args[server.args.index("--http-port") + 1] = str(port)
        result = subprocess.run(server.args, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert f"tap-receiver: cannot listen on 127.0.0.1:{port}/tcp (http_port)" in result.stderr
    assert "Traceback" not in result.stderr


def test_disk_full_fails_that_tap_only(make_server: Any, tmpfs: Any) -> None:
    recordings = tmpfs("256k") / "rec"
    # no free-space floor: this is about a write failing mid-tap (the floor has its own test)
    server = make_server(
        "--no-auth", "--flush-interval", "0.1", "--min-free-space", "0", recordings=recordings
    )
    big = noise(200_000, 6)  # 400 KB of PCM: cannot fit in 256 KB

    async def send(tap_id: str, data: bytes) -> None:
        session, ws = await open_tap(f"{server.ws_url}/tap/{tap_id}")
        for i in range(0, len(data), 8000):
            await ws.send_bytes(data[i : i + 8000])
            await asyncio.sleep(0.01)  # pacing: the disk fills over several write batches
        await ws.close()
        await session.close()

    asyncio.run(send("filler", big))
    sidecar = wait_for_sidecar(recordings, "filler", state="failed")
    assert "No space left on device" in sidecar["error"]
    wav = recordings / "filler.wav"
    frames = assert_header_matches_data(wav)  # still a valid WAV of what was written
    assert 0 < frames < len(big) and sidecar["frames_written"] == frames
    samples, _ = read_wav(wav)
    assert np.array_equal(samples, reference.decode("PCMU", big[:frames]))
    assert server.health() is not None  # the server goes on
    assert "recording failed, keeping what was written" in server.log()
    # free the space: the next tap records normally
    wav.unlink()
    small = noise(4000, 7)
    asyncio.run(send("after", small))
    assert wait_for_sidecar(recordings, "after")["state"] == "finished"
    samples, _ = read_wav(recordings / "after.wav")
    assert np.array_equal(samples, reference.decode("PCMU", small))
    with contextlib.suppress(OSError):
        os.unlink(recordings / "filler.json")
