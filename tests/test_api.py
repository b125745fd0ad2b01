"""The recordings API against the real server: record taps over the real WebSocket endpoint (and
RTP), then list, fetch, range-read, analyse and delete them over HTTP."""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import math
import socket
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from receiver.rtp.packet import RtpPacket, TelephoneEvent
from tests.helpers import (
    BAD_IDS,
    TOKEN,
    ServerProcess,
    new_id,
    noise,
    read_wav,
    send_tap,
    tap_url,
    wait_for_health,
    wait_for_live,
    wait_for_sidecar,
    wait_for_wav_frames,
)

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def request(
    server: ServerProcess, method: str, target: str, headers: dict[str, str] | None = None
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """One HTTP request with the target sent exactly as given (no normalisation); the headers
    of the answer are looked up case-insensitively."""
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def get_json(server: ServerProcess, target: str, status: int = 200) -> Any:
    code, headers, body = request(server, "GET", target, AUTH)
    assert code == status, (target, code, body)
    assert headers["Content-Type"].startswith("application/json")
    return json.loads(body)


def l16_tap(server: ServerProcess, tap_id: str, samples: np.ndarray, rate: int = 8000) -> None:
    """Send int16 samples (frames, channels) as an L16 WebSocket tap and wait until finished."""
    channels = 1 if samples.ndim == 1 else samples.shape[1]
    header = f"content-type:audio/l16;rate={rate};channels={channels}"
    raw = samples.astype("<i2").tobytes()
    frames: list[bytes | str] = [header, *(raw[i : i + 3200] for i in range(0, len(raw), 3200))]
    asyncio.run(send_tap(tap_url(server, tap_id), frames))
    wait_for_sidecar(server.recordings, tap_id)


def test_list_shows_finished_taps_newest_first_with_filters(server: ServerProcess) -> None:
    marker = new_id("list")
    first, second = f"{marker}-a", f"{marker}-b"
    asyncio.run(send_tap(tap_url(server, first), [noise(800, 1)]))
    wait_for_sidecar(server.recordings, first)
    asyncio.run(send_tap(tap_url(server, second, "?codec=pcma"), [noise(1600, 2)]))
    wait_for_sidecar(server.recordings, second)

    listing = get_json(server, f"/api/taps?q={marker}")
    assert listing["total"] == 2
    assert [t["name"] for t in listing["taps"]] == [second, first]
    newest = listing["taps"][0]
    sidecar = json.loads((server.recordings / f"{second}.json").read_text())
    assert newest == {
        "name": second,
        "tap_id": second,
        "transport": "websocket",
        "codec": "PCMA",
        "sample_rate": 8000,
        "channels": 1,
        "channel_names": None,
        "remote": "127.0.0.1",
        "state": "finished",
        "started_at": sidecar["started_at"],
        "ended_at": sidecar["ended_at"],
        "duration_seconds": 0.2,
        "size_bytes": (server.recordings / f"{second}.wav").stat().st_size,
        "loss_percent": None,
        "archive_url": None,
        "where": "local",
    }
    assert listing["taps"][1]["duration_seconds"] == 0.1

    page = get_json(server, f"/api/taps?q={marker}&limit=1&offset=1")
    assert (page["total"], page["limit"], page["offset"]) == (2, 1, 1)
    assert [t["name"] for t in page["taps"]] == [first]
    assert get_json(server, f"/api/taps?q={marker.upper()}-B")["total"] == 1  # any case
    assert get_json(server, f"/api/taps?q={marker}&state=finished,failed")["total"] == 2
    assert get_json(server, f"/api/taps?q={marker}&state=recording")["total"] == 0
    assert get_json(server, f"/api/taps?q={marker}&transport=rtp")["total"] == 0
    assert get_json(server, f"/api/taps?q={marker}&transport=websocket")["total"] == 2
    for bad in (
        "state=done",
        "limit=0",
        "limit=1001",
        "offset=-1",
        "limit=x",
        "transport=a/b",
        "where=far",
    ):
        body = get_json(server, f"/api/taps?{bad}", status=400)
        assert body["status"] == 400 and body["error"]


def test_detail_audio_ranges_and_etag(server: ServerProcess) -> None:
    tap_id = new_id("audio")
    sent = noise(8000, 3)
    asyncio.run(send_tap(tap_url(server, tap_id), [sent[:4000], sent[4000:]]))
    sidecar = wait_for_sidecar(server.recordings, tap_id)
    wav = server.recordings / f"{tap_id}.wav"
    data = wav.read_bytes()

    detail = get_json(server, f"/api/taps/{tap_id}")
    assert detail["sidecar"] == sidecar
    assert detail["state"] == "finished" and detail["live"] is None
    assert detail["markers"] == []
    assert detail["wav"] == {
        "file": f"{tap_id}.wav",
        "size_bytes": len(data),
        "format": "RIFF/WAVE 16-bit PCM, extensible, 8000 Hz, 1 ch",
        "frames": 8000,
        "data_offset": len(data) - 16000,
        "header_matches_data": True,
        "problem": None,
    }

    status, headers, body = request(server, "GET", f"/api/taps/{tap_id}/audio", AUTH)
    assert status == 200 and body == data
    assert headers["Content-Type"] == "audio/wav"
    assert headers["Accept-Ranges"] == "bytes"
    etag = headers["ETag"]
    assert etag

    ranged = {**AUTH, "Range": "bytes=100-1099"}
    status, headers, body = request(server, "GET", f"/api/taps/{tap_id}/audio", ranged)
    assert status == 206
    assert body == data[100:1100]
    assert headers["Content-Range"] == f"bytes 100-1099/{len(data)}"
    assert headers["Content-Type"] == "audio/wav"

    status, _, body = request(
        server, "GET", f"/api/taps/{tap_id}/audio", {**AUTH, "Range": "bytes=-10"}
    )
    assert (status, body) == (206, data[-10:])
    status, _, body = request(
        server, "GET", f"/api/taps/{tap_id}/audio", {**AUTH, "Range": "bytes=5000-"}
    )
    assert (status, body) == (206, data[5000:])
    status, _, _ = request(
        server, "GET", f"/api/taps/{tap_id}/audio", {**AUTH, "If-None-Match": etag}
    )
    assert status == 304
    status, _, _ = request(
        server, "GET", f"/api/taps/{tap_id}/audio", {**AUTH, "Range": f"bytes={len(data)}-"}
    )
    assert status == 416

    status, headers, body = request(server, "GET", f"/api/taps/{tap_id}/audio?download=1", AUTH)
    assert status == 200 and body == data
    assert headers["Content-Disposition"] == f'attachment; filename="{tap_id}.wav"'


def test_waveform_peaks_match_numpy(server: ServerProcess) -> None:
    tap_id = new_id("wave")
    rng = np.random.default_rng(7)
    samples = rng.integers(-20000, 20000, (12345, 2), dtype=np.int16)
    l16_tap(server, tap_id, samples, rate=16000)
    got, rate = read_wav(server.recordings / f"{tap_id}.wav")
    assert rate == 16000 and np.array_equal(got, samples)

    for width in (1, 7, 100, 999):
        wave = get_json(server, f"/api/taps/{tap_id}/waveform?width={width}")
        edges = np.arange(width + 1) * len(samples) // width
        lows = [[int(samples[a:b, c].min()) for a, b in itertools.pairwise(edges)] for c in (0, 1)]
        highs = [[int(samples[a:b, c].max()) for a, b in itertools.pairwise(edges)] for c in (0, 1)]
        assert (wave["columns"], wave["frames"], wave["channels"]) == (width, 12345, 2)
        assert wave["sample_rate"] == 16000
        assert wave["duration_seconds"] == round(12345 / 16000, 6)
        assert wave["min"] == lows and wave["max"] == highs

    # more columns than frames: one column per frame
    short = new_id("short")
    l16_tap(server, short, np.array([5, -3, 7], dtype=np.int16))
    wave = get_json(server, f"/api/taps/{short}/waveform?width=500")
    assert wave["columns"] == 3 and wave["min"] == [[5, -3, 7]] and wave["max"] == [[5, -3, 7]]
    empty = new_id("empty")
    asyncio.run(send_tap(tap_url(server, empty), []))
    wait_for_sidecar(server.recordings, empty)
    wave = get_json(server, f"/api/taps/{empty}/waveform?width=10")
    assert (wave["columns"], wave["min"], wave["max"]) == (0, [[]], [[]])
    for bad in ("width=0", "width=10001", "width=abc"):
        assert get_json(server, f"/api/taps/{tap_id}/waveform?{bad}", status=400)["error"]


def png_rows(png: bytes) -> np.ndarray:
    """Decode our own PNGs (8-bit RGB, filter 0): (height, width, 3)."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", (0, 0)
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind, body = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        assert (
            zlib.crc32(kind + body)
            == struct.unpack(">I", png[pos + 8 + length : pos + 12 + length])[0]
        )
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert (depth, color) == (8, 2)
            size = (width, height)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height = size
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(height, 1 + width * 3)
    assert not raw[:, 0].any()  # filter 0 on every row
    return raw[:, 1:].reshape(height, width, 3)


def test_spectrogram_shows_a_tone_where_it_is(server: ServerProcess) -> None:
    tap_id = new_id("tone")
    t = np.arange(8000 * 2) / 8000
    tone = (0.01 * 32767 * np.sin(2 * np.pi * 1000 * t)).astype(np.int16)  # -40 dBFS
    tone[8000:] = 0  # one second of tone, one of digital silence
    l16_tap(server, tap_id, tone)
    status, headers, png = request(
        server, "GET", f"/api/taps/{tap_id}/spectrogram?width=200&height=120", AUTH
    )
    assert status == 200 and headers["Content-Type"] == "image/png"
    pixels = png_rows(png).astype(np.int32)
    assert pixels.shape == (120, 200, 3)
    brightness = pixels.sum(axis=2)
    # 256-point FFT at 8 kHz: 129 bins of 31.25 Hz, 1 kHz is bin 32; 120 rows from 0 Hz at the
    # bottom, row r holding bins [floor(r * 129 / 120), floor((r + 1) * 129 / 120)): r = 30,
    # which is row 89 from the top
    tone_rows = brightness[:, 10:90].argmax(axis=0)
    assert set(tone_rows.tolist()) == {89}, tone_rows
    assert brightness[:, 110:].max() == brightness[0, 199]  # the silent half is one colour
    assert brightness[:, 110:].min() == brightness[:, 110:].max()
    status, _, again = request(
        server, "GET", f"/api/taps/{tap_id}/spectrogram?width=200&height=120", AUTH
    )
    assert again == png  # cached or not, the same bytes


def test_levels_match_numpy(server: ServerProcess) -> None:
    tap_id = new_id("levels")
    t = np.arange(8000) / 8000
    signal = np.concatenate(
        [
            (0.25 * 32767 * np.sin(2 * np.pi * 300 * t)).astype(np.int16),
            np.zeros(4000, np.int16),
            np.tile(np.array([32767, -32768], np.int16), 500),
        ]
    )
    l16_tap(server, tap_id, signal)
    levels = get_json(server, f"/api/taps/{tap_id}/levels")
    x = signal.astype(np.float64)
    (channel,) = levels["channels"]
    assert channel["peak"] == 32768
    assert channel["peak_dbfs"] == 0.0
    assert channel["rms_dbfs"] == round(20 * math.log10(math.sqrt(np.mean(x * x)) / 32768), 2)
    assert channel["clipped_samples"] == 1000
    assert levels["longest_silence"] == {"start_seconds": 1.0, "duration_seconds": 0.5}
    assert levels["frames"] == len(signal)


def test_auth_is_enforced_everywhere(server: ServerProcess) -> None:
    tap_id = new_id("auth")
    asyncio.run(send_tap(tap_url(server, tap_id), [noise(400, 4)]))
    wait_for_sidecar(server.recordings, tap_id)
    targets = [
        ("GET", "/api/taps"),
        ("GET", f"/api/taps/{tap_id}"),
        ("GET", f"/api/taps/{tap_id}/audio"),
        ("GET", f"/api/taps/{tap_id}/waveform"),
        ("GET", f"/api/taps/{tap_id}/spectrogram"),
        ("GET", f"/api/taps/{tap_id}/levels"),
        ("DELETE", f"/api/taps/{tap_id}"),
    ]
    for method, target in targets:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
            status, _, body = request(server, method, target, headers)
            assert status == 401, (method, target, headers)
            assert json.loads(body) == {"error": "missing or wrong token", "status": 401}
        status, _, _ = request(server, method, f"{target}?token=wrong")
        assert status == 401
        status, _, _ = request(server, method, f"/t/wrong-token/{target.lstrip('/')}")
        assert status == 401
    assert (server.recordings / f"{tap_id}.wav").exists()  # the DELETEs did nothing

    # the three ways in
    assert get_json(server, f"/api/taps/{tap_id}")["name"] == tap_id
    status, _, body = request(server, "GET", f"/api/taps/{tap_id}?token={TOKEN}")
    assert status == 200 and json.loads(body)["name"] == tap_id
    status, _, body = request(server, "GET", f"/t/{TOKEN}/api/taps/{tap_id}/audio")
    assert status == 200 and body == (server.recordings / f"{tap_id}.wav").read_bytes()


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_ids_get_400(server: ServerProcess, bad: str) -> None:
    for method, suffix in (("GET", ""), ("GET", "/audio"), ("GET", "/waveform"), ("DELETE", "")):
        status, _, body = request(server, method, f"/api/taps/{bad}{suffix}", AUTH)
        assert status == 400, (method, bad, suffix, body)
        assert b"tap id must match" in body


def test_unknown_recording_is_404(server: ServerProcess) -> None:
    name = new_id("missing")
    for method, suffix in (("GET", ""), ("GET", "/audio"), ("GET", "/waveform"), ("DELETE", "")):
        status, _, body = request(server, method, f"/api/taps/{name}{suffix}", AUTH)
        assert status == 404, (method, suffix)
        assert json.loads(body)["status"] == 404


def test_active_tap_has_live_counters_and_cannot_be_deleted(server: ServerProcess) -> None:
    tap_id = new_id("live")
    chunk = noise(1600, 5)

    async def run() -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(tap_url(server, tap_id)) as ws,
        ):
            await ws.send_bytes(chunk)
            await ws.send_bytes(chunk)
            await asyncio.to_thread(
                wait_for_live,
                server,
                tap_id,
                lambda live: live["frames_written"] == 3200,
                "both chunks on disk",
            )
            detail = await asyncio.to_thread(get_json, server, f"/api/taps/{tap_id}")
            assert detail["state"] == "recording"
            assert detail["live"]["frames"] == 3200
            assert detail["live"]["frames_written"] == 3200
            assert detail["live"]["duration_seconds"] == 0.4
            assert detail["live"]["rtp"] is None
            assert detail["duration_seconds"] == 0.4
            assert detail["sidecar"]["counters"] == {"frames_received": 2, "bytes_received": 3200}
            listing = await asyncio.to_thread(
                get_json, server, f"/api/taps?q={tap_id}&state=recording"
            )
            assert [t["name"] for t in listing["taps"]] == [tap_id]
            assert listing["active"] >= 1
            status, _, body = await asyncio.to_thread(
                request, server, "DELETE", f"/api/taps/{tap_id}", AUTH
            )
            assert status == 409, body
            assert (server.recordings / f"{tap_id}.wav").exists()
            await ws.close()

    asyncio.run(run())
    wait_for_sidecar(server.recordings, tap_id)
    status, _, body = request(server, "DELETE", f"/api/taps/{tap_id}", AUTH)
    assert status == 200
    assert json.loads(body) == {"deleted": tap_id, "files": [f"{tap_id}.wav", f"{tap_id}.json"]}
    assert not list(server.recordings.glob(f"{tap_id}*"))
    assert get_json(server, f"/api/taps?q={tap_id}")["total"] == 0
    status, _, _ = request(server, "DELETE", f"/api/taps/{tap_id}", AUTH)
    assert status == 404


def test_rtp_tap_loss_and_dtmf_markers(server: ServerProcess) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    name = f"rtp-127.0.0.1-{sock.getsockname()[1]}"
    dest = ("127.0.0.1", server.rtp_port)
    audio = noise(160 * 20, 6)
    for n in range(20):
        if n != 7:  # one packet lost of 20
            payload = audio[n * 160 : (n + 1) * 160]
            sock.sendto(RtpPacket(0, False, 500 + n, 160 * n, 0x77, payload).serialize(), dest)
        time.sleep(0.003)  # pacing: the sender spreads its packets out
    for i, end in enumerate((False, True, True, True)):
        event = TelephoneEvent(9, end, 10, 400).serialize()
        sock.sendto(RtpPacket(101, i == 0, 520 + i, 3200, 0x77, event).serialize(), dest)
    sock.close()
    sidecar = wait_for_sidecar(server.recordings, name)
    assert sidecar["rtp"]["lost"] == 1 and sidecar["rtp"]["received"] == 23
    listing = get_json(server, f"/api/taps?q={name}&transport=rtp")
    (row,) = listing["taps"]
    assert row["loss_percent"] == round(100 * 1 / 24, 2)
    detail = get_json(server, f"/api/taps/{name}")
    assert detail["markers"] == [{"type": "dtmf", "at": 0.4, "label": "9", "duration": 0.05}]


def test_interrupted_recording_after_kill_9(make_server: Any, tmp_path: Path) -> None:
    recordings = tmp_path / "shared-recordings"
    first = make_server("--no-auth", recordings=recordings)
    tap_id = new_id("crash")
    sent = noise(3200, 7)

    async def record_then_die() -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{first.ws_url}/tap/{tap_id}") as ws,
        ):
            await ws.send_bytes(sent)
            # the header already says 3200 frames: all of it is on disk
            await asyncio.to_thread(wait_for_wav_frames, recordings / f"{tap_id}.wav", 3200)
            first.kill9()

    asyncio.run(record_then_die())
    second = make_server("--no-auth", recordings=recordings)
    # Until the second server has recovered it (in the background), it is listed as interrupted.
    status, _, body = request(second, "GET", f"/api/taps?q={tap_id}")
    assert status == 200
    (row,) = json.loads(body)["taps"]
    assert row["state"] in ("interrupted", "finished")
    wait_for_health(second, lambda h: h["recovery"]["state"] == "done", "recovery done")
    status, _, body = request(second, "GET", f"/api/taps?q={tap_id}")
    (row,) = json.loads(body)["taps"]
    # recovered: header repaired, sidecar finalized
    assert row["state"] == "finished"
    assert row["duration_seconds"] == 0.4
    sidecar = json.loads((recordings / f"{tap_id}.json").read_text())
    assert sidecar["recovered"] is True and sidecar["frames_written"] == 3200
    status, _, body = request(second, "DELETE", f"/api/taps/{tap_id}")
    assert status == 200 and not list(recordings.glob(f"{tap_id}*"))
