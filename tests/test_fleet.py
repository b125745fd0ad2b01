"""Several receivers on one control plane (`nats_url`): two receivers (two processes) and the
workers of `--workers 2` against one real nats-server. A status callback sent to one reaches
the one that holds the tap; the listing on any shows the live taps of all; NATS killed and
restarted in the middle of a recording costs the recording nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from receiver.fleet import Answers, listing
from receiver.fleet.nats_fleet import fit
from receiver.rtp.packet import RtpPacket
from tests import reference
from tests.helpers import (
    DEADLINE,
    TOKEN,
    NatsServer,
    ServerProcess,
    free_port,
    new_id,
    noise,
    read_wav,
    wait_for_health,
    wait_for_live_frames,
    wait_for_sidecar,
    wait_until,
)

AUTH = {"Authorization": f"Bearer {TOKEN}"}
FRAME = 160  # 20 ms of G.711


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path)
    yield server
    server.kill9()


def member(make_server: Any, nats: NatsServer, name: str, *extra: str) -> ServerProcess:
    server: ServerProcess = make_server(
        "--token", TOKEN, "--nats-url", nats.url, "--instance-name", name, *extra
    )
    return server


def wait_for_peers(server: ServerProcess, *peers: str) -> None:
    wait_for_health(
        server,
        lambda h: h["fleet"]["connected"] and set(peers) <= set(h["fleet"]["peers"]),
        f"fleet connected, with peers {peers}",
    )


def listed(server: ServerProcess, name: str, instance: str) -> dict[str, Any] | None:
    """The listing's live entry `name` held by `instance`, if the listing has it now."""
    status, body = server.api_get("/api/taps")
    assert status == 200, body
    for tap in body["taps"]:
        if tap["name"] == name and tap.get("instance") == instance:
            return tap if tap["state"] == "recording" else None
    return None


def status_event(control_id: str, state: str, device: dict[str, Any]) -> dict[str, Any]:
    """A calling.call.tap event as SignalWire posts it (protocols.md §1.3)."""
    return {
        "event_type": "calling.call.tap",
        "params": {
            "call_id": "call-uuid-1",
            "control_id": control_id,
            "state": state,
            "tap": {"type": "audio", "params": {"direction": "both"}},
            "device": device,
        },
    }


def ws_device(tap_id: str) -> dict[str, Any]:
    return {"type": "ws", "params": {"uri": f"wss://tap.example.com/t/x/tap/{tap_id}"}}


async def post(session: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with session.post(url, json=body, headers=AUTH) as r:
        return r.status, await r.json()


def send_rtp(port: int, audio: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for n in range(len(audio) // FRAME):
            payload = audio[n * FRAME : (n + 1) * FRAME]
            packet = RtpPacket(0, n == 0, 700 + n, 3000 + FRAME * n, 0xF1EE7, payload)
            sock.sendto(packet.serialize(), ("127.0.0.1", port))
            time.sleep(0.002)  # pacing: the sender spreads its packets out


def assert_exact(recordings: Path, name: str, sent: bytes) -> dict[str, Any]:
    sidecar = wait_for_sidecar(recordings, name)
    samples, _ = read_wav(recordings / f"{name}.wav")
    expected = reference.decode("PCMU", sent)
    assert len(samples) == len(expected) and np.array_equal(samples, expected), name
    return sidecar


def test_a_callback_to_one_receiver_renames_and_ends_a_tap_held_by_the_other(
    make_server: Any, nats: NatsServer
) -> None:
    nats.start()
    first = free_port()
    a = member(make_server, nats, "rx-a")
    b = member(
        make_server, nats, "rx-b", "--rtp-port-range", f"{first}-{first + 1}",
        "--rtp-idle-timeout", "60",
    )  # fmt: skip
    wait_for_peers(a, "rx-b")
    wait_for_peers(b, "rx-a")
    ws_audio, rtp_audio, a_audio = noise(FRAME * 30, 1), noise(FRAME * 20, 2), noise(FRAME * 5, 3)

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            on_b = await session.ws_connect(f"{b.ws_url}/t/{TOKEN}/tap/prov-1")
            on_a = await session.ws_connect(f"{a.ws_url}/t/{TOKEN}/tap/a-only")
            for n in range(len(ws_audio) // FRAME):
                await on_b.send_bytes(ws_audio[n * FRAME : (n + 1) * FRAME])
            await on_a.send_bytes(a_audio)
            await asyncio.to_thread(wait_for_live_frames, b, "prov-1", len(ws_audio))
            # The listing on either shows both taps, each with the instance that holds it.
            for server in (a, b):
                await asyncio.to_thread(
                    wait_until, lambda s=server: listed(s, "prov-1", "rx-b"), "prov-1 listed"
                )
                await asyncio.to_thread(
                    wait_until, lambda s=server: listed(s, "a-only", "rx-a"), "a-only listed"
                )

            # A status callback sent to A names and ends the tap B holds.
            url = f"{a.base_url}/signalwire/tap-status"
            event = status_event("ctl-1", "tapping", ws_device("prov-1"))
            status, answer = await post(session, url, event)
            assert status == 200 and answer["result"] == "linked", answer
            assert answer["instance"] == "rx-b"
            await asyncio.to_thread(
                wait_until, lambda: listed(a, "ctl-1", "rx-b"), "the new name in A's listing"
            )
            event = status_event("ctl-1", "finished", ws_device("prov-1"))
            status, answer = await post(session, url, event)
            assert (status, answer["result"], answer["instance"]) == (200, "ended", "rx-b")
            closing = await asyncio.wait_for(on_b.receive(), DEADLINE)
            assert (closing.type, closing.data) == (aiohttp.WSMsgType.CLOSE, 1000)
            sidecar = await asyncio.to_thread(assert_exact, b.recordings, "ctl-1", ws_audio)
            assert sidecar["provisional_id"] == "prov-1"
            assert sidecar["signalwire"]["control_id"] == "ctl-1"

            # An RTP tap on a port of B's pool, named and ended through A.
            status, registered = await post(session, f"{b.base_url}/api/taps", {"tap_id": "reg-1"})
            assert status == 201, registered
            port = registered["rtp"]["port"]
            await asyncio.to_thread(send_rtp, port, rtp_audio)
            await asyncio.to_thread(wait_for_live_frames, b, "reg-1", len(rtp_audio))
            device = {"type": "rtp", "params": {"addr": "127.0.0.1", "port": str(port)}}
            for state, result in (("tapping", "linked"), ("finished", "ended")):
                status, answer = await post(session, url, status_event("ctl-2", state, device))
                assert (answer["result"], answer["instance"]) == (result, "rx-b"), answer
            sidecar = await asyncio.to_thread(assert_exact, b.recordings, "ctl-2", rtp_audio)
            assert sidecar["provisional_id"] == "reg-1"
            assert sidecar["end_reason"] == "signalwire finished"

            # Nothing of it happened on A: only its own tap is there.
            await on_a.close()
            await asyncio.to_thread(assert_exact, a.recordings, "a-only", a_audio)
            assert sorted(p.name for p in a.recordings.glob("*.json")) == ["a-only.json"]

    asyncio.run(scenario())
    assert a.stop() == 0 and b.stop() == 0


@contextlib.asynccontextmanager
async def on_worker(server: ServerProcess, worker: int) -> AsyncIterator[aiohttp.ClientSession]:
    """A client session whose one connection the kernel gave to `worker` (asked again for every
    step: a connection left idle may be closed, and its successor may land elsewhere)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), headers=AUTH)
        async with session.get(f"{server.base_url}/healthz") as r:
            if (await r.json()).get("worker") == worker:
                break
        await session.close()
        assert time.monotonic() < deadline, f"no connection reached worker {worker}"
    try:
        yield session
    finally:
        await session.close()


def test_workers_of_one_receiver_pass_callbacks_to_the_one_that_holds_the_tap(
    make_server: Any, nats: NatsServer
) -> None:
    nats.start()
    first = free_port()
    server = member(
        make_server, nats, "wk", "--workers", "2", "--rtp-port-range", f"{first}-{first + 3}",
        "--rtp-idle-timeout", "60",
    )  # fmt: skip
    ws_audio, rtp_audio = noise(FRAME * 25, 4), noise(FRAME * 20, 5)

    async def peers(worker: int) -> list[str]:
        async with (
            on_worker(server, worker) as session,
            session.get(f"{server.base_url}/healthz") as r,
        ):
            return list((await r.json())["fleet"]["peers"])

    async def post_to(worker: int, target: str, body: Any) -> tuple[int, Any]:
        async with on_worker(server, worker) as session:
            return await post(session, f"{server.base_url}{target}", body)

    async def scenario() -> None:
        for worker in (0, 1):
            deadline = time.monotonic() + DEADLINE
            while await peers(worker) != [f"wk-w{1 - worker}"]:
                assert time.monotonic() < deadline, "the workers never saw each other"
                await asyncio.sleep(0.05)

        # A WebSocket tap lands on one worker; the other lists it, and a callback sent to the
        # other reaches it.
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(f"{server.ws_url}/t/{TOKEN}/tap/wtap")
            await ws.send_bytes(ws_audio)
            holder = await asyncio.to_thread(
                wait_until,
                lambda: listed(server, "wtap", "wk-w0") or listed(server, "wtap", "wk-w1"),
                "wtap listed by a worker",
            )
            other = 1 - int(holder["instance"][-1])
            async with (
                on_worker(server, other) as pinned,
                pinned.get(f"{server.base_url}/api/taps") as r,
            ):
                listing = {t["name"]: t for t in (await r.json())["taps"]}
            assert listing["wtap"]["instance"] == holder["instance"]
            assert listing["wtap"]["state"] == "recording"
            await asyncio.to_thread(wait_for_live_frames_anywhere, server, "wtap", len(ws_audio))
            for state, result in (("tapping", "linked"), ("finished", "ended")):
                event = status_event("wctl", state, ws_device("wtap"))
                _, answer = await post_to(other, "/signalwire/tap-status", event)
                assert (answer["result"], answer["instance"]) == (result, holder["instance"])
            closing = await asyncio.wait_for(ws.receive(), DEADLINE)
            assert (closing.type, closing.data) == (aiohttp.WSMsgType.CLOSE, 1000)
        sidecar = await asyncio.to_thread(assert_exact, server.recordings, "wctl", ws_audio)
        assert sidecar["provisional_id"] == "wtap"

        # The pool: ports registered through both workers never clash; a callback through
        # worker 1 reaches the tap on a port worker 0 holds.
        ports = []
        for worker in (0, 1, 0, 1):
            status, registered = await post_to(worker, "/api/taps", {"tap_id": f"pool-{worker}"})
            assert status == 201, registered
            ports.append(registered["rtp"]["port"])
        assert sorted(ports) == list(range(first, first + 4))
        for worker in (0, 1):
            status, _ = await post_to(worker, "/api/taps", {"tap_id": "more"})
            assert status == 503
        await asyncio.to_thread(send_rtp, ports[0], rtp_audio)  # pool-0, on worker 0
        device = {"type": "rtp", "params": {"addr": "127.0.0.1", "port": ports[0]}}
        for state, result in (("tapping", "linked"), ("finished", "ended")):
            _, answer = await post_to(
                1, "/signalwire/tap-status", status_event("pctl", state, device)
            )
            assert (answer["result"], answer["instance"]) == (result, "wk-w0"), answer
        await asyncio.to_thread(assert_exact, server.recordings, "pctl", rtp_audio)

        # /metrics stays per process, each sample labelled with its worker.
        for worker in (0, 1):
            async with (
                on_worker(server, worker) as session,
                session.get(f"{server.base_url}/metrics") as r,
            ):
                text = await r.text()
            samples = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
            }
            mine = (("worker", str(worker)),)
            assert samples[("tap_receiver_fleet_connected", mine)] == 1
            assert samples[("tap_receiver_fleet_peers", mine)] == 1
            assert all(("worker", str(worker)) in labels for _, labels in samples)

    asyncio.run(scenario())
    assert server.stop() == 0


def wait_for_live_frames_anywhere(server: ServerProcess, name: str, frames: int) -> None:
    """The live frames of a tap held by some worker (a detail request may reach the other)."""

    def placed() -> bool:
        status, body = server.api_get(f"/api/taps/{name}")
        return status == 200 and (body.get("live") or {}).get("frames") == frames

    wait_until(placed, f"{name}: {frames} frames")


async def real_time_sender(ws: Any, stop: asyncio.Event, sent: list[bytes], seed: int) -> None:
    """A 20 ms G.711 frame of noise every 20 ms until `stop`; what it sent goes to `sent`."""
    n = 0
    while not stop.is_set():
        frame = noise(FRAME, seed + n)
        await ws.send_bytes(frame)
        sent.append(frame)
        n += 1
        await asyncio.sleep(0.02)  # pacing: a real-time sender


def test_nats_down_and_restarted_mid_recording(make_server: Any, nats: NatsServer) -> None:
    # The receivers start while NATS is down: they record, and say so.
    a = member(make_server, nats, "rx-a")
    b = member(make_server, nats, "rx-b")
    health = wait_for_health(a, lambda h: h["fleet"]["problem"] not in (None, "connecting"),
                             "the first connection attempt failed")  # fmt: skip
    assert health["status"] == "ok" and health["fleet"]["connected"] is False
    status, body = b.api_get("/api/taps")
    assert status == 200 and body["fleet"]["reachable"] is False
    nats.start()
    wait_for_peers(a, "rx-b")
    wait_for_peers(b, "rx-a")
    sent: list[bytes] = []

    async def scenario() -> None:
        stop = asyncio.Event()
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(f"{a.ws_url}/t/{TOKEN}/tap/through-outage")

            sending = asyncio.create_task(real_time_sender(ws, stop, sent, 100))
            await asyncio.to_thread(
                wait_until, lambda: listed(b, "through-outage", "rx-a"), "B lists A's tap"
            )
            nats.kill9()
            for server in (a, b):
                await asyncio.to_thread(
                    wait_for_health, server, lambda h: not h["fleet"]["connected"], "NATS down"
                )
            scraped = await asyncio.to_thread(metrics, a)
            assert scraped["tap_receiver_fleet_connected"] == 0
            assert scraped["tap_receiver_fleet_outages_total"] == 2  # at the start, and now
            status, body = await asyncio.to_thread(b.api_get, "/api/taps")
            assert status == 200 and body["fleet"]["reachable"] is False
            assert "through-outage" not in {t["name"] for t in body["taps"]}
            await asyncio.to_thread(nats.start)
            await asyncio.to_thread(wait_for_peers, a, "rx-b")
            await asyncio.to_thread(wait_for_peers, b, "rx-a")
            await asyncio.to_thread(
                wait_until, lambda: listed(b, "through-outage", "rx-a"), "B lists it again"
            )
            stop.set()
            await sending
            await ws.close()

    asyncio.run(scenario())
    assert_exact(a.recordings, "through-outage", b"".join(sent))
    assert metrics(a)["tap_receiver_fleet_connected"] == 1
    for server in (a, b):
        log = server.log()
        # Once per outage, however many reconnection attempts failed meanwhile.
        assert len(re.findall(r"the fleet's NATS .* is unreachable", log)) == 2, log
        assert "the fleet's NATS is back after" in log
        assert server.stop() == 0


def metrics(server: ServerProcess) -> dict[str, float]:
    async def scrape() -> str:
        async with (
            aiohttp.ClientSession(headers=AUTH) as session,
            session.get(f"{server.base_url}/metrics") as r,
        ):
            return await r.text()

    text = asyncio.run(scrape())
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.labels
    }


def test_the_listing_merges_live_taps_by_directory() -> None:
    """A peer writing into our directory (another worker) updates our entry of its tap; a tap of
    another machine with the same name is an entry of its own; newest first."""
    local = [
        {"name": "call-1", "state": "recording", "started_at": "2026-01-01T10:00:00Z",
         "duration_seconds": 1.0, "loss_percent": None},
        {"name": "old", "state": "finished", "started_at": "2026-01-01T09:00:00Z"},
    ]  # fmt: skip
    live = {"name": "call-1", "state": "recording", "started_at": "2026-01-01T10:00:00Z",
            "duration_seconds": 7.5, "loss_percent": 0.0}  # fmt: skip
    newer = {**live, "started_at": "2026-01-01T11:00:00Z", "duration_seconds": 2.0}
    answers = Answers(
        [
            {"instance": "here-w1", "storage": "host:/rec", "taps": [dict(live), "junk"]},
            {"instance": "there", "storage": "other:/rec", "taps": [newer, {"name": 5}]},
            # What a broken or hostile peer may answer: it loses its entries, not the listing.
            {"instance": "evil", "taps": 5, "truncated": "lots"},
            {"instance": "evil-2", "taps": [{"name": "ghost"}], "truncated": 3},
            "not even a dict",
        ]
    )
    cleaned = listing.clean(answers)
    merged = listing.merge(local, cleaned, "host:/rec")
    assert [(t["name"], t.get("instance")) for t in merged] == [
        ("call-1", "there"),
        ("call-1", "here-w1"),
        ("old", None),
        ("ghost", "evil-2"),
    ]
    assert merged[1]["duration_seconds"] == 7.5 and merged[0]["duration_seconds"] == 2.0
    assert (merged[3]["state"], merged[3]["transport"]) == ("recording", "unknown")
    assert [a["truncated"] for a in cleaned.answers] == [0, 0, 0, 3]


def test_an_answer_too_long_for_nats_is_cut_and_says_so() -> None:
    taps = [{"name": f"tap-{n}", "remote": "x" * 200} for n in range(5000)]
    payload = fit({"instance": "a", "taps": taps}, 1024 * 1024)
    answer = json.loads(payload)
    assert len(payload) <= 1024 * 1024
    assert (
        answer["truncated"] + len(answer["taps"]) == 5000 and answer["taps"][0]["name"] == "tap-0"
    )
    assert "truncated" not in json.loads(fit({"instance": "a", "taps": taps[:10]}, 1024 * 1024))


def test_a_receiver_that_dies_leaves_the_fleet_and_its_taps_the_listing(
    make_server: Any, nats: NatsServer
) -> None:
    nats.start()
    a = member(make_server, nats, "rx-a")
    b = member(make_server, nats, "rx-b")
    wait_for_peers(a, "rx-b")

    async def scenario() -> None:
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(f"{b.ws_url}/t/{TOKEN}/tap/doomed")
            await ws.send_bytes(noise(FRAME * 5, 9))
            await asyncio.to_thread(
                wait_until, lambda: listed(a, "doomed", "rx-b"), "A lists B's tap"
            )
            b.kill9()  # no goodbye: only its silence tells
            await asyncio.to_thread(
                wait_for_health, a, lambda h: h["fleet"]["peers"] == [], "B forgotten"
            )
            status, body = await asyncio.to_thread(a.api_get, "/api/taps")
            assert status == 200 and body["taps"] == [] and body["fleet"]["missing"] == []
            assert body["fleet"]["reachable"] is True

    asyncio.run(scenario())
    assert "fleet: rx-b is gone" in a.log()
    assert a.stop() == 0


# -- live audio on NATS (live_nats) ---------------------------------------------------------------

JAMBONZ = ("audio.jambonz.org",)


class LiveAudio:
    """A consumer of `tap-receiver.live.>` elsewhere: every message, in order of arrival."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, dict[str, str], bytes]] = []
        self.client: Any = None
        self.reconnected = asyncio.Event()

    async def connect(self, url: str) -> None:
        import nats

        async def on_reconnected() -> None:
            self.reconnected.set()

        async def on_message(msg: Any) -> None:
            self.messages.append((msg.subject, dict(msg.headers or {}), msg.data))

        self.client = await nats.connect(
            url, reconnect_time_wait=0.2, max_reconnect_attempts=-1,
            reconnected_cb=on_reconnected,
        )  # fmt: skip
        await self.client.subscribe("tap-receiver.live.>", cb=on_message)
        await self.client.flush()

    async def wait(self, predicate: Any, what: str) -> None:
        async def until() -> None:
            while not predicate():
                await asyncio.sleep(0.02)  # poll: the callbacks run on this loop

        try:
            await asyncio.wait_for(until(), DEADLINE)
        except TimeoutError:
            raise AssertionError(f"waited {DEADLINE} s for {what}") from None

    def ended(self) -> bool:
        return any("end" in headers for _, headers, _ in self.messages)


def check_published(
    messages: list[tuple[str, dict[str, str], bytes]], wav: np.ndarray, channels: int
) -> list[int]:
    """Each audio message is the WAV's audio at its announced position, sample for sample;
    returns the position jumps (frames not received) between messages."""
    jumps = []
    expected = None
    for _, headers, body in messages:
        position, frames = int(headers["position"]), int(headers["frames"])
        if expected is not None and position != expected:
            jumps.append(position - expected)
        if "end" in headers:
            assert body == b"" and frames == 0 and position == len(wav), headers
            continue
        audio = np.frombuffer(body, "<i2").reshape(-1, channels)
        assert len(audio) == frames > 0, headers
        expected_audio = wav[position : position + frames].reshape(-1, channels)
        assert np.array_equal(audio, expected_audio), f"message at {position}"
        expected = position + frames
    return jumps


def test_live_audio_on_nats_is_the_wav_from_its_announced_position(
    make_server: Any, nats: NatsServer
) -> None:
    """A stereo L16 tap's audio, published on NATS while it records, is the WAV sample for
    sample: positions contiguous from the first message's, every header right, then the end."""
    nats.start()
    server = member(make_server, nats, "rx-live", "--live-nats")
    wait_for_health(server, lambda h: h["fleet"]["connected"], "fleet connected")
    tap_id = "live.nats-1"  # a '.' is a '_' in the subject
    rate = 16000
    rng = np.random.default_rng(7)
    pcm = rng.integers(-32768, 32767, (rate * 2, 2), dtype=np.int16)
    raw = pcm.astype("<i2").tobytes()
    pieces = [raw[i : i + 1283] for i in range(0, len(raw), 1283)]  # split mid-sample
    consumer = LiveAudio()

    async def scenario() -> None:
        await consumer.connect(nats.url)
        async with aiohttp.ClientSession() as session:
            tap = await session.ws_connect(
                f"{server.ws_url}/t/{TOKEN}/stream/{tap_id}", protocols=JAMBONZ
            )
            await tap.send_str(json.dumps({"sampleRate": rate, "mixType": "stereo"}))
            for n, piece in enumerate(pieces):
                await tap.send_bytes(piece)
                if n % 10 == 0:
                    await asyncio.sleep(0.02)  # pacing: spread over several live updates
            await tap.close()
        await consumer.wait(consumer.ended, "the end message")
        await consumer.client.close()

    asyncio.run(scenario())
    wait_for_sidecar(server.recordings, tap_id)
    wav, wav_rate = read_wav(server.recordings / f"{tap_id}.wav")
    assert wav_rate == rate and np.array_equal(wav, pcm)  # the recording itself is exact
    messages = consumer.messages
    assert len(messages) > 2
    assert check_published(messages, wav, 2) == []  # contiguous: nothing dropped
    first = int(messages[0][1]["position"])
    assert first == 0  # subscribed before the tap began: from its first frame
    heard = np.frombuffer(b"".join(body for _, _, body in messages), "<i2").reshape(-1, 2)
    assert np.array_equal(heard, wav[first:])  # from its position to the last frame
    for subject, headers, _ in messages:
        assert subject == "tap-receiver.live.rx-live.live_nats-1"
        assert headers.items() >= {
            "sample_rate": str(rate), "channels": "2", "format": "s16le", "tap_id": tap_id,
            "name": tap_id,
        }.items()  # fmt: skip
    assert [h.get("end") for _, h, _ in messages].count("closed") == 1
    assert "end" in messages[-1][1]
    live = wait_for_health(server, lambda h: h["live"]["nats"]["taps"] == 0, "publisher done")
    assert live["live"]["nats"]["messages"] == len(messages)
    assert live["live"]["nats"]["dropped_frames"] == 0
    assert live["live"]["taps"] == 0 and live["live"]["subscribers"] == 0  # no listeners
    scraped = metrics(server)
    assert scraped["tap_receiver_live_nats_messages_total"] == len(messages)
    assert scraped["tap_receiver_live_nats_dropped_frames_total"] == 0
    assert server.stop() == 0


def test_live_audio_on_nats_through_an_outage(make_server: Any, nats: NatsServer) -> None:
    """NATS killed while a tap records: the recording stays exact, the audio of the outage is
    dropped and counted, what arrives is the WAV at its position (the drop a jump), and after
    NATS is back the audio and the end come again."""
    nats.start()
    server = member(make_server, nats, "rx-live", "--live-nats")
    wait_for_health(server, lambda h: h["fleet"]["connected"], "fleet connected")
    tap_id = "live-outage"
    consumer = LiveAudio()
    sent: list[bytes] = []

    def dropped(h: dict[str, Any]) -> bool:
        return h["live"]["nats"]["dropped_frames"] > 0

    async def scenario() -> None:
        await consumer.connect(nats.url)
        stop = asyncio.Event()
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(f"{server.ws_url}/t/{TOKEN}/tap/{tap_id}")

            sending = asyncio.create_task(real_time_sender(ws, stop, sent, 500))
            await consumer.wait(lambda: len(consumer.messages) >= 3, "live audio on NATS")
            nats.kill9()
            await asyncio.to_thread(
                wait_for_health, server, lambda h: not h["fleet"]["connected"], "NATS down"
            )
            await asyncio.to_thread(wait_for_health, server, dropped, "audio dropped")
            before = len(consumer.messages)
            await asyncio.to_thread(nats.start)
            await asyncio.to_thread(
                wait_for_health, server, lambda h: h["fleet"]["connected"], "NATS back"
            )
            await consumer.wait(consumer.reconnected.is_set, "the consumer reconnected")
            await consumer.wait(lambda: len(consumer.messages) > before + 2, "audio again")
            stop.set()
            await sending
            await ws.close()
        await consumer.wait(consumer.ended, "the end message")
        await consumer.client.close()

    asyncio.run(scenario())
    assert_exact(server.recordings, tap_id, b"".join(sent))
    wav, _ = read_wav(server.recordings / f"{tap_id}.wav")
    jumps = check_published(consumer.messages, wav, 1)
    assert jumps and all(jump > 0 for jump in jumps)  # the outage: a jump forward
    assert consumer.messages[-1][1]["end"] == "closed"
    health = wait_for_health(server, lambda h: h["live"]["nats"]["taps"] == 0, "publisher done")
    nats_stats = health["live"]["nats"]
    received = sum(int(h["frames"]) for _, h, _ in consumer.messages)
    # What was not received was dropped here, or lost with the killed server's socket.
    assert 0 < nats_stats["dropped_frames"] <= len(wav) - received
    assert nats_stats["messages"] >= len(consumer.messages)
    scraped = metrics(server)
    assert scraped["tap_receiver_live_nats_dropped_frames_total"] == nats_stats["dropped_frames"]
    assert server.stop() == 0


def test_live_audio_on_nats_ends_with_the_shutdown(make_server: Any, nats: NatsServer) -> None:
    """SIGTERM while a tap records: its last audio and an `end: shutdown` message reach the
    consumer before the receiver leaves NATS, and all of it is the WAV."""
    nats.start()
    server = member(make_server, nats, "rx-live", "--live-nats")
    wait_for_health(server, lambda h: h["fleet"]["connected"], "fleet connected")
    tap_id = new_id("nats-end")
    sent = noise(8000, 31)
    consumer = LiveAudio()

    async def scenario() -> int:
        await consumer.connect(nats.url)
        async with aiohttp.ClientSession() as session:
            tap = await session.ws_connect(f"{server.ws_url}/t/{TOKEN}/tap/{tap_id}")
            for n in range(0, len(sent), 800):
                await tap.send_bytes(sent[n : n + 800])
            await consumer.wait(lambda: len(consumer.messages) > 0, "the first audio")
            code = await asyncio.get_running_loop().run_in_executor(None, server.stop)
            await consumer.wait(consumer.ended, "the end message")
            await consumer.client.close()
            return code

    assert asyncio.run(scenario()) == 0
    wait_for_sidecar(server.recordings, tap_id)
    wav, _ = read_wav(server.recordings / f"{tap_id}.wav")
    assert np.array_equal(wav.reshape(-1), reference.decode("PCMU", sent))
    messages = consumer.messages
    assert check_published(messages, wav, 1) == []
    assert messages[-1][1]["end"] == "shutdown"
    heard = np.frombuffer(b"".join(body for _, _, body in messages), "<i2")
    assert np.array_equal(heard, wav.reshape(-1)[int(messages[0][1]["position"]) :])
