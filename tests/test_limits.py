"""Limits and guards: capacity, rate, free space, duration, allow-lists, slow clients, crash
recovery and the open-file budget, each against the real server."""

from __future__ import annotations

import asyncio
import base64
import json
import resource
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import soundfile

from receiver.rtp.packet import RtpPacket
from receiver.taps.admission import AddressFilter, RateLimiter
from tests import reference
from tests.helpers import (
    DEADLINE,
    ServerProcess,
    assert_header_matches_data,
    noise,
    read_wav,
    wait_for_health,
    wait_for_live_frames,
    wait_for_sidecar,
    wait_for_wav_frames,
    ws_connect_status,
)


def rtp_burst(port: int, packets: int = 5, sock: socket.socket | None = None,
              source: str = "127.0.0.1") -> socket.socket:  # fmt: skip
    sock = sock or socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if sock.getsockname()[1] == 0:
        sock.bind((source, 0))
    for n in range(packets):
        sock.sendto(
            RtpPacket(0, False, n, 160 * n, 9, b"\xff" * 160).serialize(), ("127.0.0.1", port)
        )
    return sock


def test_unit_rate_limiter_and_address_filter() -> None:
    limiter = RateLimiter(2.0)  # 2 per second, bursts of 2
    assert [limiter.allow("a", now=0.0) for _ in range(3)] == [True, True, False]
    assert limiter.allow("b", now=0.0)  # per address
    assert limiter.allow("a", now=0.5)  # refilled one token
    assert not limiter.allow("a", now=0.5)
    assert RateLimiter(0).allow("a")  # off
    allowed = AddressFilter("10.0.0.0/8, 2001:db8::/32")
    assert allowed.allows("10.1.2.3") and allowed.allows("::ffff:10.1.2.3")
    assert allowed.allows("2001:db8::1") and not allowed.allows("127.0.0.1")
    assert not allowed.allows(None) and not allowed.allows("garbage")
    assert AddressFilter("").allows("203.0.113.9")


def test_websocket_capacity_is_refused_with_503(make_server: Any) -> None:
    server = make_server("--no-auth", "--ws-max-taps", "2")

    async def run() -> list[int]:
        session = aiohttp.ClientSession()
        held = [await session.ws_connect(f"{server.ws_url}/tap/cap{i}") for i in range(2)]
        third = await ws_connect_status(f"{server.ws_url}/tap/cap2")
        for ws in held:
            await ws.close()
        await session.close()
        await asyncio.to_thread(
            wait_for_health, server, lambda h: h["active_taps"] == 0, "both taps ended"
        )
        return [third, await ws_connect_status(f"{server.ws_url}/tap/cap3")]

    assert asyncio.run(run()) == [503, 101]
    assert not list(server.recordings.glob("cap2*"))
    health = server.health()
    assert health is not None and health["websocket"]["rejected_capacity"] == 1
    assert health["limits"]["ws_max_taps"] == 2


def test_new_tap_rate_limit_per_address(make_server: Any) -> None:
    server = make_server("--no-auth", "--new-tap-rate-limit", "0.5", "--rtp-idle-timeout", "0.3")
    statuses = [asyncio.run(ws_connect_status(f"{server.ws_url}/tap/rate{i}")) for i in range(2)]
    assert statuses == [101, 429]
    first = rtp_burst(server.rtp_port, source="127.0.0.2")
    second = rtp_burst(server.rtp_port, source="127.0.0.2")  # same address, new port: refused
    other = rtp_burst(server.rtp_port, source="127.0.0.3")  # another address: its own budget
    for sock in (first, other):
        host, port = sock.getsockname()
        wait_for_sidecar(server.recordings, f"rtp-{host}-{port}")
    assert not list(server.recordings.glob(f"rtp-127.0.0.2-{second.getsockname()[1]}*"))
    health = server.health()
    assert health is not None
    assert health["rtp"]["refused_rate_limit"] == 1 and health["rtp"]["packets_refused"] == 5


def test_below_min_free_space_taps_are_refused(make_server: Any) -> None:
    server = make_server("--no-auth", "--min-free-space", "1000000G")  # more than any disk
    health = server.health()
    assert health is not None and health["low_disk"] is True
    assert asyncio.run(ws_connect_status(f"{server.ws_url}/tap/nospace")) == 503
    rtp_burst(server.rtp_port)
    health = wait_for_health(server, lambda h: h["rtp"]["datagrams"] == 5, "the burst read")
    assert health["rtp"]["refused_low_disk"] == 1
    assert not [p for p in server.recordings.iterdir() if not p.name.startswith(".")]
    assert "refusing new taps" in server.log()


def test_crossing_the_floor_finalizes_open_taps_cleanly(make_server: Any, tmpfs: Any) -> None:
    small_disk = tmpfs("4m")
    recordings = small_disk / "rec"
    server = make_server("--no-auth", "--min-free-space", "1M", recordings=recordings)
    sent = noise(8000, 1)

    async def run() -> tuple[int | None, int]:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{server.ws_url}/tap/before-full") as ws,
        ):
            await ws.send_bytes(sent)
            await asyncio.to_thread(wait_for_live_frames, server, "before-full", len(sent))
            (small_disk / "filler").write_bytes(b"\0" * (3 * 1024 * 1024 + 512 * 1024))
            msg = await ws.receive(timeout=DEADLINE)  # the server closes: try again later
            assert msg.type == aiohttp.WSMsgType.CLOSE
            code = int(msg.data)
        refused = await ws_connect_status(f"{server.ws_url}/tap/while-full")
        return code, refused

    assert asyncio.run(run()) == (1013, 503)
    sidecar = wait_for_sidecar(recordings, "before-full")
    assert sidecar["end_reason"] == "low disk space" and sidecar["close_code"] == 1013
    samples, _ = read_wav(recordings / "before-full.wav")
    assert np.array_equal(samples, reference.decode("PCMU", sent))  # finalized, nothing lost
    (small_disk / "filler").unlink()
    wait_for_health(server, lambda h: not h["low_disk"], "free space back above the floor")
    assert asyncio.run(ws_connect_status(f"{server.ws_url}/tap/after")) == 101


def test_max_tap_duration_split_keeps_every_sample(make_server: Any) -> None:
    server = make_server("--no-auth", "--max-tap-duration", "1", "--flush-interval", "0.1")
    sent = noise(8000 * 3 + 400, 2)  # 3.05 s, paced at real time

    async def run() -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{server.ws_url}/tap/long") as ws,
        ):
            for i in range(0, len(sent), 800):
                await ws.send_bytes(sent[i : i + 800])
                await asyncio.sleep(0.1)  # pacing: real time, 800 samples every 0.1 s

    asyncio.run(run())
    names = ["long", "long.1", "long.2", "long.3"]
    sidecars = [wait_for_sidecar(server.recordings, name) for name in names]
    parts = [read_wav(server.recordings / f"{name}.wav")[0] for name in names]
    assert np.array_equal(np.concatenate(parts), reference.decode("PCMU", sent))
    assert [s["segment"] for s in sidecars] == [1, 2, 3, 4]
    assert all(s["tap_id"] == "long" for s in sidecars)
    assert sidecars[1]["previous_segment"] == "long"
    for part in parts[:3]:  # each full segment: the limit, up to one flush batch more
        assert 8000 <= len(part) <= 8000 + 2 * 800 + 800
    assert sidecars[0]["end_reason"].startswith("max_tap_duration")


def test_max_tap_duration_stop(make_server: Any) -> None:
    server = make_server(
        "--no-auth", "--max-tap-duration", "0.5", "--max-tap-duration-action", "stop",
        "--rtp-idle-timeout", "30",  # the stopped stream outlives any pause of a busy sender
    )  # fmt: skip

    async def run() -> int | None:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{server.ws_url}/tap/capped") as ws,
        ):
            reader = asyncio.create_task(ws.receive(timeout=DEADLINE))
            for _ in range(30):
                if reader.done():
                    break  # the server closed: a sender stops here
                await ws.send_bytes(b"\xff" * 800)
                await asyncio.sleep(0.1)  # pacing: real time, 800 samples every 0.1 s
            msg = await reader
            assert msg.type == aiohttp.WSMsgType.CLOSE
            return int(msg.data)  # the close frame the server sent

    assert asyncio.run(run()) == 1000
    sidecar = wait_for_sidecar(server.recordings, "capped")
    assert sidecar["end_reason"] == "max_tap_duration"
    assert 4000 <= sidecar["frames_written"] <= 4000 + 3 * 800
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    for n in range(80):  # 1.6 s of RTP: stopped after 0.5 s, the rest dropped, no second file
        sock.sendto(RtpPacket(0, False, n, 160 * n, 9, b"\xff" * 160).serialize(),
                    ("127.0.0.1", server.rtp_port))  # fmt: skip
        time.sleep(0.02)  # pacing: real time, a packet every 20 ms
    name = f"rtp-127.0.0.1-{sock.getsockname()[1]}"
    rtp = wait_for_sidecar(server.recordings, name)
    assert rtp["end_reason"] == "max_tap_duration"
    # every packet read, and none of those after the stop started a second recording
    health = wait_for_health(server, lambda h: h["rtp"]["datagrams"] == 80, "all 80 packets read")
    assert health["taps_started"] == 2  # the WebSocket tap and this stream, nothing else
    assert sorted(p.name for p in server.recordings.glob(f"{name}*")) == [
        f"{name}.json",
        f"{name}.wav",
    ]


def test_allow_lists(make_server: Any) -> None:
    closed = make_server("--no-auth", "--http-allow", "10.0.0.0/8", "--rtp-allow", "10.0.0.0/8")
    assert closed.health() is not None  # /healthz stays open (container health checks)
    assert asyncio.run(ws_connect_status(f"{closed.ws_url}/tap/denied")) == 403
    rtp_burst(closed.rtp_port)
    health = wait_for_health(closed, lambda h: h["rtp"]["datagrams"] == 5, "the burst read")
    assert health["rtp"]["refused_not_allowed"] == 1
    assert not [p for p in closed.recordings.iterdir() if not p.name.startswith(".")]
    opened = make_server(
        "--no-auth", "--http-allow", "127.0.0.0/8, ::1/128", "--rtp-allow", "127.0.0.1/32"
    )
    assert asyncio.run(ws_connect_status(f"{opened.ws_url}/tap/allowed")) == 101


def test_slow_and_half_open_clients_are_closed(make_server: Any) -> None:
    server = make_server("--no-auth", "--http-request-timeout", "1")
    idle = socket.create_connection(("127.0.0.1", server.http_port))
    slow = socket.create_connection(("127.0.0.1", server.http_port))
    slow.sendall(b"GET /tap/slow HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n")
    for sock in (idle, slow):
        # The server closes both. Without http_request_timeout it would keep them for aiohttp's
        # keep-alive default (75 s): the wait for the close gives up before that, and fails.
        sock.settimeout(DEADLINE)
        try:
            while sock.recv(4096):
                pass
        except ConnectionResetError:
            pass
        sock.close()
    assert server.health() is not None


def test_crash_recovery_at_start(make_server: Any, tmp_path: Path) -> None:
    recordings = tmp_path / "crashy"
    first: ServerProcess = make_server(
        "--no-auth", "--flush-interval", "0.1", recordings=recordings
    )
    sent = noise(8000, 3)

    async def record_then_die() -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{first.ws_url}/tap/crashed") as ws,
        ):
            await ws.send_bytes(sent)
            # the header says all of it is on disk
            await asyncio.to_thread(wait_for_wav_frames, recordings / "crashed.wav", len(sent))
            first.kill9()

    asyncio.run(record_then_die())
    assert json.loads((recordings / "crashed.json").read_text())["state"] == "recording"
    wav = recordings / "crashed.wav"
    with wav.open("r+b") as fh:  # make it worse: sizes as a crash mid-write leaves them
        fh.seek(4)
        fh.write(b"\0\0\0\0")
    second: ServerProcess = make_server("--no-auth", recordings=recordings)
    wait_for_health(second, lambda h: h["recovery"]["state"] == "done", "recovery done")
    sidecar = json.loads((recordings / "crashed.json").read_text())
    assert sidecar["state"] == "finished" and sidecar["recovered"] is True
    assert sidecar["end_reason"] == "recovered after a crash"
    assert assert_header_matches_data(wav) == sidecar["frames_written"] == len(sent)
    samples, _ = read_wav(wav)
    assert np.array_equal(samples, reference.decode("PCMU", sent))
    assert "recovered crashed.wav after a crash" in second.log()


def test_open_file_limit_is_raised_and_accounted_for(make_server: Any) -> None:
    server: ServerProcess = make_server("--no-auth", start=False)
    server.args += ["--ws-max-taps", "100000", "--rtp-max-streams", "100000"]

    def low_limits() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 1024))

    server.popen_kwargs = {"preexec_fn": low_limits}
    server.start()
    health = server.health()
    assert health is not None
    limits = health["limits"]
    assert limits["open_files"] == 1024  # soft raised to the hard limit
    assert limits["ws_max_taps"] == (1024 - 64) // 4
    assert limits["rtp_max_streams"] == (1024 - 64) // 2
    assert "cannot hold ws_max_taps=100000" in server.log()


def test_recovery_adopts_a_wav_that_never_got_its_sidecar(make_server: Any, tmp_path: Path) -> None:
    """A kill between creating a WAV and writing its first sidecar leaves a WAV nobody names,
    and a power cut can leave that (not fsynced) sidecar empty or cut short: the next start
    repairs each such WAV and gives it a sidecar; per-track WAVs a sidecar lists are left."""
    recordings = tmp_path / "orphans"
    recordings.mkdir()
    samples = np.arange(-4000, 4000, dtype=np.int16)
    soundfile.write(recordings / "orphan.wav", samples, 8000, subtype="PCM_16")
    raw = bytearray((recordings / "orphan.wav").read_bytes())
    raw[4:8] = raw[40:44] = b"\0\0\0\0"  # sizes as a crash before the first header update
    (recordings / "orphan.wav").write_bytes(raw)
    soundfile.write(recordings / "call.inbound.wav", samples, 8000, subtype="PCM_16")
    (recordings / "call.json").write_text(json.dumps(
        {"tap_id": "call", "file": "call.wav", "state": "finished",
         "track_files": {"inbound": "call.inbound.wav"}}
    ))  # fmt: skip
    for name, text in (("empty", ""), ("cut", '{"tap_id": "cut", "sta')):
        (recordings / f"{name}.wav").write_bytes(raw)
        (recordings / f"{name}.json").write_text(text)
    server = make_server("--no-auth", recordings=recordings)
    health = wait_for_health(server, lambda h: h["recovery"]["state"] == "done", "recovery done")
    assert health["recovery"]["recovered"] == 3
    for name in ("orphan", "empty", "cut"):
        sidecar = json.loads((recordings / f"{name}.json").read_text())
        assert sidecar["state"] == "finished" and sidecar["recovered"] is True
        assert sidecar["frames_written"] == len(samples)
        assert assert_header_matches_data(recordings / f"{name}.wav") == len(samples)
        assert np.array_equal(read_wav(recordings / f"{name}.wav")[0], samples)
    assert not (recordings / "call.inbound.json").exists()


def test_split_keeps_stereo_tracks_aligned(make_server: Any) -> None:
    """Media Streams both tracks, the outbound side 5 chunks behind, split every second: every
    segment's channels stay aligned and, put back together, equal what each track sent."""
    server = make_server("--no-auth", "--max-tap-duration", "1", "--flush-interval", "0.1",
                         "--stream-split-tracks")  # fmt: skip
    chunks = 150  # 3 s of 20 ms chunks
    inbound, outbound = noise(160 * chunks, 11), noise(160 * chunks, 12)

    def media(track: str, n: int, audio: bytes) -> str:
        payload = base64.b64encode(audio[(n - 1) * 160 : n * 160]).decode()
        body = {"track": track, "chunk": str(n), "timestamp": str((n - 1) * 20), "payload": payload}
        return json.dumps({"event": "media", "media": body})

    async def run() -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{server.ws_url}/stream/aligned") as ws,
        ):
            start = {"tracks": ["inbound", "outbound"], "streamSid": "MZ"}
            await ws.send_str(json.dumps({"event": "start", "start": start}))
            for n in range(1, chunks + 6):
                if n <= chunks:
                    await ws.send_str(media("inbound", n, inbound))
                if n > 5:
                    await ws.send_str(media("outbound", n - 5, outbound))
                await asyncio.sleep(0.02)  # pacing: real time, a chunk every 20 ms

    asyncio.run(run())
    names = sorted(
        (p.stem for p in server.recordings.glob("aligned*.json")),
        key=lambda name: int(name.split(".")[1]) if "." in name else 0,
    )
    assert len(names) >= 3
    parts = []
    for name in names:
        sidecar = wait_for_sidecar(server.recordings, name)
        samples, _ = read_wav(server.recordings / f"{name}.wav")
        parts.append(samples)
        for channel, track in enumerate(("inbound", "outbound")):  # per-track files match
            mono, _ = read_wav(server.recordings / sidecar["track_files"][track])
            assert np.array_equal(mono, samples[:, channel])
    whole = np.concatenate(parts)
    assert np.array_equal(whole[:, 0], reference.decode("PCMU", inbound))
    assert np.array_equal(whole[:, 1], reference.decode("PCMU", outbound))


def test_max_tap_duration_stop_flushes_a_media_streams_timeline(make_server: Any) -> None:
    """`stop` ends a Media Streams tap through its session: chunks held behind a hole are
    placed and the hole becomes silence, as when the sender closes. (Before, the tap was
    finished before its track timeline was flushed: 1120 of 1600 frames and `tracks: {}`.)"""
    server = make_server("--no-auth", "--max-tap-duration", "0.1",
                         "--max-tap-duration-action", "stop")  # fmt: skip
    chunks = {n: noise(160, seed=n) for n in range(1, 11)}

    def media(n: int) -> str:
        payload = base64.b64encode(chunks[n]).decode()
        body = {"track": "inbound", "chunk": str(n), "timestamp": str((n - 1) * 20),
                "payload": payload}  # fmt: skip
        return json.dumps({"event": "media", "streamSid": "MZ1", "media": body})

    start = {"event": "start", "start": {"streamSid": "MZ1", "tracks": ["inbound"],
             "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000}}}  # fmt: skip
    # 1, 3-7 and 9-10 wait behind the holes at 2 and 8; chunk 2, sent last, releases 1-7
    # (0.14 s, past the limit) while 9 and 10 still wait behind the hole at 8.
    order = [1, 3, 4, 5, 6, 7, 9, 10, 2]

    async def run() -> int:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{server.ws_url}/stream/held") as ws,
        ):
            await ws.send_str(json.dumps(start))
            for n in order:
                await ws.send_str(media(n))
            msg = await ws.receive(timeout=30)  # the server stops the tap at the limit
            assert msg.type == aiohttp.WSMsgType.CLOSE
            return int(msg.data)

    assert asyncio.run(run()) == 1000
    sidecar = wait_for_sidecar(server.recordings, "held")
    assert sidecar["end_reason"] == "max_tap_duration"
    assert sidecar["close_code"] == 1000
    silence = np.zeros(160, np.int16)
    expected = np.concatenate(
        [reference.decode("PCMU", chunks[n]) if n != 8 else silence for n in range(1, 11)]
    )
    samples, rate = read_wav(server.recordings / "held.wav")
    assert rate == 8000
    assert sidecar["frames_written"] == len(expected) == 1600
    np.testing.assert_array_equal(samples, expected)
    track = sidecar["tracks"]["inbound"]
    assert (track["missing_chunks"], track["out_of_order"]) == (1, 1)
