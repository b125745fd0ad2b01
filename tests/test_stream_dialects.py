"""Every call-audio WebSocket dialect on the one endpoint, replayed over a real WebSocket against
the real server, with exact samples per channel and exact lengths."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from typing import Any

import aiohttp
import numpy as np
import pytest

from tests import reference
from tests.helpers import (
    DEADLINE,
    ServerProcess,
    assert_header_matches_data,
    noise,
    read_wav,
    wait_for_sidecar,
)

CHUNK = 160


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Any:
    server = ServerProcess(
        tmp_path_factory.mktemp("dialects") / "rec", "--no-auth", "--stream-split-tracks"
    ).start()
    yield server
    assert server.stop() == 0


def new_id() -> str:
    return f"stream-{uuid.uuid4().hex[:10]}"


async def replay(
    url: str, frames: list[str | bytes | dict[str, Any]], protocols: tuple[str, ...] = ()
) -> str | None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, protocols=protocols) as ws,
    ):
        for frame in frames:
            if isinstance(frame, dict):
                await ws.send_str(json.dumps(frame))
            elif isinstance(frame, str):
                await ws.send_str(frame)
            else:
                await ws.send_bytes(frame)
        chosen = ws.protocol
        await ws.close()
        return chosen


def media(
    track: str, chunk: int, payload: bytes, ts: int | None = None, as_str: bool = True
) -> dict[str, Any]:
    timestamp = (chunk - 1) * 20 if ts is None else ts
    body = {
        "track": track,
        "chunk": str(chunk) if as_str else chunk,
        "timestamp": str(timestamp) if as_str else timestamp,
        "payload": base64.b64encode(payload).decode(),
    }
    return {"event": "media", "sequenceNumber": str(chunk + 1), "media": body, "streamSid": "MZ1"}


def start(tracks: list[str], encoding: str = "audio/x-mulaw", rate: int = 8000) -> dict[str, Any]:
    return {
        "event": "start",
        "sequenceNumber": "1",
        "start": {
            "streamSid": "7d56cc11-aaaa",
            "accountSid": "b08dacad-bbbb",
            "callSid": "76ac3c36-cccc",
            "tracks": tracks,
            "customParameters": {"agent": "42"},
            "mediaFormat": {"encoding": encoding, "sampleRate": rate, "channels": 1},
        },
    }


def finished(srv: ServerProcess, name: str) -> tuple[np.ndarray, dict[str, Any]]:
    sidecar = wait_for_sidecar(srv.recordings, name)
    wav = srv.recordings / f"{name}.wav"
    samples, rate = read_wav(wav)
    assert rate == sidecar["sample_rate"]
    assert assert_header_matches_data(wav) == sidecar["frames_written"]
    return samples, sidecar


def place(total: int, pieces: dict[int, np.ndarray]) -> np.ndarray:
    """Independent expectation: int16 silence of `total` samples with pieces at positions."""
    out = np.zeros(total, dtype=np.int16)
    for position, samples in pieces.items():
        out[position : position + len(samples)] = samples
    return out


def test_signalwire_both_tracks_is_an_aligned_stereo_wav(srv: ServerProcess) -> None:
    tap_id = new_id()
    inbound = {n: noise(CHUNK, n) for n in range(1, 26)}
    outbound = {n: noise(CHUNK, 100 + n) for n in range(1, 26)}
    del inbound[7]  # never sent: silence of its length on channel 1 only
    frames: list[str | bytes | dict[str, Any]] = [
        {"event": "connected", "protocol": "Call", "version": "0.2.0"},
        start(["inbound", "outbound"]),
    ]
    order = list(range(1, 26))
    order[10], order[11] = order[11], order[10]  # chunks 11 and 12 swapped on both tracks
    for n in order:
        if n in inbound:
            frames.append(media("inbound", n, inbound[n]))
        frames.append(media("outbound", n, outbound[n]))
        if n == 15:
            frames.append(
                {"event": "dtmf", "streamSid": "x", "dtmf": {"digit": "5", "duration": 200}}
            )
            frames.append({"event": "mark", "mark": {"name": "greeting-done"}})
    frames.append({"event": "stop", "sequenceNumber": "99"})
    asyncio.run(replay(f"{srv.ws_url}/stream/{tap_id}", frames))

    samples, sidecar = finished(srv, tap_id)
    total = 25 * CHUNK
    assert samples.shape == (total, 2)
    ch1 = place(total, {(n - 1) * CHUNK: reference.decode("PCMU", d) for n, d in inbound.items()})
    ch2 = place(total, {(n - 1) * CHUNK: reference.decode("PCMU", d) for n, d in outbound.items()})
    assert np.array_equal(samples[:, 0], ch1)
    assert np.array_equal(samples[:, 1], ch2)
    assert sidecar["channels"] == 2 and sidecar["dialect"] == "media-streams"
    stream = sidecar["stream"]
    assert stream["stream_sid"] == "7d56cc11-aaaa" and stream["call_sid"] == "76ac3c36-cccc"
    assert stream["custom_parameters"] == {"agent": "42"}
    assert stream["version"] == "0.2.0" and stream["stopped"] is True
    tracks = sidecar["tracks"]
    assert tracks["inbound"]["missing_chunks"] == 1 and tracks["outbound"]["missing_chunks"] == 0
    assert tracks["inbound"]["out_of_order"] == 1 and tracks["outbound"]["out_of_order"] == 1
    dtmf = [e for e in sidecar["events"] if e["type"] == "dtmf"]
    assert dtmf == [{"type": "dtmf", "digit": "5", "at": 0.3, "duration_ms": 200}]
    assert [e["name"] for e in sidecar["events"] if e["type"] == "mark"] == ["greeting-done"]
    # --stream-split-tracks: one mono WAV per track, the same samples
    files = sidecar["track_files"]
    mono_in, _ = read_wav(srv.recordings / files["inbound"])
    mono_out, _ = read_wav(srv.recordings / files["outbound"])
    assert np.array_equal(mono_in, ch1) and np.array_equal(mono_out, ch2)


def test_outbound_starting_later_stays_aligned(srv: ServerProcess) -> None:
    tap_id = new_id()
    a, b = noise(CHUNK * 10, 1), noise(CHUNK * 5, 2)
    frames: list[str | bytes | dict[str, Any]] = [start(["inbound", "outbound"])]
    for n in range(1, 11):
        frames.append(media("inbound", n, a[(n - 1) * CHUNK : n * CHUNK]))
    for n in range(1, 6):  # the other side's first chunk is 100 ms into the stream
        frames.append(media("outbound", n, b[(n - 1) * CHUNK : n * CHUNK], ts=100 + (n - 1) * 20))
    asyncio.run(replay(f"{srv.ws_url}/stream/{tap_id}", frames))
    samples, _ = finished(srv, tap_id)
    assert samples.shape == (10 * CHUNK, 2)
    assert np.array_equal(samples[:, 0], reference.decode("PCMU", a))
    assert np.array_equal(samples[:, 1], place(10 * CHUNK, {800: reference.decode("PCMU", b)}))


def test_media_before_start_no_stop_integer_numbers(srv: ServerProcess) -> None:
    tap_id = new_id()
    audio = noise(CHUNK * 6, 3)
    chunks = [audio[i * CHUNK : (i + 1) * CHUNK] for i in range(6)]
    frames: list[str | bytes | dict[str, Any]] = [
        media("inbound", 1, chunks[0], as_str=False),
        media("inbound", 2, chunks[1], as_str=False),
        start(["inbound"]),
        *(media("inbound", n, chunks[n - 1], as_str=False) for n in range(3, 7)),
    ]
    asyncio.run(replay(f"{srv.ws_url}/tap/{tap_id}", frames))
    samples, sidecar = finished(srv, tap_id)
    assert samples.ndim == 1
    assert np.array_equal(samples, reference.decode("PCMU", audio))
    assert "stopped" not in sidecar["stream"]


@pytest.mark.parametrize("rate", [16000, 24000])
def test_l16_media_streams_record_at_their_own_rate(srv: ServerProcess, rate: int) -> None:
    tap_id = new_id()
    per_chunk = rate // 50
    pcm = np.random.default_rng(rate).integers(-32768, 32767, per_chunk * 8, dtype=np.int16)
    raw = pcm.astype("<i2").tobytes()
    frames: list[str | bytes | dict[str, Any]] = [start(["inbound"], "audio/x-L16", rate)]
    for n in range(1, 9):
        frames.append(media("inbound", n, raw[(n - 1) * per_chunk * 2 : n * per_chunk * 2]))
    asyncio.run(replay(f"{srv.ws_url}/stream/{tap_id}", frames))
    samples, sidecar = finished(srv, tap_id)
    assert sidecar["sample_rate"] == rate
    assert np.array_equal(samples, pcm)


def test_telnyx_snake_case(srv: ServerProcess) -> None:
    tap_id = new_id()
    audio = noise(CHUNK * 4, 4)
    frames: list[str | bytes | dict[str, Any]] = [
        {"event": "connected", "version": "1.0.0"},
        {
            "event": "start",
            "sequence_number": "1",
            "stream_id": "32de0dea-telnyx",
            "start": {
                "call_control_id": "v3:abc",
                "media_format": {"encoding": "PCMA", "sample_rate": 8000, "channels": 1},
            },
        },
    ]
    for n in range(1, 5):
        frames.append(
            {
                "event": "media",
                "sequence_number": str(n + 1),
                "stream_id": "32de0dea-telnyx",
                "media": {
                    "track": "inbound",
                    "chunk": str(n),
                    "timestamp": str((n - 1) * 20),
                    "payload": base64.b64encode(audio[(n - 1) * CHUNK : n * CHUNK]).decode(),
                },
            }
        )
    asyncio.run(replay(f"{srv.ws_url}/stream/{tap_id}", frames))
    samples, sidecar = finished(srv, tap_id)
    assert np.array_equal(samples, reference.decode("PCMA", audio))
    assert sidecar["stream"]["stream_sid"] == "32de0dea-telnyx"
    assert sidecar["stream"]["call_sid"] == "v3:abc"
    assert sidecar["codec"] == "PCMA"


def test_bad_input_is_counted_and_the_rest_recorded(srv: ServerProcess) -> None:
    tap_id = new_id()
    audio = noise(CHUNK * 4, 5)
    frames: list[str | bytes | dict[str, Any]] = [
        start(["inbound"]),
        media("inbound", 1, audio[:CHUNK]),
        "{not json",
        {"event": "hangup-ish"},
        {"event": "media", "media": {"track": "inbound", "chunk": "2", "payload": "@@@not base64"}},
        {"event": "media", "media": "nope"},
        "[1, 2]",
        b"\x00\x01",
        *(media("inbound", n, audio[(n - 1) * CHUNK : n * CHUNK]) for n in (2, 3, 4)),
        "{not json again",
    ]
    asyncio.run(replay(f"{srv.ws_url}/stream/{tap_id}", frames))
    samples, sidecar = finished(srv, tap_id)
    assert np.array_equal(samples, reference.decode("PCMU", audio))
    counters = sidecar["counters"]
    assert counters["malformed_json"] == 3
    assert counters["unknown_event"] == 1
    assert counters["bad_base64"] == 1
    assert counters["bad_media"] == 1
    assert counters["unexpected_binary"] == 1
    assert counters["errors"] == 7
    log = srv.log()
    assert log.count(f"tap {tap_id}: a text frame is not JSON") == 1  # logged once per tap
    assert "Traceback" not in log


def test_jambonz_stereo_l16(srv: ServerProcess) -> None:
    tap_id = new_id()
    pcm = np.random.default_rng(6).integers(-32768, 32767, (16000, 2), dtype=np.int16)
    raw = pcm.astype("<i2").tobytes()
    metadata = {"callSid": "abc", "sampleRate": 16000, "mixType": "stereo", "from": "+1555"}
    pieces = [raw[i : i + 1283] for i in range(0, len(raw), 1283)]  # frames split mid-sample
    frames: list[str | bytes | dict[str, Any]] = [
        metadata,
        *pieces[:5],
        {"event": "dtmf", "dtmf": "7", "duration": 250},
        *pieces[5:],
    ]
    chosen = asyncio.run(
        replay(f"{srv.ws_url}/stream/{tap_id}", frames, protocols=("audio.jambonz.org",))
    )
    assert chosen == "audio.jambonz.org"
    samples, sidecar = finished(srv, tap_id)
    assert samples.shape == (16000, 2) and sidecar["sample_rate"] == 16000
    assert np.array_equal(samples, pcm)
    assert sidecar["dialect"] == "l16-fork" and sidecar["subprotocol"] == "audio.jambonz.org"
    assert sidecar["metadata"]["callSid"] == "abc"
    (dtmf,) = [e for e in sidecar["events"] if e["type"] == "dtmf"]
    assert dtmf["digit"] == "7"


def test_drachtio_mono_8k(srv: ServerProcess) -> None:
    tap_id = new_id()
    pcm = np.random.default_rng(7).integers(-32768, 32767, 4000, dtype=np.int16)
    raw = pcm.astype("<i2").tobytes()
    frames: list[str | bytes | dict[str, Any]] = [
        '{"sampleRate": 8000, "mixType": "mono", "uuid": "x"}',
        raw[:3001],
        raw[3001:],
    ]
    chosen = asyncio.run(
        replay(f"{srv.ws_url}/tap/{tap_id}", frames, protocols=("audio.drachtio.org",))
    )
    assert chosen == "audio.drachtio.org"
    samples, sidecar = finished(srv, tap_id)
    assert np.array_equal(samples, pcm) and sidecar["channels"] == 1


def test_vonage(srv: ServerProcess) -> None:
    tap_id = new_id()
    pcm = np.random.default_rng(8).integers(-32768, 32767, 640 * 10, dtype=np.int16)
    raw = pcm.astype("<i2").tobytes()
    frames: list[str | bytes | dict[str, Any]] = [
        {"event": "websocket:connected", "content-type": "audio/l16;rate=16000", "caller": "x"}
    ]
    for i in range(10):
        frames.append(raw[i * 1280 : (i + 1) * 1280])
        if i == 4:
            frames.append({"event": "websocket:dtmf", "digit": "3", "duration": 260})
    asyncio.run(replay(f"{srv.ws_url}/stream/{tap_id}", frames))
    samples, sidecar = finished(srv, tap_id)
    assert sidecar["dialect"] == "vonage" and sidecar["sample_rate"] == 16000
    assert np.array_equal(samples, pcm)
    (dtmf,) = [e for e in sidecar["events"] if e["type"] == "dtmf"]
    assert dtmf == {"type": "dtmf", "digit": "3", "at": 0.2, "duration_ms": 260}


def test_unsupported_media_format_closes_1003(srv: ServerProcess) -> None:
    tap_id = new_id()

    async def run() -> int | None:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{srv.ws_url}/stream/{tap_id}") as ws,
        ):
            await ws.send_str(json.dumps(start(["inbound"], "audio/AMR-WB", 16000)))
            msg = await ws.receive(timeout=DEADLINE)
            assert msg.type == aiohttp.WSMsgType.CLOSE
            return ws.close_code

    assert asyncio.run(run()) == 1003


def test_vonage_with_g711_content_type_records_g711(srv: ServerProcess) -> None:
    tap_id = new_id()
    sent = noise(8000, 9)
    frames: list[str | bytes | dict[str, Any]] = [
        {"event": "websocket:connected", "content-type": "audio/mulaw;rate=8000"},
        sent[:3001],
        sent[3001:],
    ]
    asyncio.run(replay(f"{srv.ws_url}/stream/{tap_id}", frames))
    samples, sidecar = finished(srv, tap_id)
    assert sidecar["codec"] == "PCMU" and sidecar["dialect"] == "vonage"
    assert np.array_equal(samples, reference.decode("PCMU", sent))


def test_g711_cannot_be_declared_stereo(srv: ServerProcess) -> None:
    tap_id = new_id()

    async def run() -> int:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{srv.ws_url}/tap/{tap_id}") as ws,
        ):
            await ws.send_str("content-type:audio/mulaw;rate=8000;channels=2")
            msg = await ws.receive(timeout=DEADLINE)
            assert msg.type == aiohttp.WSMsgType.CLOSE
            return int(msg.data)

    assert asyncio.run(run()) == 1003


def test_events_are_bounded_per_tap(srv: ServerProcess) -> None:
    tap_id = new_id()
    frames: list[str | bytes | dict[str, Any]] = [start(["inbound"])]
    frames += [{"event": "mark", "mark": {"name": "m" * 5000}} for _ in range(1200)]
    asyncio.run(replay(f"{srv.ws_url}/stream/{tap_id}", frames))
    _, sidecar = finished(srv, tap_id)
    assert len(sidecar["events"]) == 1000
    assert sidecar["counters"]["events_dropped"] == 200
    assert all(len(e["name"]) == 256 for e in sidecar["events"])
