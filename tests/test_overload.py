"""Bursts and overload against the real server: streams that all start at once are recorded
exactly; senders faster than real time cannot fill the disk or the memory; SIGTERM and kill -9
in the middle of a burst leave every file valid and the taps that were recording intact.
Outcomes only: nothing here asserts how fast the server was."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from bench.rtp_load import expected_payload, payload_for
from receiver.rtp.packet import RtpPacket
from tests import reference
from tests.helpers import (
    DEADLINE,
    ROOT,
    ServerProcess,
    assert_header_matches_data,
    noise,
    read_wav,
    wait_for_health,
    wait_for_sidecar,
    wait_until,
    wav_frames,
)


def rtp(seq: int, ts: int, payload: bytes, ssrc: int = 0x5EED) -> bytes:
    return RtpPacket(0, False, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc, payload).serialize()


class RealTimeSender(threading.Thread):
    """One 20 ms PCMU stream from its own port, in real time, for `seconds`."""

    def __init__(self, port: int, seconds: float, seed: int = 42) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.packets = int(seconds * 50)
        self.audio = payload_for(seed, 160 * self.packets, seed=seed)
        self.sent = 0
        self.stop = threading.Event()

    @property
    def name(self) -> str:
        return f"rtp-127.0.0.1-{self.sock.getsockname()[1]}"

    def run(self) -> None:
        start = time.perf_counter()
        for n in range(self.packets):
            if self.stop.is_set():
                return
            delay = start + n * 0.02 - time.perf_counter()
            if delay > 0:
                time.sleep(delay)  # pacing: real time, a packet every 20 ms
            payload = self.audio[n * 160 : (n + 1) * 160]
            self.sock.sendto(rtp(n, 160 * n, payload), ("127.0.0.1", self.port))
            self.sent += 1


def burst_of_sources(port: int, sources: int, first_port: int = 30_000) -> int:
    """One RTP packet from each of `sources` distinct source ports, as fast as possible."""
    sent = 0
    source_port = first_port
    while sent < sources:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind(("127.0.0.2", source_port))
            except OSError:
                source_port += 1
                continue  # in use: take the next port
            sock.sendto(rtp(1, 160, bytes(160), ssrc=source_port), ("127.0.0.1", port))
        source_port += 1
        sent += 1
    return sent


def test_a_burst_of_streams_starting_at_once_is_recorded_exactly(make_server: Any) -> None:
    """400 streams whose first packets all arrive within one packet time (a restart while calls
    are tapped): every one is a complete recording, sample for sample, nothing refused."""
    server: ServerProcess = make_server("--no-auth", "--rtp-idle-timeout", "1")
    streams, seconds = 400, 3
    result = subprocess.run(
        [sys.executable, "-m", "bench.rtp_load", "--port", str(server.rtp_port),
         "--streams", str(streams), "--seconds", str(seconds), "--seed", "5", "--ramp", "0"],
        cwd=ROOT, check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    summary = json.loads(result.stdout)
    assert summary["packets_sent"] == streams * seconds * 50

    def finished() -> list[dict[str, Any]] | None:
        paths = list(server.recordings.glob("rtp-*.json"))
        sidecars = [json.loads(p.read_text()) for p in paths]
        done = [s for s in sidecars if s.get("state") == "finished"]
        return done if len(done) == streams else None

    sidecars = wait_until(finished, f"{streams} finished recordings")
    packets = seconds * 50
    for sidecar in sidecars:
        assert sidecar["rtp"]["received"] == packets and sidecar["rtp"]["lost"] == 0, sidecar
        assert sidecar["frames_written"] == packets * 160
        assert "dropped_ahead_frames" not in sidecar["counters"]
    health = server.health()
    assert health is not None and health["rtp"]["streams_refused"] == 0
    for sidecar in sidecars[:: streams // 20]:  # every 20th, sample for sample
        stream = int(sidecar["rtp"]["ssrcs"][0], 16) - 0x10000000
        samples, _ = read_wav(server.recordings / sidecar["file"])
        expected = expected_payload(stream, packets, 160, 5, 0)
        assert np.array_equal(samples, reference.decode("PCMU", expected))


def test_rtp_faster_than_real_time_is_dropped_not_written(make_server: Any) -> None:
    """A source that sends 20 s of audio at once becomes about as much audio as the time it
    took (plus the jitter window): the rest is dropped and counted, the file is exact as far as
    it goes, and a real-time stream beside it is untouched."""
    server: ServerProcess = make_server("--no-auth", "--rtp-idle-timeout", "1")
    legit = RealTimeSender(server.rtp_port, seconds=2.0)
    legit.start()
    fast = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fast.bind(("127.0.0.1", 0))
    packets = 1000  # 20 s of audio
    audio = noise(160 * packets, seed=8)
    for n in range(packets):
        fast.sendto(
            rtp(n, 160 * n, audio[n * 160 : (n + 1) * 160], 0xFA57), ("127.0.0.1", server.rtp_port)
        )
        if n % 100 == 99:
            time.sleep(0.01)  # pacing: lets the socket buffer drain (no kernel drops)
    legit.join()
    name = f"rtp-127.0.0.1-{fast.getsockname()[1]}"
    sidecar = wait_for_sidecar(server.recordings, name)
    written, dropped = sidecar["frames_written"], sidecar["counters"]["dropped_ahead_frames"]
    assert sidecar["rtp"]["received"] == packets and sidecar["rtp"]["lost"] == 0
    assert written + dropped == packets * 160  # every sample either written or counted
    assert written < packets * 160 // 2  # most of it ran ahead of the wall clock
    samples, _ = read_wav(server.recordings / f"{name}.wav")
    assert len(samples) == written
    # What was written is whole packets of what was sent, in order (some of them dropped).
    decoded = reference.decode("PCMU", audio).reshape(packets, 160)
    kept, at = 0, 0
    for packet_samples in decoded:
        if at < written and np.array_equal(samples[at : at + 160], packet_samples):
            at += 160
            kept += 1
    assert at == written and kept * 160 == written
    health = server.health()
    assert health is not None and health["dropped_frames"]["ahead"] >= dropped
    assert "faster than real time" in server.log()
    legit_sidecar = wait_for_sidecar(server.recordings, legit.name)
    assert legit_sidecar["frames_written"] == legit.packets * 160
    legit_samples, _ = read_wav(server.recordings / f"{legit.name}.wav")
    assert np.array_equal(legit_samples, reference.decode("PCMU", legit.audio))


def test_websocket_faster_than_real_time_is_paced_and_loses_nothing(make_server: Any) -> None:
    """A client that sends 4 s of audio as fast as it can is slowed by TCP flow control to about
    real time: nothing is lost, nothing runs ahead, and the pacing is counted."""
    server: ServerProcess = make_server("--no-auth")
    audio = noise(8000 * 4, seed=11)

    async def send() -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{server.ws_url}/tap/fast-ws") as ws,
        ):
            for i in range(0, len(audio), 1600):
                await ws.send_bytes(audio[i : i + 1600])
            await ws.close()

    asyncio.run(send())
    sidecar = wait_for_sidecar(server.recordings, "fast-ws")
    assert sidecar["frames_written"] == len(audio)
    assert "dropped_ahead_frames" not in sidecar["counters"]
    samples, _ = read_wav(server.recordings / "fast-ws.wav")
    assert np.array_equal(samples, reference.decode("PCMU", audio))
    health = server.health()
    assert health is not None and health["websocket"]["paced"] > 0


def test_sigterm_during_a_burst_leaves_valid_files_and_the_recording_taps_whole(
    make_server: Any,
) -> None:
    """SIGTERM while thousands of new sources are being admitted: the server exits 0, every WAV
    on disk has a header that matches its data, and the tap that was recording before the burst
    is finished and exact."""
    server: ServerProcess = make_server("--no-auth", "--rtp-idle-timeout", "30")
    legit = RealTimeSender(server.rtp_port, seconds=30.0)
    legit.start()
    wait_for_health(server, lambda h: h["rtp"]["active_streams"] == 1, "the first stream")
    burst_of_sources(server.rtp_port, 3000)
    legit.stop.set()
    legit.join()
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=DEADLINE) == 0, server.log()
    sidecar = json.loads((server.recordings / f"{legit.name}.json").read_text())
    assert sidecar["state"] == "finished" and sidecar["end_reason"] == "shutdown"
    samples, _ = read_wav(server.recordings / f"{legit.name}.wav")
    assert np.array_equal(samples, reference.decode("PCMU", legit.audio[: legit.sent * 160]))
    for wav in server.recordings.glob("*.wav"):
        assert_header_matches_data(wav)
    assert "Traceback" not in server.log()


def test_kill_9_after_a_burst_loses_at_most_a_flush_of_the_recording_tap(
    make_server: Any, tmp_path: Path
) -> None:
    """kill -9 right after a burst of new sources: the tap that was recording keeps all but the
    last flush_interval of its audio (the burst's file creations never hold up its batches), and
    the next start finalizes it."""
    recordings = tmp_path / "burst"
    flush = 0.25
    server: ServerProcess = make_server(
        "--no-auth", "--flush-interval", str(flush), recordings=recordings
    )
    legit = RealTimeSender(server.rtp_port, seconds=30.0)
    legit.start()
    # a tap that is recording: its audio is reaching the disk
    wait_until(lambda: (wav_frames(recordings / f"{legit.name}.wav") or 0) > 0, "its first batch")
    burst_of_sources(server.rtp_port, 3000)
    legit.stop.set()
    legit.join()
    sent_frames = legit.sent * 160
    server.kill9()
    second: ServerProcess = make_server("--no-auth", recordings=recordings)
    wait_for_health(second, lambda h: h["recovery"]["state"] == "done", "recovery done")
    sidecar = json.loads((recordings / f"{legit.name}.json").read_text())
    assert sidecar["recovered"] is True
    wav = recordings / f"{legit.name}.wav"
    frames = assert_header_matches_data(wav)
    samples, _ = read_wav(wav)
    assert np.array_equal(samples, reference.decode("PCMU", legit.audio[:frames]))
    # At most one flush of audio (and what was still in flight) is missing.
    assert frames >= sent_frames - int((flush + 0.5) * 8000), (frames, sent_frames)


def test_kill_9_loses_at_most_a_flush_of_every_tap(make_server: Any, tmp_path: Path) -> None:
    """Taps are flushed a slice at a time (ten slices of the default 1 s flush_interval): each
    of a dozen recording taps, whatever its slice, keeps all but the last flush_interval of its
    audio when the server is killed, and every one is exact."""
    recordings = tmp_path / "slices"
    flush = 1.0
    server: ServerProcess = make_server(
        "--no-auth", "--flush-interval", str(flush), recordings=recordings
    )
    senders = [RealTimeSender(server.rtp_port, seconds=60.0, seed=seed) for seed in range(12)]
    for sender in senders:
        sender.start()

    def written(sender: RealTimeSender) -> int:
        return wav_frames(recordings / f"{sender.name}.wav") or 0

    # Every tap has had at least two batches written (two turns of its slice)
    wait_until(lambda: all(written(s) > 8000 for s in senders), "two batches of every tap")
    for sender in senders:
        sender.stop.set()
    for sender in senders:
        sender.join()
    server.kill9()
    second: ServerProcess = make_server("--no-auth", recordings=recordings)
    wait_for_health(second, lambda h: h["recovery"]["state"] == "done", "recovery done")
    for sender in senders:
        wav = recordings / f"{sender.name}.wav"
        frames = assert_header_matches_data(wav)
        samples, _ = read_wav(wav)
        assert np.array_equal(samples, reference.decode("PCMU", sender.audio[:frames]))
        # At most one flush (and what was still in flight) is missing.
        sent_frames = sender.sent * 160
        assert frames >= sent_frames - int((flush + 0.5) * 8000), (sender.name, frames)


def test_thousands_of_interrupted_recordings_are_recovered_while_new_taps_record(
    make_server: Any, tmp_path: Path
) -> None:
    """A directory left with 2 000 recordings still `recording`: the server listens and records
    new taps while it finalizes them in the background, and never names a new tap over one."""
    recordings = tmp_path / "interrupted"
    recordings.mkdir()
    header = _wav_header(frames=160)
    for n in range(2000):
        name = f"int-{n:04d}"
        (recordings / f"{name}.wav").write_bytes(header + bytes(320))
        (recordings / f"{name}.json").write_text(
            json.dumps({"tap_id": name, "state": "recording", "sample_rate": 8000})
        )
    server: ServerProcess = make_server("--no-auth", recordings=recordings)
    sent = noise(8000, seed=4)

    async def tap() -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{server.ws_url}/tap/int-0001") as ws,
        ):
            await ws.send_bytes(sent)

    asyncio.run(tap())
    sidecar = wait_for_sidecar(recordings, "int-0001.1")  # never over the one being recovered
    assert sidecar["frames_written"] == len(sent)
    samples, _ = read_wav(recordings / "int-0001.1.wav")
    assert np.array_equal(samples, reference.decode("PCMU", sent))
    health = wait_for_health(server, lambda h: h["recovery"]["state"] == "done", "recovery done")
    assert health["recovery"]["recovered"] == 2000
    old = json.loads((recordings / "int-0001.json").read_text())
    assert old["state"] == "finished" and old["recovered"] is True


def _wav_header(frames: int) -> bytes:
    """A 16-bit mono 8 kHz PCM WAV header for `frames` frames."""
    data = frames * 2
    return (
        b"RIFF" + (36 + data).to_bytes(4, "little") + b"WAVEfmt "
        + (16).to_bytes(4, "little") + (1).to_bytes(2, "little") + (1).to_bytes(2, "little")
        + (8000).to_bytes(4, "little") + (16000).to_bytes(4, "little")
        + (2).to_bytes(2, "little") + (16).to_bytes(2, "little")
        + b"data" + data.to_bytes(4, "little")
    )  # fmt: skip
