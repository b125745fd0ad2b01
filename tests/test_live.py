"""Live audio (`GET /api/taps/{name}/live`): what a listener hears is the WAV, sample for sample,
from the position it was told; a listener that does not read never harms the recording and is
told what it missed."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import struct
from typing import Any

import aiohttp
import numpy as np
import pytest

from tests import reference
from tests.helpers import (
    DEADLINE,
    TOKEN,
    ServerProcess,
    new_id,
    noise,
    read_wav,
    require_module,
    require_tool,
    upgrade_by_hand,
    wait_for_live_frames,
    wait_for_sidecar,
    wait_until,
)

JAMBONZ = ("audio.jambonz.org",)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Any:
    server = ServerProcess(
        tmp_path_factory.mktemp("live") / "rec", "--token", TOKEN, "--stream-split-tracks"
    ).start()
    yield server
    assert server.stop() == 0


def live_url(server: ServerProcess, name: str, token: bool = True) -> str:
    return f"{server.ws_url}{f'/t/{TOKEN}' if token else ''}/api/taps/{name}/live"


def stream_url(server: ServerProcess, tap_id: str) -> str:
    return f"{server.ws_url}/t/{TOKEN}/stream/{tap_id}"


async def collect(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    """Everything a listener gets after its start message, until the server closes."""
    audio: list[bytes] = []
    events: list[dict[str, Any]] = []
    async for message in ws:
        if message.type == aiohttp.WSMsgType.BINARY:
            audio.append(message.data)
        elif message.type == aiohttp.WSMsgType.TEXT:
            events.append(json.loads(message.data))
    return {"audio": b"".join(audio), "events": events, "close_code": ws.close_code}


async def placed(server: ServerProcess, name: str, frames: int) -> None:
    """Wait (off the loop) until the tap's timeline holds `frames` frames."""
    await asyncio.get_running_loop().run_in_executor(
        None, wait_for_live_frames, server, name, frames
    )


def pcm16(seconds: float, rate: int, channels: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-32768, 32767, (round(seconds * rate), channels), dtype=np.int16)


def test_listeners_hear_the_wav_from_their_position(srv: ServerProcess) -> None:
    """Two listeners join a stereo L16 tap after its first second; each hears exactly the WAV
    from the position it was told, to its last frame, then an end marker and a normal close."""
    tap_id = new_id("live")
    rate = 16000
    pcm = pcm16(3.0, rate, 2, 1)
    raw = pcm.astype("<i2").tobytes()
    pieces = [raw[i : i + 1283] for i in range(0, len(raw), 1283)]  # split mid-sample
    first = len(pieces) // 3

    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        async with aiohttp.ClientSession() as session:
            tap = await session.ws_connect(stream_url(srv, tap_id), protocols=JAMBONZ)
            await tap.send_str(json.dumps({"sampleRate": rate, "mixType": "stereo"}))
            for piece in pieces[:first]:
                await tap.send_bytes(piece)
            await placed(srv, tap_id, len(b"".join(pieces[:first])) // 4)
            listeners = [await session.ws_connect(live_url(srv, tap_id)) for _ in range(2)]
            starts = [await ws.receive_json(timeout=DEADLINE) for ws in listeners]
            tasks = [asyncio.create_task(collect(ws)) for ws in listeners]
            for n, piece in enumerate(pieces[first:]):
                await tap.send_bytes(piece)
                if n % 10 == 0:
                    await asyncio.sleep(0.02)  # a sender spread over several live updates
            await tap.close()
            results = await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE)
            return starts, list(results)

    starts, results = asyncio.run(scenario())
    wait_for_sidecar(srv.recordings, tap_id)
    wav, wav_rate = read_wav(srv.recordings / f"{tap_id}.wav")
    assert wav_rate == rate and np.array_equal(wav, pcm)  # the recording itself is exact
    for start, result in zip(starts, results, strict=True):
        assert start["type"] == "start" and start["name"] == tap_id
        assert (start["sample_rate"], start["channels"], start["sample_format"]) == (
            rate, 2, "s16le",
        )  # fmt: skip
        position = start["position"]
        assert position >= len(b"".join(pieces[:first])) // 4  # it joined after the first part
        heard = np.frombuffer(result["audio"], "<i2").reshape(-1, 2)
        assert np.array_equal(heard, wav[position:])  # sample for sample, to the last frame
        assert result["events"] == [
            {"type": "end", "position": len(wav), "reason": "closed", "dropped_frames": 0,
             "gaps": 0},
        ]  # fmt: skip
        assert result["close_code"] == 1000


def media(track: str, chunk: int, payload: bytes) -> str:
    body = {"track": track, "chunk": str(chunk), "timestamp": str((chunk - 1) * 20),
            "payload": base64.b64encode(payload).decode()}  # fmt: skip
    return json.dumps({"event": "media", "media": body, "streamSid": "MZ1"})


def test_tracks_that_arrive_apart_are_heard_side_by_side(srv: ServerProcess) -> None:
    """A Media Streams tap whose tracks arrive apart (inbound 5 chunks ahead when the listeners
    join): the stereo listener hears the stereo WAV from its position, the listener of the
    per-track file hears that file, both exactly; the tracks evened out at the end as in the WAV."""
    tap_id = new_id("live")
    chunk = 160
    inbound = {n: noise(chunk, n) for n in range(1, 61)}
    outbound = {n: noise(chunk, 500 + n) for n in range(1, 58)}  # 3 chunks short at the end
    media_format = {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
    tracks = ["inbound", "outbound"]
    start = {"event": "start", "start": {"streamSid": "MZ1", "tracks": tracks,
                                         "mediaFormat": media_format}}  # fmt: skip

    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        async with aiohttp.ClientSession() as session:
            tap = await session.ws_connect(stream_url(srv, tap_id))
            await tap.send_str(json.dumps(start))
            for n in range(1, 21):
                await tap.send_str(media("inbound", n, inbound[n]))
            for n in range(1, 16):
                await tap.send_str(media("outbound", n, outbound[n]))
            await placed(srv, tap_id, 20 * chunk)
            names = [tap_id, f"{tap_id}.outbound"]
            listeners = [await session.ws_connect(live_url(srv, name)) for name in names]
            starts = [await ws.receive_json(timeout=DEADLINE) for ws in listeners]
            tasks = [asyncio.create_task(collect(ws)) for ws in listeners]
            for n in range(16, 61):
                if n <= 20:
                    await tap.send_str(media("outbound", n, outbound[n]))
                    continue
                await tap.send_str(media("inbound", n, inbound[n]))
                if n in outbound:
                    await tap.send_str(media("outbound", n, outbound[n]))
                await asyncio.sleep(0.005)
            await tap.send_str(json.dumps({"event": "stop"}))
            await tap.close()
            return starts, list(await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE))

    (stereo_start, track_start), (stereo, track) = asyncio.run(scenario())
    sidecar = wait_for_sidecar(srv.recordings, tap_id)
    wav, _ = read_wav(srv.recordings / f"{tap_id}.wav")
    expected = np.zeros((60 * chunk, 2), np.int16)  # independent of the server's aligner
    for n, payload in inbound.items():
        expected[(n - 1) * chunk : n * chunk, 0] = reference.decode("PCMU", payload)
    for n, payload in outbound.items():
        expected[(n - 1) * chunk : n * chunk, 1] = reference.decode("PCMU", payload)
    assert np.array_equal(wav, expected)
    assert stereo_start["position"] == track_start["position"] == 20 * chunk
    assert (stereo_start["channels"], track_start["channels"]) == (2, 1)
    heard = np.frombuffer(stereo["audio"], "<i2").reshape(-1, 2)
    assert np.array_equal(heard, wav[20 * chunk :])
    outbound_file, _ = read_wav(srv.recordings / sidecar["track_files"]["outbound"])
    assert np.array_equal(np.frombuffer(track["audio"], "<i2"), outbound_file[20 * chunk :])
    assert [e["type"] for e in stereo["events"]] == ["end"] == [e["type"] for e in track["events"]]


# -- a listener that does not read --------------------------------------------------------------


def raw_listener(server: ServerProcess, name: str) -> socket.socket:
    """A WebSocket client with a tiny receive buffer that does not read after the upgrade."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    # Small segments: the server's send buffer is sized by them (loopback's are 64 KiB, and a
    # few MB of kernel buffer would hold the whole tap).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
    sock.connect(("127.0.0.1", server.http_port))
    return upgrade_by_hand(sock, f"/t/{TOKEN}/api/taps/{name}/live")


def read_frames(sock: socket.socket) -> list[tuple[int, bytes]]:
    """Every WebSocket frame (opcode, payload) until the server's close frame."""
    sock.settimeout(DEADLINE)
    data = bytearray()

    def need(n: int) -> bytes:
        while len(data) < n:
            chunk = sock.recv(65536)
            assert chunk, "connection closed before the close frame"
            data.extend(chunk)
        out = bytes(data[:n])
        del data[:n]
        return out

    frames = []
    while True:
        first, second = need(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack(">H", need(2))
        elif length == 127:
            (length,) = struct.unpack(">Q", need(8))
        opcode = first & 0x0F
        frames.append((opcode, need(length)))
        if opcode == 8:
            return frames


def test_a_listener_that_does_not_read_loses_audio_not_the_recording(
    make_server: Any,
) -> None:
    """A 48 kHz stereo tap (192 kB/s) with two listeners that read nothing while it records and
    one that reads: the recording and the reader's audio are exact; the stalled listener that
    reads after the end gets what fitted in its queue, from its position, a gap marker saying
    how many frames it missed, and the end; the one that never reads is closed; all counted."""
    server = make_server("--token", TOKEN, "--live-queue-seconds", "0.5")
    tap_id = new_id("live")
    rate = 48000
    pcm = pcm16(4.0, rate, 2, 3)
    raw = pcm.astype("<i2").tobytes()
    pieces = [raw[i : i + 19200] for i in range(0, len(raw), 19200)]  # 50 ms each

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], socket.socket, socket.socket]:
        async with aiohttp.ClientSession() as session:
            tap = await session.ws_connect(stream_url(server, tap_id), protocols=JAMBONZ)
            await tap.send_str(json.dumps({"sampleRate": rate, "mixType": "stereo"}))
            await tap.send_bytes(pieces[0])
            await placed(server, tap_id, len(pieces[0]) // 4)
            loop = asyncio.get_running_loop()
            stalled = await loop.run_in_executor(None, raw_listener, server, tap_id)
            silent = await loop.run_in_executor(None, raw_listener, server, tap_id)
            reader = await session.ws_connect(live_url(server, tap_id))
            start = await reader.receive_json(timeout=DEADLINE)
            heard = asyncio.create_task(collect(reader))
            for piece in pieces[1:]:
                await tap.send_bytes(piece)
                await asyncio.sleep(0.01)
            await tap.close()
            return start, await asyncio.wait_for(heard, DEADLINE), stalled, silent

    start, result, stalled, silent = asyncio.run(scenario())
    wait_for_sidecar(server.recordings, tap_id)
    wav, _ = read_wav(server.recordings / f"{tap_id}.wav")
    assert np.array_equal(wav, pcm)
    heard = np.frombuffer(result["audio"], "<i2").reshape(-1, 2)
    assert np.array_equal(heard, wav[start["position"] :])
    assert result["events"][-1]["dropped_frames"] == 0

    frames = read_frames(stalled)
    texts = [json.loads(p) for op, p in frames if op == 1]
    audio = b"".join(p for op, p in frames if op == 2)
    got = np.frombuffer(audio, "<i2").reshape(-1, 2)
    first, gap, end = texts
    assert first["type"] == "start" and gap["type"] == "gap" and end["type"] == "end"
    position = first["position"]
    assert np.array_equal(got, wav[position : position + len(got)])  # what it got is exact
    assert gap["position"] == end["position"] == len(wav)
    assert position + len(got) + gap["skipped_frames"] == len(wav)  # and the rest is told
    assert end["dropped_frames"] == gap["skipped_frames"] > 0 and end["gaps"] == 1
    assert frames[-1][0] == 8 and struct.unpack(">H", frames[-1][1][:2])[0] == 1000
    stalled.close()

    def all_gone() -> dict[str, Any] | None:
        health = server.health()
        return health if health and health["live"]["subscribers"] == 0 else None

    live = wait_until(all_gone, "the listener that never reads to be closed")["live"]
    assert live["dropped_frames"] >= gap["skipped_frames"]
    assert live["subscriptions"] == 3
    silent.close()
    metrics = metrics_text(server)
    dropped = [
        line for line in metrics if line.startswith("tap_receiver_live_dropped_frames_total")
    ]
    assert float(dropped[0].split()[-1]) == live["dropped_frames"]


def metrics_text(server: ServerProcess) -> list[str]:
    request = f"GET /metrics HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {TOKEN}\r\n"
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=DEADLINE) as sock:
        sock.sendall((request + "Connection: close\r\n\r\n").encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data.partition(b"\r\n\r\n")[2].decode().splitlines()


# -- refusals -----------------------------------------------------------------------------------


def test_refusals(srv: ServerProcess) -> None:
    """No token: 401 before any upgrade; an unknown name 404; a finished recording 409; a plain
    GET of a recording tap 400; each refusal counted."""
    tap_id = new_id("live")

    async def scenario() -> dict[str, int]:
        statuses: dict[str, int] = {}
        async with aiohttp.ClientSession() as session:
            tap = await session.ws_connect(stream_url(srv, tap_id), protocols=JAMBONZ)
            await tap.send_str(json.dumps({"sampleRate": 8000, "mixType": "mono"}))
            await tap.send_bytes(b"\x01\x00" * 800)
            await placed(srv, tap_id, 800)
            for key, url in (
                ("no_token", live_url(srv, tap_id, token=False)),
                ("wrong_token", live_url(srv, tap_id, token=False) + "?token=wrong-token-123"),
                ("unknown", live_url(srv, new_id("nothing"))),
            ):
                try:
                    async with session.ws_connect(url):
                        statuses[key] = 101
                except aiohttp.WSServerHandshakeError as exc:
                    statuses[key] = exc.status
            async with session.get(live_url(srv, tap_id).replace("ws://", "http://")) as plain:
                statuses["plain_get"] = plain.status
            await tap.close()
        return statuses

    before = srv.health()
    assert before is not None
    statuses = asyncio.run(scenario())
    wait_for_sidecar(srv.recordings, tap_id)

    async def finished() -> int:
        async with aiohttp.ClientSession() as session:
            try:
                async with session.ws_connect(live_url(srv, tap_id)):
                    return 101
            except aiohttp.WSServerHandshakeError as exc:
                return exc.status

    statuses["finished"] = asyncio.run(finished())
    assert statuses == {
        "no_token": 401, "wrong_token": 401, "unknown": 404, "plain_get": 400, "finished": 409,
    }  # fmt: skip
    after = srv.health()
    assert after is not None
    refused = {k: after["live"]["refused"].get(k, 0) - before["live"]["refused"].get(k, 0)
               for k in ("not_recording", "not_websocket")}  # fmt: skip
    assert refused == {"not_recording": 2, "not_websocket": 1}


def test_shutdown_with_listeners_that_do_not_read(make_server: Any) -> None:
    """SIGTERM while a tap records and listeners stall: the server still finishes the tap
    exactly and exits 0."""
    server = make_server("--token", TOKEN, "--live-queue-seconds", "0.2")
    tap_id = new_id("live")
    pcm = pcm16(2.0, 48000, 2, 4)
    raw = pcm.astype("<i2").tobytes()

    async def scenario() -> list[socket.socket]:
        async with aiohttp.ClientSession() as session:
            tap = await session.ws_connect(stream_url(server, tap_id), protocols=JAMBONZ)
            await tap.send_str(json.dumps({"sampleRate": 48000, "mixType": "stereo"}))
            pieces = [raw[i : i + 19200] for i in range(0, len(raw), 19200)]  # 50 ms each
            half = len(pieces) // 2
            for piece in pieces[:half]:
                await tap.send_bytes(piece)
            await placed(server, tap_id, half * 4800)
            loop = asyncio.get_running_loop()
            stalled = [await loop.run_in_executor(None, raw_listener, server, tap_id)
                       for _ in range(3)]  # fmt: skip
            for piece in pieces[half:]:
                await tap.send_bytes(piece)
            await placed(server, tap_id, len(raw) // 4)
            assert server.stop() == 0  # while the tap and its listeners are connected
            return stalled

    stalled = asyncio.run(scenario())
    sidecar = wait_for_sidecar(server.recordings, tap_id)
    wav, _ = read_wav(server.recordings / f"{tap_id}.wav")
    assert np.array_equal(wav, pcm) and sidecar["end_reason"] is not None
    for sock in stalled:
        sock.close()


def test_an_opus_tap_is_decoded_for_its_listener(srv: ServerProcess) -> None:
    """The live feed decodes Opus with a decoder of its own, started at the listener's position:
    what it hears is libopus's decode of the packets from there on, to the last sample, and it
    ends where the WAV ends."""
    require_tool("ffmpeg")
    opus = require_module("opuslib_next")
    packets = reference.ogg_packets(reference.ffmpeg_encode_ogg_opus(2.0))[2:]
    tap_id = new_id("live-opus")

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        async with aiohttp.ClientSession() as session:
            tap = await session.ws_connect(f"{srv.ws_url}/t/{TOKEN}/tap/{tap_id}?codec=opus")
            for packet in packets[:20]:
                await tap.send_bytes(packet)
            await placed(srv, tap_id, 20 * 960)
            listener = await session.ws_connect(live_url(srv, tap_id))
            start = await listener.receive_json(timeout=DEADLINE)
            heard = asyncio.create_task(collect(listener))
            for packet in packets[20:]:
                await tap.send_bytes(packet)
            await tap.close()
            return start, await asyncio.wait_for(heard, DEADLINE)

    start, result = asyncio.run(scenario())
    wait_for_sidecar(srv.recordings, tap_id)
    wav, rate = read_wav(srv.recordings / f"{tap_id}.wav")
    assert rate == 48000 and len(wav) == len(packets) * 960
    assert (start["sample_rate"], start["channels"]) == (48000, 1)
    first, rest = divmod(start["position"], 960)
    assert first >= 20 and rest == 0, start
    decoder = opus.Decoder(48000, 1)
    expected = b"".join(decoder.decode(packet, 960) for packet in packets[first:])
    heard = np.frombuffer(result["audio"], "<i2")
    assert np.array_equal(heard, np.frombuffer(expected, "<i2"))
    assert len(heard) == len(wav) - start["position"]
    assert result["events"][-1]["type"] == "end"
    assert result["events"][-1]["position"] == len(wav)
