"""Soak: a mixed, continuous load with a `kill -9` and a restart in the middle, then a checker
that every file is valid and every sample the senders sent is on disk, except around the kill.

    python -m bench.soak --seconds 600                 # 10 minutes, kill -9 half way
    python -m bench.soak --seconds 60 --ws 10 --rtp 10 --keep /tmp/soak

WebSocket taps (raw G.711 and Media Streams JSON) and RTP streams start and end continuously
(`--ws` and `--rtp` of each at once, each lasting `--tap-seconds`), sending deterministic audio in
real time. At `--kill-at` of the run the server gets SIGKILL and is started again on the same
ports and recordings directory; at the end it gets SIGTERM (and must exit 0).

The checker then reads every file back:
* every WAV's header matches its data, every WAV has a sidecar, every sidecar is `finished`
  (taps the kill interrupted: finalized at start-up with `recovered: true`);
* every file is one contiguous piece of what its sender sent, sample for sample;
* every frame sent is on disk unless it was sent in the kill window: frames sent before the kill
  and lost ("lost to the kill") must be at most `flush_interval` + `--in-flight` seconds per tap;
  frames sent while the server was down cannot be recorded (reported, not counted as loss).

Prints a JSON report; exit status 1 if it lists problems.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import soundfile

from bench.net import free_port
from bench.rtp_load import payload_for
from receiver.codecs import g711
from receiver.rtp.packet import RtpPacket

FRAME = 160  # samples (= G.711 bytes) per 20 ms frame
ROOT = Path(__file__).resolve().parent.parent
RTP_SOURCE = "127.0.0.9"  # RTP senders' address: its own, so every stream's name is known


class Server:
    """`python -m receiver` on fixed ports, restartable on the same ports and directory."""

    def __init__(self, recordings: Path, flush_interval: float, extra: list[str]) -> None:
        self.recordings = recordings
        self.http_port = free_port()
        self.rtp_port = free_port()
        self.log_path = recordings.parent / "server.log"
        self.args = [
            sys.executable, "-m", "receiver", "--no-auth", "--host", "127.0.0.1",
            "--http-port", str(self.http_port), "--rtp-port", str(self.rtp_port),
            "--recordings", str(recordings), "--flush-interval", str(flush_interval),
            "--rtp-idle-timeout", "1", "--min-free-space", "1M", *extra,
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self, timeout: float = 20.0) -> float:
        """Start and wait for /healthz; returns the monotonic time it answered."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.args, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}; see {self.log_path}"
                )
            if await self.healthy():
                return time.monotonic()
            await asyncio.sleep(0.02)
        raise RuntimeError(f"server not healthy after {timeout} s; see {self.log_path}")

    async def healthy(self) -> bool:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.http_port)
        except OSError:
            return False
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n")
            return (await reader.read()).startswith(b"HTTP/1.1 200")
        except OSError:
            return False
        finally:
            writer.close()

    def kill9(self) -> float:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        self.proc.wait()
        return killed

    def stop(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -9


@dataclass
class SentTap:
    """What one sender sent: its audio (G.711 bytes, PCMU) and when each frame left."""

    name: str  # the recording's base name (the tap id, or rtp-<ip>-<port>)
    kind: str  # ws-raw, ws-media-streams, rtp
    audio: bytes
    send_times: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def frames_sent(self) -> int:
        return len(self.send_times)


@dataclass
class Load:
    server: Server
    seconds: float
    ws: int
    rtp: int
    tap_seconds: tuple[float, float]
    seed: int
    taps: list[SentTap] = field(default_factory=list)
    counter: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    rtp_ports: itertools.count[int] = field(default_factory=lambda: itertools.count(21000))
    stop_at: float = 0.0


async def paced(count: int, frame_seconds: float = FRAME / 8000) -> AsyncIterator[int]:
    """Yield frame numbers in real time (20 ms apart), never bunching up after a stall."""
    start = time.monotonic()
    for n in range(count):
        delay = start + n * frame_seconds - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        yield n


def media_message(n: int, audio: bytes) -> str:
    payload = base64.b64encode(audio[n * FRAME : (n + 1) * FRAME]).decode()
    media = {"track": "inbound", "chunk": str(n + 1), "timestamp": str(n * 20), "payload": payload}
    return json.dumps({"event": "media", "streamSid": "MZsoak", "media": media})


async def ws_tap(load: Load, session: aiohttp.ClientSession, rng: random.Random) -> None:
    k = next(load.counter)
    kind = "ws-media-streams" if k % 3 == 0 else "ws-raw"
    frames = int(rng.uniform(*load.tap_seconds) * 50)
    tap = SentTap(f"soak-{k}", kind, payload_for(k, frames * FRAME, seed=load.seed))
    url = f"ws://127.0.0.1:{load.server.http_port}/tap/{tap.name}"
    try:
        async with session.ws_connect(url, heartbeat=None) as ws:
            load.taps.append(tap)  # connected: from here on, what it sends counts
            if kind == "ws-media-streams":
                media_format = {"encoding": "audio/x-mulaw", "sampleRate": 8000}
                start = {"streamSid": "MZsoak", "tracks": ["inbound"], "mediaFormat": media_format}
                await ws.send_str(json.dumps({"event": "start", "start": start}))
            async for n in paced(frames):
                if ws.closed:
                    raise ConnectionResetError("closed by the server")
                if kind == "ws-media-streams":
                    await ws.send_str(media_message(n, tap.audio))
                else:
                    await ws.send_bytes(tap.audio[n * FRAME : (n + 1) * FRAME])
                tap.send_times.append(time.monotonic())
            await ws.close()
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        tap.error = f"{type(exc).__name__}: {exc}"
        await asyncio.sleep(0.1)  # the server is down: do not spin


async def rtp_stream(load: Load, rng: random.Random) -> None:
    k = next(load.counter)
    frames = int(rng.uniform(*load.tap_seconds) * 50)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    while True:
        try:
            sock.bind((RTP_SOURCE, next(load.rtp_ports)))
            break
        except OSError:
            continue
    sock.setblocking(False)
    name = f"rtp-{RTP_SOURCE}-{sock.getsockname()[1]}"
    tap = SentTap(name, "rtp", payload_for(k, frames * FRAME, seed=load.seed))
    load.taps.append(tap)
    target = ("127.0.0.1", load.server.rtp_port)
    seq, ts = rng.randrange(1 << 16), rng.randrange(1 << 32)
    try:
        async for n in paced(frames):
            payload = tap.audio[n * FRAME : (n + 1) * FRAME]
            packet = RtpPacket(0, n == 0, (seq + n) & 0xFFFF, (ts + n * FRAME) & 0xFFFFFFFF, k,
                               payload).serialize()  # fmt: skip
            try:
                sock.sendto(packet, target)
            except OSError as exc:  # e.g. ECONNREFUSED from an earlier ICMP while it was down
                tap.error = f"{type(exc).__name__}: {exc}"
                continue
            tap.send_times.append(time.monotonic())
    finally:
        sock.close()


async def keep_running(load: Load, make: Any) -> None:
    """One slot of the load: a new tap as soon as the previous one ends, until the end."""
    while time.monotonic() < load.stop_at:
        await make()


async def run_load(load: Load, kill_at: float) -> dict[str, float]:
    started = await load.server.start()
    load.stop_at = started + load.seconds
    async with aiohttp.ClientSession() as session:
        slots = [
            keep_running(
                load, functools.partial(ws_tap, load, session, random.Random(f"{load.seed}-ws-{n}"))
            )
            for n in range(load.ws)
        ] + [
            keep_running(
                load, functools.partial(rtp_stream, load, random.Random(f"{load.seed}-rtp-{n}"))
            )
            for n in range(load.rtp)
        ]
        tasks = [asyncio.create_task(slot) for slot in slots]
        await asyncio.sleep(load.seconds * kill_at)
        killed = load.server.kill9()
        up = await load.server.start()
        await asyncio.gather(*tasks)
    await asyncio.sleep(2.0)  # RTP streams end after rtp_idle_timeout (1 s)
    code = load.server.stop()
    return {"started": started, "killed": killed, "up": up, "exit_code": code}


# -- the checker ------------------------------------------------------------------------------


def header_problem(path: Path) -> str | None:
    """Why the WAV header does not describe exactly the data in the file (None: it does)."""
    raw = path.read_bytes()
    if len(raw) < 12 or raw[:4] not in (b"RIFF", b"RF64") or raw[8:12] != b"WAVE":
        return f"not a WAV file ({len(raw)} bytes)"
    pos, data_offset, data_size, channels = 12, None, None, None
    while pos + 8 <= len(raw):
        chunk, size = raw[pos : pos + 4], int.from_bytes(raw[pos + 4 : pos + 8], "little")
        if chunk == b"fmt ":
            channels = int.from_bytes(raw[pos + 10 : pos + 12], "little")
        if chunk == b"data":
            data_offset, data_size = pos + 8, size
            break
        pos += 8 + size + (size & 1)
    if data_offset is None or data_size is None or not channels:
        return "no data chunk"
    if raw[:4] == b"RIFF" and int.from_bytes(raw[4:8], "little") != len(raw) - 8:
        return f"RIFF size {int.from_bytes(raw[4:8], 'little')} != {len(raw) - 8}"
    if data_size != len(raw) - data_offset:
        return f"data size {data_size} != {len(raw) - data_offset} bytes of data"
    if data_size % (2 * channels):
        return f"data size {data_size} is not whole frames"
    return None


def recordings_of(directory: Path, name: str) -> list[Path]:
    """`<name>.json`, `<name>.1.json`, ... in order."""
    paths = [directory / f"{name}.json"]
    paths += sorted(
        (p for p in directory.glob(f"{name}.*.json") if p.name[len(name) + 1 : -5].isdigit()),
        key=lambda p: int(p.name[len(name) + 1 : -5]),
    )
    return [p for p in paths if p.exists()]


def locate(samples: np.ndarray, expected: np.ndarray) -> int | None:
    """The frame index where `samples` (a recording) starts within `expected` (what was sent)."""
    if len(samples) == 0:
        return 0
    head = samples[: min(FRAME, len(samples))]
    for frame in range(len(expected) // FRAME):
        start = frame * FRAME
        if np.array_equal(expected[start : start + len(head)], head):
            return frame
    return None


def check(
    directory: Path, taps: list[SentTap], times: dict[str, float], flush_interval: float,
    in_flight: float,
) -> dict[str, Any]:  # fmt: skip
    killed, up = times["killed"], times["up"]
    loss_limit = flush_interval + in_flight
    problems: list[str] = []
    known: set[str] = set()
    lost_to_kill: dict[str, float] = {}
    lost_while_down = 0
    recovered: list[str] = []
    exact = 0
    for tap in taps:
        expected = g711.decode("PCMU", tap.audio)
        covered = np.zeros(len(tap.audio) // FRAME + 1, dtype=bool)
        for sidecar_path in recordings_of(directory, tap.name):
            known.add(sidecar_path.stem)
            sidecar = json.loads(sidecar_path.read_text())
            label = sidecar_path.stem
            if sidecar.get("state") != "finished":
                hint = (
                    " (no crash recovery at start-up?)"
                    if sidecar.get("state") == "recording"
                    else ""
                )
                problems.append(f"{label}: sidecar state {sidecar.get('state')!r}{hint}")
            if sidecar.get("recovered"):
                recovered.append(label)
            wav = sidecar_path.with_suffix(".wav")
            if not wav.exists():
                problems.append(f"{label}: no WAV")
                continue
            samples = soundfile.read(wav, dtype="int16")[0]
            start = locate(samples, expected)
            if start is None:
                problems.append(f"{label}: its audio is not a piece of what {tap.name} sent")
                continue
            begin = start * FRAME
            if not np.array_equal(samples, expected[begin : begin + len(samples)]):
                problems.append(f"{label}: differs from what was sent (from frame {start})")
                continue
            if sidecar.get("frames_written") != len(samples):
                problems.append(f"{label}: sidecar frames_written != {len(samples)}")
            covered[start : start + len(samples) // FRAME] = True
        missing = [n for n in range(tap.frames_sent) if not covered[n]]
        before_kill = [n for n in missing if tap.send_times[n] < killed]
        down = [n for n in missing if killed <= tap.send_times[n] < up + 0.05]
        later = [n for n in missing if tap.send_times[n] >= up + 0.05]
        lost_while_down += len(down)
        if later:
            problems.append(f"{tap.name}: {len(later)} frames sent after the restart are missing")
        if before_kill:
            lost = len(before_kill) * FRAME / 8000
            lost_to_kill[tap.name] = lost
            first = tap.send_times[before_kill[0]]
            if lost > loss_limit or first < killed - loss_limit:
                problems.append(
                    f"{tap.name}: {lost:.2f} s sent before the kill is missing, from "
                    f"{killed - first:.2f} s before it (limit {loss_limit:.2f} s)"
                )
        elif not missing:
            exact += 1
    for wav in directory.glob("*.wav"):
        problem = header_problem(wav)
        if problem is not None:
            problems.append(f"{wav.name}: {problem}")
        if not wav.with_suffix(".json").exists():
            problems.append(f"{wav.name}: no sidecar")
    strays = sorted(p.stem for p in directory.glob("*.json") if p.stem not in known)
    if strays:
        problems.append(f"recordings no sender made: {strays[:10]}")
    losses = sorted(lost_to_kill.values())
    return {
        "taps": len(taps),
        "taps_by_kind": {k: sum(t.kind == k for t in taps) for k in sorted({t.kind for t in taps})},
        "frames_sent": sum(t.frames_sent for t in taps),
        "taps_exact": exact,
        "recovered": len(recovered),
        "down_seconds": round(up - killed, 3),
        "frames_lost_while_down": lost_while_down,
        "taps_losing_audio_to_the_kill": len(losses),
        "lost_to_the_kill_seconds": {
            "max": round(losses[-1], 3) if losses else 0.0,
            "median": round(losses[len(losses) // 2], 3) if losses else 0.0,
            "total": round(sum(losses), 3),
            "limit_per_tap": round(loss_limit, 3),
        },
        "server_exit_code": times["exit_code"],
        "problems": problems + ([] if times["exit_code"] == 0 else ["server did not exit 0"]),
    }


def soak(
    directory: Path, seconds: float, ws: int, rtp: int, tap_seconds: tuple[float, float],
    kill_at: float, flush_interval: float, in_flight: float, seed: int, extra: list[str],
) -> dict[str, Any]:  # fmt: skip
    recordings = directory / "recordings"
    recordings.mkdir(parents=True, exist_ok=True)
    server = Server(recordings, flush_interval, extra)
    load = Load(server, seconds, ws, rtp, tap_seconds, seed)
    times = asyncio.run(run_load(load, kill_at))
    report = check(recordings, load.taps, times, flush_interval, in_flight)
    log = server.log_path.read_text(errors="replace")
    if "Traceback" in log:
        report["problems"].append(f"Traceback in the server log {server.log_path}")
    report["log"] = str(server.log_path)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="length of the load")
    parser.add_argument("--ws", type=int, default=30, help="WebSocket taps at once")
    parser.add_argument("--rtp", type=int, default=30, help="RTP streams at once")
    parser.add_argument("--tap-seconds", type=float, nargs=2, default=(3.0, 20.0))
    parser.add_argument("--kill-at", type=float, default=0.5, help="fraction of the run")
    parser.add_argument("--flush-interval", type=float, default=1.0)
    parser.add_argument(
        "--in-flight", type=float, default=0.3,
        help="seconds of audio a tap may have in sockets and the event loop at the kill",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="directory for recordings and log (kept)")
    parser.add_argument("server_args", nargs="*", help="extra server flags, after --")
    args = parser.parse_args(argv)
    directory = args.keep or Path(tempfile.mkdtemp(prefix="soak-"))
    report = soak(
        directory, args.seconds, args.ws, args.rtp, tuple(args.tap_seconds), args.kill_at,
        args.flush_interval, args.in_flight, args.seed, args.server_args,
    )  # fmt: skip
    json.dump(report, sys.stdout, indent=2)
    print()
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
