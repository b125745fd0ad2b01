"""A user's story: start the server, send a SignalWire-style WebSocket tap, read the WAV back."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from tests import reference
from tests.helpers import (
    BAD_IDS,
    DEADLINE,
    TOKEN,
    ServerProcess,
    assert_header_matches_data,
    check_recording,
    new_id,
    noise,
    read_wav,
    send_tap,
    tap_url,
    wait_for_live_frames,
    wait_for_sidecar,
)


def test_pcmu_tap_is_bit_exact_with_sidecar(server: ServerProcess) -> None:
    tap_id = new_id()
    sent = noise(160 * 50, seed=1)
    frames: list[bytes | str] = [sent[i : i + 160] for i in range(0, len(sent), 160)]
    asyncio.run(send_tap(tap_url(server, tap_id), frames))
    sidecar = check_recording(server, tap_id, "PCMU", sent)
    assert sidecar["tap_id"] == tap_id
    assert sidecar["file"] == f"{tap_id}.wav"
    assert sidecar["transport"] == "websocket"
    assert sidecar["codec"] == "PCMU"
    assert (sidecar["sample_rate"], sidecar["channels"]) == (8000, 1)
    assert sidecar["state"] == "finished"
    assert sidecar["started_at"].endswith("Z") and sidecar["ended_at"].endswith("Z")
    assert sidecar["started_at"] <= sidecar["ended_at"]
    assert sidecar["counters"]["frames_received"] == 50
    assert sidecar["counters"]["bytes_received"] == len(sent)
    assert sidecar["counters"].get("text_frames_ignored", 0) == 0


@pytest.mark.parametrize("query", ["?codec=pcma", "?codec=PCMA", "?codec=PcMa"])
def test_pcma_by_query(server: ServerProcess, query: str) -> None:
    tap_id = new_id()
    sent = noise(1234, seed=2)
    asyncio.run(send_tap(tap_url(server, tap_id, query), [sent[:1000], sent[1000:]]))
    assert check_recording(server, tap_id, "PCMA", sent)["codec"] == "PCMA"


@pytest.mark.parametrize(
    ("header", "codec"),
    [
        ('{"content-type": "audio/mulaw;rate=8000"}', "PCMU"),
        ('{"content-type":"audio/alaw;rate=8000"}', "PCMA"),
        ("content-type:audio/alaw;rate=8000", "PCMA"),
        ("content-type:audio/mulaw;rate=8000", "PCMU"),
    ],
)
def test_header_frame_declares_codec(server: ServerProcess, header: str, codec: str) -> None:
    tap_id = new_id()
    sent = noise(800, seed=3)
    asyncio.run(send_tap(tap_url(server, tap_id), [header, sent[:400], "later text", sent[400:]]))
    sidecar = check_recording(server, tap_id, codec, sent)
    assert sidecar["codec"] == codec
    assert sidecar["counters"]["text_frames_ignored"] == 1
    assert sidecar["counters"]["frames_received"] == 2


def test_odd_frame_sizes_are_appended_in_order(server: ServerProcess) -> None:
    tap_id = new_id()
    sent = noise(5000, seed=4)
    sizes = [1, 2, 3, 159, 161, 7, 1000, 333, 1]
    frames: list[bytes | str] = []
    pos = 0
    for size in sizes:
        frames.append(sent[pos : pos + size])
        pos += size
    frames.append(sent[pos:])
    asyncio.run(send_tap(tap_url(server, tap_id), frames))
    check_recording(server, tap_id, "PCMU", sent)


def test_l16_header_records_at_declared_rate(server: ServerProcess) -> None:
    tap_id = new_id()
    pcm = np.random.default_rng(5).integers(-32768, 32767, 16000, dtype=np.int16)
    raw = pcm.astype("<i2").tobytes()
    # split a sample across frames on purpose
    frames: list[bytes | str] = ["content-type:audio/l16;rate=16000", raw[:1001], raw[1001:]]
    asyncio.run(send_tap(tap_url(server, tap_id), frames))
    sidecar = wait_for_sidecar(server.recordings, tap_id)
    samples, rate = read_wav(server.recordings / f"{tap_id}.wav")
    assert rate == 16000 and sidecar["sample_rate"] == 16000
    assert np.array_equal(samples, pcm)


def test_several_taps_at_once_stay_separate(server: ServerProcess) -> None:
    ids = [new_id("multi") for _ in range(8)]
    payloads = {tap_id: noise(160 * 30, seed=10 + i) for i, tap_id in enumerate(ids)}

    async def run_all() -> None:
        await asyncio.gather(
            *(
                send_tap(
                    tap_url(server, tap_id, "?codec=pcma" if i % 2 else ""),
                    [data[j : j + 160] for j in range(0, len(data), 160)],
                    pause=0.002,
                )
                for i, (tap_id, data) in enumerate(payloads.items())
            )
        )

    asyncio.run(run_all())
    for i, (tap_id, data) in enumerate(payloads.items()):
        check_recording(server, tap_id, "PCMA" if i % 2 else "PCMU", data)


def test_same_tap_id_never_overwrites(server: ServerProcess) -> None:
    tap_id = new_id("again")
    first, second, third = noise(300, 20), noise(500, 21), noise(700, 22)
    for data in (first, second, third):
        asyncio.run(send_tap(tap_url(server, tap_id), [data]))
        # the next one starts after this one is finished, so the names are predictable
        name = tap_id if data is first else f"{tap_id}.{1 if data is second else 2}"
        check_recording(server, name, "PCMU", data)
    assert wait_for_sidecar(server.recordings, f"{tap_id}.2")["tap_id"] == tap_id


def test_concurrent_same_id_get_distinct_files(server: ServerProcess) -> None:
    tap_id = new_id("race")
    datas = [noise(400 + i, 30 + i) for i in range(4)]

    async def run_all() -> None:
        await asyncio.gather(*(send_tap(tap_url(server, tap_id), [d]) for d in datas))

    asyncio.run(run_all())
    names = [tap_id] + [f"{tap_id}.{n}" for n in (1, 2, 3)]
    got = set()
    for name in names:
        wait_for_sidecar(server.recordings, name)
        samples, _ = read_wav(server.recordings / f"{name}.wav")
        got.add(len(samples))
    assert got == {len(d) for d in datas}


def test_empty_tap_leaves_an_empty_recording(server: ServerProcess) -> None:
    tap_id = new_id("empty")
    asyncio.run(send_tap(tap_url(server, tap_id), []))
    sidecar = wait_for_sidecar(server.recordings, tap_id)
    assert sidecar["frames_written"] == 0
    assert assert_header_matches_data(server.recordings / f"{tap_id}.wav") == 0


@pytest.mark.parametrize(
    "how",
    ["path", "query", "bearer"],
)
def test_token_forms_are_accepted(server: ServerProcess, how: str) -> None:
    tap_id = new_id(how)
    sent = noise(320, 40)
    headers = None
    if how == "path":
        url = f"{server.ws_url}/t/{TOKEN}/tap/{tap_id}"
    elif how == "query":
        url = f"{server.ws_url}/tap/{tap_id}?token={TOKEN}"
    else:
        url = f"{server.ws_url}/tap/{tap_id}"
        headers = {"Authorization": f"Bearer {TOKEN}"}
    asyncio.run(send_tap(url, [sent], headers=headers))
    check_recording(server, tap_id, "PCMU", sent)


def raw_request(port: int, target: str, headers: str = "") -> tuple[int, bytes]:
    """Send a WebSocket upgrade with an exact, unnormalised request target."""
    request = (
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{headers}\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request.encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ")[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while status != 101 and len(body) < length:
            chunk = sock.recv(4096)
            if not chunk:
                break
            body += chunk
    return status, body


def all_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_tap_ids_get_400_and_leave_no_file(server: ServerProcess, bad: str) -> None:
    parent = server.recordings.parent
    before = all_files(parent)
    for target in (f"/t/{TOKEN}/tap/{bad}", f"/tap/{bad}?token={TOKEN}"):
        status, body = raw_request(server.http_port, target)
        assert status == 400, (target, body)
        assert b"tap id must match" in body
    assert all_files(parent) - before <= {p for p in all_files(parent) if p.endswith(".log")}


def test_missing_or_wrong_token_gets_401(server: ServerProcess) -> None:
    tap_id = new_id("noauth")
    targets = [
        f"/tap/{tap_id}",
        f"/tap/{tap_id}?token=wrong",
        f"/t/wrong-token-123/tap/{tap_id}",
        f"/t/{TOKEN}x/tap/{tap_id}",
    ]
    for target in targets:
        status, body = raw_request(server.http_port, target)
        assert status == 401, (target, body)
        assert b"token" in body
    status, _ = raw_request(server.http_port, f"/tap/{tap_id}", "Authorization: Bearer nope\r\n")
    assert status == 401
    assert not list(server.recordings.glob(f"{tap_id}*"))


def test_unknown_codec_refused_before_upgrade(server: ServerProcess) -> None:
    tap_id = new_id("codec")
    status, body = raw_request(server.http_port, f"/t/{TOKEN}/tap/{tap_id}?codec=amr-wb")
    assert status == 400
    assert b"unknown codec" in body
    assert b"pcmu, pcma, opus, g722" in body  # the refusal names what is supported
    assert not list(server.recordings.glob(f"{tap_id}*"))


def test_plain_get_is_not_an_upgrade(server: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=5) as sock:
        request = f"GET /t/{TOKEN}/tap/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        sock.sendall(request.encode())
        data = sock.recv(4096)
    assert data.startswith(b"HTTP/1.1 426")


def test_oversized_frame_closes_1009_and_keeps_audio(make_server: Any) -> None:
    srv = make_server("--no-auth", "--ws-max-message-size", "4K")
    tap_id = new_id("big")
    kept = noise(4096, 50)

    async def run() -> int | None:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{srv.ws_url}/tap/{tap_id}") as ws,
        ):
            await ws.send_bytes(kept)  # exactly at the limit (4096): accepted
            await ws.send_bytes(b"\xff" * 4097)
            msg = await ws.receive(timeout=DEADLINE)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            return ws.close_code

    assert asyncio.run(run()) == 1009
    sidecar = wait_for_sidecar(srv.recordings, tap_id)
    samples, _ = read_wav(srv.recordings / f"{tap_id}.wav")
    assert np.array_equal(samples, reference.decode("PCMU", kept))
    assert sidecar["end_reason"] == "message too big"
    assert sidecar["close_code"] == 1009
    assert sidecar["counters"]["errors"] == 1
    assert "closed with 1009" in srv.log()
    health = srv.health()
    assert health is not None and health["websocket"]["closed_message_too_big"] == 1


def test_unsupported_format_header_is_refused_with_1003(server: ServerProcess) -> None:
    tap_id = new_id("amr")

    async def run() -> int | None:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(tap_url(server, tap_id)) as ws,
        ):
            await ws.send_str('{"content-type": "audio/AMR-WB;rate=16000"}')
            msg = await ws.receive(timeout=DEADLINE)
            assert msg.type == aiohttp.WSMsgType.CLOSE
            assert "unsupported audio format" in msg.extra
            assert "audio/opus" in msg.extra
            return ws.close_code

    assert asyncio.run(run()) == 1003
    assert not list(server.recordings.glob(f"{tap_id}*"))


def test_abrupt_disconnect_is_a_normal_end(server: ServerProcess) -> None:
    tap_id = new_id("reset")
    sent = noise(1600, 60)

    async def run() -> None:
        session = aiohttp.ClientSession()
        ws = await session.ws_connect(tap_url(server, tap_id))
        await ws.send_bytes(sent)
        await asyncio.to_thread(wait_for_live_frames, server, tap_id, len(sent))
        # kill the TCP connection without a close frame (SO_LINGER 0 sends a reset)
        transport = ws._response.connection.transport  # type: ignore[union-attr]
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        transport.abort()
        await session.close()

    asyncio.run(run())
    check_recording(server, tap_id, "PCMU", sent)
    assert os.path.exists(server.recordings / f"{tap_id}.json")
