"""A call's two legs in one stereo WAV: `speak` on channel 1, `listen` on channel 2, each leg's
exact audio at the offset where it began, silence elsewhere; and what cannot be a call is
recorded apart, counted, never damaged."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import threading
import time
from typing import Any

import aiohttp
import numpy as np
import pytest

from receiver.rtp.packet import RtpPacket
from tests import reference
from tests.helpers import (
    TOKEN,
    ServerProcess,
    free_port,
    new_id,
    noise,
    read_wav,
    send_tap,
    wait_for_live,
    wait_for_sidecar,
    wait_until,
)

CHUNK = 160  # 20 ms at 8 kHz


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Any:
    server = ServerProcess(tmp_path_factory.mktemp("calls") / "rec", "--token", TOKEN).start()
    yield server
    assert server.stop() == 0


def leg_url(server: ServerProcess, call_id: str, leg: str, query: str = "") -> str:
    return f"{server.ws_url}/t/{TOKEN}/call/{call_id}/{leg}{query}"


def media(chunk: int, payload: bytes) -> str:
    body = {"track": "inbound", "chunk": str(chunk), "timestamp": str((chunk - 1) * 20),
            "payload": base64.b64encode(payload).decode()}  # fmt: skip
    return json.dumps({"event": "media", "media": body, "streamSid": "MZ1"})


MEDIA_START = json.dumps({"event": "start", "start": {"streamSid": "MZ1", "tracks": ["inbound"],
    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}})  # fmt: skip


async def until_placed(server: ServerProcess, name: str, frames: int) -> None:
    """Wait (off the loop) until the tap `name` has placed at least `frames` frames."""
    await asyncio.get_running_loop().run_in_executor(
        None, wait_for_live, server, name, lambda live: live["frames"] >= frames, f"{frames}"
    )


def placed_at(total: int, offset: int, samples: np.ndarray) -> np.ndarray:
    """Independent expectation: `samples` at `offset` in `total` frames of silence."""
    out = np.zeros(total, np.int16)
    out[offset : offset + len(samples)] = samples
    return out


def test_two_legs_one_late_one_with_a_pause_make_an_aligned_stereo_call(
    srv: ServerProcess,
) -> None:
    """`speak` (raw G.711) begins; `listen` (Media Streams, 25 chunks never sent: a pause) begins
    once `speak` has placed 1.5 s. The call's WAV: channel 1 is the speak leg's audio from frame
    0, channel 2 the listen leg's audio (its pause silence) from the offset the sidecar gives,
    which is where it began (1.5 s, to within the scheduling of this machine)."""
    call_id = new_id("call")
    speak = noise(CHUNK * 200, 1)  # 4 s
    listen = {n: noise(CHUNK, 1000 + n) for n in range(1, 126) if not 51 <= n <= 75}

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            a = await session.ws_connect(leg_url(srv, call_id, "speak"))

            async def talk() -> None:
                for n in range(200):
                    await a.send_bytes(speak[n * CHUNK : (n + 1) * CHUNK])
                    await asyncio.sleep(0.02)  # a real-time sender
                await a.close()

            speaking = asyncio.create_task(talk())
            await until_placed(srv, f"{call_id}.speak", 12000)
            b = await session.ws_connect(leg_url(srv, call_id, "listen"))
            await b.send_str(MEDIA_START)
            for n in range(1, 126):
                if n in listen:
                    await b.send_str(media(n, listen[n]))
                await asyncio.sleep(0.01)
            await b.send_str(json.dumps({"event": "stop"}))
            await b.close()
            await speaking

    asyncio.run(scenario())
    call = wait_for_sidecar(srv.recordings, call_id)
    speak_wav, _ = read_wav(srv.recordings / f"{call_id}.speak.wav")
    listen_wav, _ = read_wav(srv.recordings / f"{call_id}.listen.wav")
    assert np.array_equal(speak_wav, reference.decode("PCMU", speak))  # the legs are exact
    expected_listen = np.zeros(125 * CHUNK, np.int16)
    for n, payload in listen.items():
        expected_listen[(n - 1) * CHUNK : n * CHUNK] = reference.decode("PCMU", payload)
    assert np.array_equal(listen_wav, expected_listen)

    legs = call["call"]["legs"]
    assert legs["speak"]["offset_frames"] == 0
    offset = legs["listen"]["offset_frames"]
    assert abs(offset - 12000) <= 800, offset  # began 1.5 s later (arrival times)
    assert legs["listen"]["file"] == f"{call_id}.listen.wav"
    assert legs["speak"]["named_by"] == legs["listen"]["named_by"] == "uri"
    assert legs["listen"]["aligned"]["by"] == "first_arrival"
    samples, rate = read_wav(srv.recordings / f"{call_id}.wav")
    total = max(len(speak_wav), offset + len(listen_wav))
    assert rate == 8000 and samples.shape == (total, 2)
    assert np.array_equal(samples[:, 0], placed_at(total, 0, speak_wav))
    assert np.array_equal(samples[:, 1], placed_at(total, offset, listen_wav))
    assert call["channel_names"] == ["speak", "listen"] and call["frames_written"] == total
    assert call["transport"] == "call" and call["state"] == "finished"
    assert isinstance(legs["speak"]["drift_ms"], float)


async def post(server: ServerProcess, body: Any) -> int:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{server.base_url}/signalwire/tap-status", json=body,
                     headers=headers) as answer,
    ):  # fmt: skip
        return answer.status


def status_event(control_id: str, call_id: str, direction: str, uri: str) -> dict[str, Any]:
    return {"event_type": "calling.call.tap", "params": {
        "call_id": call_id, "control_id": control_id, "state": "tapping",
        "tap": {"type": "audio", "params": {"direction": direction}},
        "device": {"type": "ws", "params": {"uri": uri}}}}  # fmt: skip


async def send_leg(url: str, audio: bytes, header: str | None = None) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        if header is not None:
            await ws.send_str(header)
        for i in range(0, len(audio), 320):
            await ws.send_bytes(audio[i : i + 320])


def calls_stats(server: ServerProcess) -> dict[str, int]:
    health = server.health()
    assert health is not None
    stats: dict[str, int] = health["calls"]
    return stats


def test_status_callbacks_make_a_call_and_bad_legs_stay_apart(srv: ServerProcess) -> None:
    """Two plain WebSocket taps that SignalWire status callbacks name as the speak and listen
    taps of one call_id make a call. A third leg, a leg whose URI and callback disagree, and
    legs at different rates are recorded apart: each its own exact file, no call file, counted."""
    call_id, other = new_id("sw-call"), new_id("sw-other")
    a_id, b_id = new_id("uri-a"), new_id("uri-b")
    speak, listen = noise(CHUNK * 40, 7), noise(CHUNK * 30, 8)
    before = calls_stats(srv)
    for control, direction, uri_id in (("ctl-s-" + call_id, "speak", a_id),
                                       ("ctl-l-" + call_id, "listen", b_id)):  # fmt: skip
        event = status_event(control, call_id, direction, f"wss://h/tap/{uri_id}")
        assert asyncio.run(post(srv, event)) == 200
    asyncio.run(send_leg(f"{srv.ws_url}/t/{TOKEN}/tap/{a_id}", speak))
    asyncio.run(send_leg(f"{srv.ws_url}/t/{TOKEN}/tap/{b_id}", listen))
    call = wait_for_sidecar(srv.recordings, call_id)
    legs = call["call"]["legs"]
    assert legs["speak"]["tap_id"] == "ctl-s-" + call_id
    assert legs["speak"]["named_by"] == "status_callback"
    samples, _ = read_wav(srv.recordings / f"{call_id}.wav")
    total = samples.shape[0]
    s_off, l_off = legs["speak"]["offset_frames"], legs["listen"]["offset_frames"]
    assert np.array_equal(samples[:, 0], placed_at(total, s_off, reference.decode("PCMU", speak)))
    assert np.array_equal(samples[:, 1], placed_at(total, l_off, reference.decode("PCMU", listen)))

    # a third leg: its own file, exact; the call's file untouched
    call_wav = (srv.recordings / f"{call_id}.wav").read_bytes()
    event = status_event("ctl-3-" + call_id, call_id, "speak", "wss://h/tap/third-" + a_id)
    assert asyncio.run(post(srv, event)) == 200
    asyncio.run(send_leg(f"{srv.ws_url}/t/{TOKEN}/tap/third-{a_id}", speak))
    wait_for_sidecar(srv.recordings, f"ctl-3-{call_id}")
    third, _ = read_wav(srv.recordings / f"ctl-3-{call_id}.wav")
    assert np.array_equal(third, reference.decode("PCMU", speak))

    # URI says one call, the status callback another
    event = status_event("ctl-x-" + other, other, "speak", f"wss://h/call/{other}x/speak")
    assert asyncio.run(post(srv, event)) == 200
    asyncio.run(send_leg(leg_url(srv, f"{other}x", "speak"), speak))
    wait_for_sidecar(srv.recordings, "ctl-x-" + other)

    # legs at different rates (8 kHz G.711, 16 kHz L16)
    l16 = np.random.default_rng(9).integers(-32768, 32767, 8000, dtype=np.int16)
    asyncio.run(send_leg(leg_url(srv, other, "speak"), speak))
    asyncio.run(send_leg(leg_url(srv, other, "listen"), l16.astype("<i2").tobytes(),
                         header="audio/L16;rate=16000"))  # fmt: skip
    wait_for_sidecar(srv.recordings, f"{other}.listen")
    wide, rate = read_wav(srv.recordings / f"{other}.listen.wav")
    assert rate == 16000 and np.array_equal(wide, l16)

    def counted() -> dict[str, int] | None:
        now = calls_stats(srv)
        wanted = ("apart_third_leg", "apart_conflicting_call_ids", "apart_formats_differ")
        done = all(now.get(k, 0) - before.get(k, 0) == 1 for k in wanted)
        return now if done else None

    after = wait_until(counted, "the three bad legs to be counted")
    assert after["built"] - before.get("built", 0) == 1
    assert (srv.recordings / f"{call_id}.wav").read_bytes() == call_wav
    assert not (srv.recordings / f"{other}.wav").exists()
    assert not (srv.recordings / f"{other}x.wav").exists()


def test_a_leg_must_be_speak_or_listen(srv: ServerProcess) -> None:
    async def status(url: str) -> int:
        async with aiohttp.ClientSession() as session:
            try:
                async with session.ws_connect(url):
                    return 101
            except aiohttp.WSServerHandshakeError as exc:
                return exc.status

    assert asyncio.run(status(leg_url(srv, "c1", "both"))) == 400
    assert asyncio.run(status(leg_url(srv, "-bad", "speak"))) == 400
    assert asyncio.run(status(f"{srv.ws_url}/call/c1/speak")) == 401


# -- RTP legs -----------------------------------------------------------------------------------


def rtp_status(control_id: str, call_id: str, direction: str, port: int, state: str) -> Any:
    event = status_event(control_id, call_id, direction, "")
    event["params"]["state"] = state
    event["params"]["device"] = {"type": "rtp", "params": {"addr": "x", "port": str(port)}}
    return event


def send_rtp(port: int, frames: dict[int, bytes], ssrc: int, pause_from: int = -1) -> None:
    """Real-time RTP, 20 ms a packet; `frames` by 20 ms slot: a slot without audio is a pause
    (nothing sent, the timestamps run on)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    seq = 1000
    start = time.monotonic()
    with sock:
        for slot in range(max(frames) + 1):
            if slot in frames:
                packet = RtpPacket(0, slot == 0, seq, 5000 + 160 * slot, ssrc, frames[slot])
                sock.sendto(packet.serialize(), ("127.0.0.1", port))
                seq += 1
            delay = start + 0.02 * (slot + 1) - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing: a real-time sender


def test_two_rtp_legs_named_by_status_callbacks(make_server: Any) -> None:
    """RTP legs from a registered pool port each, named by status callbacks (call_id, direction):
    listen begins 1.5 s after speak and pauses 0.5 s (no packets, its timestamps run on). The
    call's WAV holds each leg's exact audio, the pause as silence, at the legs' offsets."""
    first = free_port()
    server = make_server("--token", TOKEN, "--rtp-port-range", f"{first}-{first + 1}",
                         "--rtp-idle-timeout", "60")  # fmt: skip
    call_id = new_id("rtp-call")
    ports = {}
    for leg in ("speak", "listen"):
        status, answer = asyncio.run(post_json(server, "/api/taps", {"tap_id": f"p-{leg}"}))
        assert status == 201, answer
        ports[leg] = answer["rtp"]["port"]
        event = rtp_status(f"{call_id}-{leg}", call_id, leg, ports[leg], "tapping")
        assert asyncio.run(post(server, event)) == 200
    speak = {n: noise(CHUNK, n) for n in range(150)}
    listen = {n: noise(CHUNK, 300 + n) for n in range(100) if not 40 <= n < 65}
    talker = threading.Thread(target=send_rtp, args=(ports["speak"], speak, 0x5EA4))
    talker.start()
    wait_for_live(server, f"{call_id}-speak", lambda live: live["frames"] >= 12000, "1.5 s")
    send_rtp(ports["listen"], listen, 0x115E)
    talker.join()
    for leg in ("speak", "listen"):
        placed = len(speak) * CHUNK if leg == "speak" else 100 * CHUNK
        wait_for_live(server, f"{call_id}-{leg}", lambda live, n=placed: live["frames"] == n, "all")
        event = rtp_status(f"{call_id}-{leg}", call_id, leg, ports[leg], "finished")
        assert asyncio.run(post(server, event)) == 200

    call = wait_for_sidecar(server.recordings, call_id)
    speak_wav, _ = read_wav(server.recordings / f"{call_id}-speak.wav")
    listen_wav, _ = read_wav(server.recordings / f"{call_id}-listen.wav")
    assert np.array_equal(speak_wav, reference.decode("PCMU", b"".join(speak.values())))
    expected = np.zeros(100 * CHUNK, np.int16)
    for n, payload in listen.items():
        expected[n * CHUNK : (n + 1) * CHUNK] = reference.decode("PCMU", payload)
    assert np.array_equal(listen_wav, expected)  # the pause is silence of its length
    legs = call["call"]["legs"]
    offset = legs["listen"]["offset_frames"] - legs["speak"]["offset_frames"]
    assert legs["speak"]["offset_frames"] == 0 and abs(offset - 12000) <= 800, offset
    assert (
        legs["listen"]["aligned"]["rtp_ssrcs"] and legs["listen"]["named_by"] == "status_callback"
    )
    samples, _ = read_wav(server.recordings / f"{call_id}.wav")
    total = max(len(speak_wav), offset + len(listen_wav))
    assert samples.shape == (total, 2)
    assert np.array_equal(samples[:, 0], placed_at(total, 0, speak_wav))
    assert np.array_equal(samples[:, 1], placed_at(total, offset, listen_wav))


async def post_json(server: ServerProcess, path: str, body: Any) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(server.base_url + path, json=body, headers=headers) as answer,
    ):
        return answer.status, await answer.json()


def test_a_leg_begins_on_the_call_where_its_audio_began_not_its_format_frame(
    srv: ServerProcess,
) -> None:
    """The speak leg declares its format at once but sends audio only once the listen leg has
    placed a second: on the call's timeline it begins there (about 8 000 frames in), not at
    its format frame (which would put it at 0 and misalign the parties by a second)."""
    call_id = new_id("call")
    speak, listen = noise(CHUNK * 100, 5), noise(CHUNK * 150, 6)

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            a = await session.ws_connect(leg_url(srv, call_id, "speak"))
            await a.send_str("content-type:audio/mulaw;rate=8000")
            await until_placed(srv, f"{call_id}.speak", 0)  # its tap began: no audio yet
            b = await session.ws_connect(leg_url(srv, call_id, "listen"))
            for n in range(150):
                await b.send_bytes(listen[n * CHUNK : (n + 1) * CHUNK])
                if n == 50:
                    await until_placed(srv, f"{call_id}.listen", 8000)
                    for m in range(100):
                        await a.send_bytes(speak[m * CHUNK : (m + 1) * CHUNK])
                    await a.close()
                await asyncio.sleep(0.02)  # a real-time sender
            await b.close()

    asyncio.run(scenario())
    call = wait_for_sidecar(srv.recordings, call_id)
    legs = call["call"]["legs"]
    assert legs["listen"]["offset_frames"] == 0
    assert abs(legs["speak"]["offset_frames"] - 8160) <= 800, legs  # 51 chunks in, give or take
    stereo, _ = read_wav(srv.recordings / f"{call_id}.wav")
    offset = legs["speak"]["offset_frames"]
    expected = reference.decode("PCMU", speak)
    assert np.array_equal(stereo[offset : offset + len(expected), 0], expected)


def test_a_waiting_leg_is_kept_and_a_replaced_one_is_not_put_into_the_call(
    srv: ServerProcess,
) -> None:
    """A finished leg whose call waits for its partner cannot be deleted (409); once the call is
    built it can. A leg's WAV replaced on disk meanwhile (here by hand) is not taken into the
    call: the call fails, counted and logged, and the stranger's audio is in no call."""
    call_id, other = new_id("call"), new_id("call")
    for cid in (call_id, other):
        asyncio.run(send_tap(leg_url(srv, cid, "speak"), [noise(CHUNK * 20, 7)]))
        wait_for_sidecar(srv.recordings, f"{cid}.speak")
    status, body = srv.api("DELETE", f"/api/taps/{call_id}.speak")
    assert status == 409 and "leg of call" in body["error"], body
    asyncio.run(send_tap(leg_url(srv, call_id, "listen"), [noise(CHUNK * 20, 8)]))
    wait_for_sidecar(srv.recordings, call_id)
    assert srv.api("DELETE", f"/api/taps/{call_id}.speak")[0] == 200  # the call is built

    failed = srv.health()["calls"].get("failed", 0)
    wav = srv.recordings / f"{other}.speak.wav"
    stranger = wav.with_name("stranger.wav")
    stranger.write_bytes(wav.read_bytes())
    os.replace(stranger, wav)  # another file under the leg's name
    asyncio.run(send_tap(leg_url(srv, other, "listen"), [noise(CHUNK * 20, 9)]))
    wait_until(lambda: srv.health()["calls"].get("failed", 0) == failed + 1, "the call to fail")
    assert not (srv.recordings / f"{other}.wav").exists()
    assert "deleted or replaced since it ended" in srv.log()


def test_calls_in_progress_at_shutdown_get_their_stereo_file(make_server: Any) -> None:
    """SIGTERM while two calls have both legs connected: every leg is finalized, and each call's
    stereo WAV is built from them before the server exits."""
    server = make_server("--token", TOKEN)
    calls = [new_id("call"), new_id("call")]

    async def scenario() -> int:
        async with aiohttp.ClientSession() as session:
            sockets = []
            for call_id in calls:
                for n, leg in enumerate(("speak", "listen")):
                    ws = await session.ws_connect(leg_url(server, call_id, leg))
                    await ws.send_bytes(noise(CHUNK * 10, n))
                    sockets.append(ws)
            for call_id in calls:
                for leg in ("speak", "listen"):
                    await until_placed(server, f"{call_id}.{leg}", CHUNK * 10)
            code = await asyncio.get_running_loop().run_in_executor(None, server.stop)
            for ws in sockets:
                await ws.receive()
            return code

    assert asyncio.run(scenario()) == 0
    for call_id in calls:
        call = json.loads((server.recordings / f"{call_id}.json").read_text())
        stereo, _ = read_wav(server.recordings / f"{call_id}.wav")
        for channel, leg in enumerate(("speak", "listen")):
            sidecar = json.loads((server.recordings / f"{call_id}.{leg}.json").read_text())
            assert sidecar["end_reason"] == "shutdown"
            wav, _ = read_wav(server.recordings / f"{call_id}.{leg}.wav")
            offset = call["call"]["legs"][leg]["offset_frames"]
            assert np.array_equal(stereo[offset : offset + len(wav), channel], wav)


def test_a_split_leg_releases_its_waiting_partner_at_once(make_server: Any) -> None:
    """The listen leg is split by max_tap_duration, so the call can never be built: the speak
    leg that waits for it is let go at once (not after the ten minutes a partner may take)."""
    server = make_server("--token", TOKEN, "--max-tap-duration", "1")
    call_id = new_id("call")
    asyncio.run(send_tap(leg_url(server, call_id, "speak"), [noise(CHUNK * 25, 1)]))
    wait_until(lambda: server.health()["calls"]["waiting"] == 1, "the speak leg to wait")
    frames = [noise(CHUNK, n) for n in range(75)]  # 1.5 s: two segments
    asyncio.run(send_tap(leg_url(server, call_id, "listen"), frames))
    health = wait_until(
        lambda: (h := server.health())["calls"]["waiting"] == 0 and h, "the speak leg let go"
    )
    assert health["calls"]["apart_leg_without_one_file"] >= 1
    assert server.api("DELETE", f"/api/taps/{call_id}.speak")[0] == 200  # no longer held
    assert not (server.recordings / f"{call_id}.wav").exists()
