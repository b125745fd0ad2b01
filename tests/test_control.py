"""The control plane: RTP registrations, SignalWire status callbacks, completion webhooks,
/metrics and JSON logs, against the real server."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
import time
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from receiver.rtp.packet import RtpPacket
from tests import reference
from tests.helpers import (
    DEADLINE,
    TOKEN,
    ServerProcess,
    free_port,
    noise,
    read_wav,
    wait_for_health,
    wait_for_live_frames,
    wait_for_sidecar,
    wait_until,
)

SECRET = "webhook-secret-123"


def send_rtp(
    port: int, audio: bytes, sock: socket.socket | None = None, pt: int = 0
) -> socket.socket:
    sock = sock or socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if sock.getsockname()[1] == 0:
        sock.bind(("127.0.0.1", 0))
    for n in range(len(audio) // 160):
        packet = RtpPacket(
            pt, n == 0, 500 + n, 1000 + 160 * n, 0xC0FFEE, audio[n * 160 : (n + 1) * 160]
        )
        sock.sendto(packet.serialize(), ("127.0.0.1", port))
        time.sleep(0.002)  # pacing: the sender spreads its packets out
    return sock


async def post(url: str, body: Any, token: str | None = TOKEN) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, headers=headers) as r,
    ):
        return r.status, await r.json()


def status_event(control_id: str, state: str, device: dict[str, Any]) -> dict[str, Any]:
    """A calling.call.tap event as SignalWire posts it (protocols.md §1.3), numbers as strings."""
    return {
        "event_type": "calling.call.tap",
        "event_channel": "swml:abc",
        "timestamp": 1640000000.123,
        "project_id": "p",
        "space_id": "s",
        "params": {
            "call_id": "call-uuid-1",
            "node_id": "node-1",
            "segment_id": "seg-1",
            "control_id": control_id,
            "state": state,
            "tap": {"type": "audio", "params": {"direction": "both"}},
            "device": device,
        },
    }


@pytest.fixture
def pool_server(make_server: Any) -> ServerProcess:
    first = free_port()
    server: ServerProcess = make_server(
        "--token", TOKEN, "--rtp-port-range", f"{first}-{first + 2}", "--rtp-idle-timeout", "60"
    )
    server.pool = range(first, first + 3)  # type: ignore[attr-defined]
    return server


def test_registration_allocates_a_port_recorded_as_the_tap(pool_server: ServerProcess) -> None:
    status, answer = asyncio.run(
        post(
            f"{pool_server.base_url}/api/taps", {"tap_id": "call-1", "codec": "PCMA", "ptime": "20"}
        )
    )
    assert status == 201, answer
    port = answer["rtp"]["port"]
    assert port in pool_server.pool  # type: ignore[attr-defined]
    assert answer["device"] == {
        "type": "rtp",
        "params": {"addr": "127.0.0.1", "port": port, "codec": "PCMA", "ptime": 20},
    }
    audio = noise(160 * 10, 1)
    send_rtp(port, audio, pt=8)
    wait_for_live_frames(pool_server, "call-1", len(audio))
    # SignalWire says the tap finished: the tap ends at once (idle timeout is 60 s here)
    event = status_event(
        "call-1", "finished", {"type": "rtp", "params": {"addr": "x", "port": str(port)}}
    )
    status, result = asyncio.run(post(f"{pool_server.base_url}/signalwire/tap-status", event))
    assert status == 200 and result["result"] == "ended"
    sidecar = wait_for_sidecar(pool_server.recordings, "call-1")
    samples, _ = read_wav(pool_server.recordings / "call-1.wav")
    assert np.array_equal(samples, reference.decode("PCMA", audio))
    assert sidecar["signalwire"]["call_id"] == "call-uuid-1"
    assert sidecar["signalwire"]["direction"] == "both"
    health = pool_server.health()
    assert health is not None and health["rtp"]["pool_ports_in_use"] == 0  # back in the pool


def test_pool_exhaustion_and_auth(pool_server: ServerProcess) -> None:
    url = f"{pool_server.base_url}/api/taps"
    assert asyncio.run(post(url, {"tap_id": "x"}, token=None))[0] == 401
    assert asyncio.run(post(url, {"tap_id": "../x"}))[0] == 400
    assert asyncio.run(post(url, {"tap_id": "x", "codec": "amr"}))[0] == 400
    ports = {asyncio.run(post(url, {"tap_id": f"t{i}"}))[1]["rtp"]["port"] for i in range(3)}
    assert ports == set(pool_server.pool)  # type: ignore[attr-defined]
    status, answer = asyncio.run(post(url, {"tap_id": "one-too-many"}))
    assert status == 503 and "in use" in answer["error"]


def test_tapping_then_finished_names_and_ends_a_pool_tap(pool_server: ServerProcess) -> None:
    _, answer = asyncio.run(post(f"{pool_server.base_url}/api/taps", {"tap_id": "provisional-1"}))
    port = answer["rtp"]["port"]
    audio = noise(160 * 8, 2)
    sock = send_rtp(port, audio[: 160 * 4])
    wait_for_live_frames(pool_server, "provisional-1", 160 * 4)  # recorded under that name
    device = {"type": "rtp", "params": {"addr": "203.0.113.1", "port": str(port), "codec": "PCMU"}}
    url = f"{pool_server.base_url}/signalwire/tap-status"
    assert (
        asyncio.run(post(url, status_event("ctl-abc", "tapping", device)))[1]["result"] == "linked"
    )
    for n in range(4, 8):  # the stream goes on under the new name
        packet = RtpPacket(
            0, False, 500 + n, 1000 + 160 * n, 0xC0FFEE, audio[n * 160 : (n + 1) * 160]
        )
        sock.sendto(packet.serialize(), ("127.0.0.1", port))
    wait_for_live_frames(pool_server, "ctl-abc", 160 * 8)  # all of it reached the renamed tap
    assert (
        asyncio.run(post(url, status_event("ctl-abc", "finished", device)))[1]["result"] == "ended"
    )
    sidecar = wait_for_sidecar(pool_server.recordings, "ctl-abc")
    assert sidecar["tap_id"] == "ctl-abc" and sidecar["provisional_id"] == "provisional-1"
    assert sidecar["file"] == "ctl-abc.wav"
    samples, _ = read_wav(pool_server.recordings / "ctl-abc.wav")
    assert np.array_equal(samples, reference.decode("PCMU", audio))
    assert not list(pool_server.recordings.glob("provisional-1*"))


def test_source_registration_names_a_stream_on_the_shared_port(make_server: Any) -> None:
    server = make_server("--token", TOKEN, "--rtp-idle-timeout", "0.5")
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.bind(("127.0.0.1", 0))
    source = f"127.0.0.1:{sender.getsockname()[1]}"
    status, answer = asyncio.run(
        post(f"{server.base_url}/api/taps", {"tap_id": "by-source", "source": source})
    )
    assert status == 201 and answer["rtp"]["port"] == server.rtp_port and answer["source"] == source
    audio = noise(160 * 5, 3)
    send_rtp(server.rtp_port, audio, sender)
    wait_for_sidecar(server.recordings, "by-source")
    samples, _ = read_wav(server.recordings / "by-source.wav")
    assert np.array_equal(samples, reference.decode("PCMU", audio))
    # registering a source that is already streaming renames its provisional recording
    late = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    late.bind(("127.0.0.1", 0))
    send_rtp(server.rtp_port, audio, late)
    provisional = f"rtp-127.0.0.1-{late.getsockname()[1]}"
    wait_until(lambda: (server.recordings / f"{provisional}.wav").exists(), "its recording")
    late_source = f"127.0.0.1:{late.getsockname()[1]}"
    asyncio.run(
        post(f"{server.base_url}/api/taps", {"tap_id": "named-late", "source": late_source})
    )
    sidecar = wait_for_sidecar(server.recordings, "named-late")
    assert sidecar["provisional_id"] == provisional
    assert not (server.recordings / f"{provisional}.wav").exists()


def test_tapping_renames_a_websocket_tap_and_finished_closes_it(make_server: Any) -> None:
    server = make_server("--token", TOKEN)
    audio = noise(1600, 4)
    url = f"{server.base_url}/signalwire/tap-status"
    device = {
        "type": "ws",
        "params": {"uri": f"wss://example.com/t/{TOKEN}/tap/prov-ws", "codec": "PCMU"},
    }

    async def run() -> int | None:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{server.ws_url}/t/{TOKEN}/tap/prov-ws") as ws,
        ):
            await ws.send_bytes(audio)
            await asyncio.to_thread(wait_for_live_frames, server, "prov-ws", len(audio))
            _, result = await post(url, status_event("ctl-ws", "tapping", device))
            assert result["result"] == "linked"
            _, result = await post(url, status_event("ctl-ws", "finished", device))
            assert result["result"] == "ended"
            msg = await ws.receive(timeout=DEADLINE)
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.extra == "tap finished"
            return int(msg.data)  # the close frame the server sent

    assert asyncio.run(run()) == 1000
    sidecar = wait_for_sidecar(server.recordings, "ctl-ws")
    assert sidecar["provisional_id"] == "prov-ws" and sidecar["signalwire"]["node_id"] == "node-1"
    samples, _ = read_wav(server.recordings / "ctl-ws.wav")
    assert np.array_equal(samples, reference.decode("PCMU", audio))


def test_tapping_before_the_websocket_connects(make_server: Any) -> None:
    server = make_server("--no-auth")
    device = {"type": "ws", "params": {"uri": "wss://h/tap/early-ws"}}
    asyncio.run(
        post(
            f"{server.base_url}/signalwire/tap-status", status_event("ctl-early", "tapping", device)
        )
    )

    async def run() -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{server.ws_url}/tap/early-ws") as ws,
        ):
            await ws.send_bytes(b"\xff" * 800)

    asyncio.run(run())
    assert wait_for_sidecar(server.recordings, "ctl-early")["provisional_id"] == "early-ws"


def test_webhook_is_signed_and_retried(make_server: Any) -> None:
    received: list[tuple[bytes, dict[str, str]]] = []

    async def run() -> None:
        retried = asyncio.Event()

        async def hook(request: web.Request) -> web.Response:
            received.append((await request.read(), dict(request.headers)))
            if len(received) == 2:
                retried.set()
            return web.Response(status=500 if len(received) == 1 else 200)

        app = web.Application()
        app.router.add_post("/hook", hook)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        server = make_server(
            "--no-auth",
            "--webhook-url",
            f"http://127.0.0.1:{port}/hook",
            "--webhook-secret",
            SECRET,
        )
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{server.ws_url}/tap/hooked") as ws,
        ):
            await ws.send_bytes(b"\xff" * 1600)
        await asyncio.wait_for(retried.wait(), DEADLINE)  # the first try failed, the retry came
        await runner.cleanup()
        health = await asyncio.to_thread(
            wait_for_health, server, lambda h: h["webhooks"]["delivered"], "a delivery counted"
        )
        assert health["webhooks"]["delivered"] == 1
        assert health["webhooks"]["retries"] == 1

    asyncio.run(run())
    assert len(received) == 2
    (body1, headers1), (body2, headers2) = received
    assert (
        body1 == body2
        and headers1["X-Tap-Receiver-Delivery"] == headers2["X-Tap-Receiver-Delivery"]
    )
    expected = "sha256=" + hmac.new(SECRET.encode(), body2, hashlib.sha256).hexdigest()
    assert headers2["X-Tap-Receiver-Signature"] == expected
    sidecar = json.loads(body2)
    assert sidecar["tap_id"] == "hooked" and sidecar["state"] == "finished"
    assert sidecar["frames_written"] == 1600


def test_metrics_parse_and_match_the_traffic(make_server: Any) -> None:
    server = make_server("--no-auth", "--rtp-idle-timeout", "0.3", "--log-format", "json")

    async def ws_taps() -> None:
        async with aiohttp.ClientSession() as session:
            for i in range(3):
                async with session.ws_connect(f"{server.ws_url}/tap/m{i}") as ws:
                    await ws.send_bytes(b"\x55" * 800)
                    await ws.send_bytes(b"\x55" * 800)

    asyncio.run(ws_taps())
    sock = send_rtp(server.rtp_port, noise(160 * 20, 5))
    sock.sendto(b"\x80", ("127.0.0.1", server.rtp_port))  # malformed
    for name in ("m0", "m1", "m2"):
        wait_for_sidecar(server.recordings, name)
    wait_for_sidecar(server.recordings, f"rtp-127.0.0.1-{sock.getsockname()[1]}")

    async def scrape() -> str:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{server.base_url}/metrics") as r,
        ):
            assert r.status == 200 and r.content_type == "text/plain"
            return await r.text()

    def scraped() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        samples = {}
        for family in text_string_to_metric_families(asyncio.run(scrape())):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    written = (3 * 1600 + 20 * 160) * 2

    def settled() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        samples = scraped()
        if samples.get(("tap_receiver_bytes_written_total", ())) != written:
            return None
        if samples.get(("tap_receiver_event_loop_lag_seconds_count", ()), 0) < 1:
            return None
        return samples

    samples = wait_until(settled, "/metrics: everything written, the loop lag observed once")
    assert samples[("tap_receiver_taps_started_total", (("transport", "websocket"),))] == 3
    assert samples[("tap_receiver_taps_started_total", (("transport", "rtp"),))] == 1
    assert samples[("tap_receiver_taps_finished_total", (("transport", "websocket"),))] == 3
    assert samples[("tap_receiver_rtp_packets_total", (("outcome", "received"),))] == 20
    assert samples[("tap_receiver_rtp_packets_total", (("outcome", "malformed"),))] == 1
    assert samples[("tap_receiver_rtp_packets_total", (("outcome", "lost"),))] == 0
    assert samples[("tap_receiver_websocket_messages_total", ())] == 6
    assert samples[("tap_receiver_bytes_written_total", ())] == written
    assert samples[("tap_receiver_write_batch_seconds_count", ())] >= 1
    assert samples[("tap_receiver_event_loop_lag_seconds_count", ())] >= 1
    # --log-format json: one object per line, with a start and an end line per tap
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert len(lines) == len(server.log().splitlines())
    events = [(e.get("event"), e.get("tap_id")) for e in lines]
    assert ("tap_started", "m1") in events and ("tap_finished", "m1") in events
    finished = next(e for e in lines if e.get("event") == "tap_finished" and e["tap_id"] == "m1")
    assert finished["counters"]["frames_received"] == 2 and finished["frames"] == 1600


def test_finished_before_any_packet_releases_the_port(pool_server: ServerProcess) -> None:
    _, answer = asyncio.run(post(f"{pool_server.base_url}/api/taps", {"tap_id": "never-sent"}))
    device = {"type": "rtp", "params": {"port": answer["rtp"]["port"]}}
    url = f"{pool_server.base_url}/signalwire/tap-status"
    _, result = asyncio.run(post(url, status_event("never-sent", "finished", device)))
    assert result["result"].startswith("released")
    health = pool_server.health()
    assert health is not None and health["rtp"]["pool_ports_in_use"] == 0


def test_deeply_nested_bodies_are_refused(pool_server: ServerProcess) -> None:
    deep: Any = "x"
    for _ in range(300):
        deep = {"d": deep}
    event = status_event("deep", "tapping", {"type": "ws", "params": {"uri": "wss://h/tap/a"}})
    event["params"]["device"]["params"]["extra"] = deep
    status, answer = asyncio.run(post(f"{pool_server.base_url}/signalwire/tap-status", event))
    assert status == 400 and "deeply" in answer["error"]
