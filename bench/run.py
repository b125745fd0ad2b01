"""Benchmark runner: step the load to find the maximum sustainable rate; print a table, write JSON.

    python -m bench.run                 # the full table (about 12 minutes), README "Performance"
    python -m bench.run --quick         # a few streams for a few seconds (the smoke test)
    python -m bench.run --series rtp1 --rtp-steps 3000 --seconds 60    # one point
    python -m bench.run --series sink,opus,g722 --codec-steps 300,600 --seconds 10

The receiver is the real thing (`python -m receiver --no-auth`, a subprocess pinned to core 0 with
taskset), the load comes from separate sender processes pinned to core 1 (bench.rtp_load, which
as root sends whole packets over a raw socket with sendmmsg, a source port per stream; and
bench.ws_load). Before each step the page cache is written back and dropped (as root), so every
step starts from the same memory state (see `drop_page_cache`); each step's recordings are kept
until the run ends (see `Receiver.set_aside`). Per step it measures, over the window in which
every stream is active: receiver CPU (utime+stime from /proc/<pid>/stat, all worker processes),
CPU microseconds per packet, RSS (idle and loaded, per tap), bytes and write calls from
/proc/<pid>/io; after the run: loss from the sidecars (`rtp.received` vs sent, `frames_written`
vs expected), that every WAV has exactly the expected length, and that a sample of them equals
the deterministic payloads sample for sample (decoded with the stdlib's audioop, independent of
the receiver's codec). The same run measures a bare counting uvloop sink (bench.sink) on the
same core, for the ratio to the limit: at each count in both --sink-steps and --rtp-steps, the
sink's step and the receiver's run back to back (`ratio_cpu_cost_by_streams` in the summary).

A step is sustainable when nothing was lost, every WAV is exact and complete, and the senders kept
their pace (otherwise the step is marked sender-limited and the series stops there).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import soundfile

from bench.net import free_port
from bench.rtp_load import CODECS, expected_payload, opus_cycle

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
SEED = 7
PERIOD = 251  # payload repeats every 251 packets (5.02 s): bounded sender memory
SAMPLES_CHECKED = 8
DRAIN_LIMIT = 5.0  # seconds after the last packet by which a codec series' taps must be final


@dataclass
class Row:
    series: str
    workers: int
    streams: int
    seconds: float
    offered_pps: float = 0.0
    sent: int = 0
    received: int = 0
    lost: int = 0
    cpu_percent: float = 0.0
    us_per_packet: float = 0.0
    rss_idle_mib: float = 0.0
    rss_mib: float = 0.0
    rss_per_tap_kib: float = 0.0
    disk_bytes_per_audio_byte: float = 0.0
    writes_per_tap_second: float = 0.0
    taps: int = 0
    wavs_exact: bool = False
    samples_compared: int = 0
    per_worker: dict[str, int] = field(default_factory=dict)
    sender_kept_pace: bool = True
    refused: int = 0  # streams the receiver refused (not recorded at all)
    exact_taps: int = 0  # recordings complete and exact
    page_cache_dropped: bool = False
    sustainable: bool = False
    note: str = ""


def drop_page_cache() -> bool:
    """Write back and drop the page cache before a step (needs root), so each step starts from
    the same memory state: in a VM, page-cache pages the guest has never touched cost the
    writer ~4x more kernel time per 16 KiB write (measured here: ~50 against ~13 µs) than
    reused ones, and the number of untouched pages depends on what ran before."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError:
        return False
    return True


def pinned(cores: str | None, args: list[str]) -> list[str]:
    if cores and shutil.which("taskset") and len(os.sched_getaffinity(0)) > 1:
        return ["taskset", "-c", cores, *args]
    return args


# -- /proc ------------------------------------------------------------------------------------


def family(pid: int) -> list[int]:
    """The process and all its descendants (workers, and each one's disk-writer process)."""
    pids = [pid]
    for parent in pids:  # grows as it goes: breadth first
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        pids += [int(c) for c in children]
    return pids


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except OSError:
            continue
    return total


def io_counters(pids: list[int]) -> dict[str, int]:
    total: dict[str, int] = {}
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/io").read_text().splitlines():
                key, _, value = line.partition(":")
                total[key] = total.get(key, 0) + int(value)
        except OSError:
            continue
    return total


@dataclass
class Window:
    cpu: float
    io: dict[str, int]
    at: float


def sample(pids: list[int]) -> Window:
    return Window(cpu_seconds(pids), io_counters(pids), time.monotonic())


# -- processes --------------------------------------------------------------------------------


class Receiver:
    def __init__(self, workdir: Path, workers: int, cores: str) -> None:
        self.recordings = workdir / "recordings"
        self.http_port = free_port()
        self.rtp_port = free_port()
        self.log = (workdir / "receiver.log").open("ab")
        args = [
            sys.executable, "-m", "receiver", "--host", "127.0.0.1",
            "--http-port", str(self.http_port), "--rtp-port", str(self.rtp_port),
            "--recordings", str(self.recordings), "--no-auth", "--workers", str(workers),
            "--rtp-idle-timeout", "1", "--rtp-max-streams", "100000", "--ws-max-taps", "100000",
            "--min-free-space", "1M", "--ws-heartbeat", "0",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            pinned(cores, args), cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"receiver exited with {self.proc.returncode}")
            if self._healthy() and len(family(self.proc.pid)) >= (workers if workers > 1 else 0):
                return
            time.sleep(0.05)
        raise RuntimeError("receiver did not become healthy")

    def _healthy(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.http_port), timeout=1) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
                return sock.recv(12).startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    def set_aside(self) -> None:
        """Keep the step's recordings until the run ends instead of deleting them now: on ext4
        without a journal, creating files soon after deleting thousands costs ~0.5 ms of kernel
        CPU each (freshly freed inodes are skipped one by one), which would load the next step's
        ramp with an artifact of the benchmark itself."""
        if self.recordings.exists():
            self.recordings.rename(self.recordings.with_name(f"done-{self.http_port}"))

    @property
    def pids(self) -> list[int]:
        return family(self.proc.pid)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = -9
        self.log.close()
        return code


def wait_sidecars(
    directory: Path, pattern: str, count: int, timeout: float
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    sidecars: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        sidecars = []
        for path in directory.glob(pattern):
            try:
                sidecars.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        if len(sidecars) >= count and all(s.get("state") != "recording" for s in sidecars):
            break
        time.sleep(0.25)
    return sidecars


def compare_wav(path: Path, stream: int, packets: int, codec: str) -> bool:
    data, _ = soundfile.read(path, dtype="int16")
    got = bytes(data.astype("<i2").tobytes())
    if codec == "OPUS":
        return got == opus_reference(packets)
    expected = expected_payload(stream, packets, 160, SEED, PERIOD)
    if codec == "G722":  # the ffmpeg CLI's own G.722 decoder, independent of the receiver's
        ffmpeg = ["ffmpeg", "-v", "error", "-f", "g722", "-i", "-", "-f", "s16le", "-"]
        return got == subprocess.run(ffmpeg, input=expected, capture_output=True).stdout
    decode = audioop.ulaw2lin if codec == "PCMU" else audioop.alaw2lin
    return got == decode(expected, 2)


def opus_reference(packets: int) -> bytes:
    """The Opus packets bench.rtp_load sends, decoded by libopus through the binding's own
    per-packet API (the library the receiver uses; the tests compare it with the ffmpeg CLI)."""
    import opuslib_next

    cycle = opus_cycle(min(PERIOD, packets), 20, SEED)
    decoder = opuslib_next.Decoder(48000, 1)
    return b"".join(decoder.decode(cycle[n % len(cycle)], 960) for n in range(packets))


def check_spread(
    recordings: Path,
    sidecars: dict[int, dict[str, Any]],
    count: int,
    packets: int,
    recorded_only: bool = False,
    codec: str = "PCMU",
) -> tuple[int, int]:
    """Compare SAMPLES_CHECKED recordings spread over the `count` senders sample for sample;
    returns (checked, exact). `recorded_only`: spread over the senders that were recorded
    (under overload the others were refused)."""
    checked = exact = 0
    keys = sorted(sidecars) if recorded_only else list(range(count))
    if not keys:
        return 0, 0
    spread = {
        keys[round(k * (len(keys) - 1) / max(1, SAMPLES_CHECKED - 1))]
        for k in range(SAMPLES_CHECKED)
    }
    for index in sorted(spread):
        sidecar = sidecars.get(index)
        checked += 1
        if sidecar is not None and compare_wav(recordings / sidecar["file"], index, packets, codec):
            exact += 1
    return checked, exact


# -- series -----------------------------------------------------------------------------------


def steady_window(start_at: float, ramp: float, seconds: float) -> tuple[float, float]:
    """Wall-clock (time.time) interval in which every stream is sending."""
    return start_at + ramp + 0.3, start_at + seconds - 0.3


def measure_window(
    pids_of: Any, start_at: float, ramp: float, seconds: float
) -> tuple[Window, Window, int]:
    t0, t1 = steady_window(start_at, ramp, seconds)
    time.sleep(max(0.0, t0 - time.time()))
    first = sample(pids_of())
    time.sleep(max(0.0, t1 - time.time()))
    last = sample(pids_of())
    return first, last, rss_bytes(pids_of())


def start_step(
    series: str, workdir: Path, count: int, seconds: float, workers: int, args: argparse.Namespace
) -> tuple[Row, Receiver]:
    """A step's row and its receiver, started on a dropped page cache, with its idle RSS."""
    row = Row(series, workers, count, seconds)
    row.page_cache_dropped = drop_page_cache()
    receiver = Receiver(workdir, workers, args.server_cores if workers == 1 else args.all_cores)
    try:
        time.sleep(0.5)
        row.rss_idle_mib = rss_bytes(receiver.pids) / 2**20
    except BaseException:
        receiver.stop()
        raise
    return row, receiver


def rtp_step(
    workdir: Path,
    streams: int,
    seconds: float,
    workers: int,
    args: argparse.Namespace,
    series: str = "rtp",
    ramp: float | None = None,
    codec: str = "pcmu",
) -> Row:
    """`series` "rtp": streams started over a ramp of 1 000 a second; "burst": all within one
    packet time; "overload": offered more than the receiver sustains, with the same ramp (a
    step succeeds when at least `args.overload_floor` streams are recorded exactly, every other
    stream refused whole, and no recorded stream damaged); "opus", "g722": as "rtp", with
    streams of that codec (`codec`)."""
    row, receiver = start_step(series, workdir, streams, seconds, workers, args)
    frames_per_packet = 20 * CODECS[codec].frames_per_ms
    try:
        if ramp is None:
            ramp = min(streams / 1000, seconds / 3)
        start_at = time.time() + 1.0 + streams / 1500
        # live: the listeners connect first (they find the taps through the API), and the
        # window is measured once they all listen; the streams send that much longer
        settle = 3.0 + streams / 100 if series == "live" else 0.0
        sender = subprocess.Popen(
            pinned(args.load_cores, [
                sys.executable, "-m", "bench.rtp_load", "--port", str(receiver.rtp_port),
                "--streams", str(streams), "--seconds", str(seconds + settle),
                "--seed", str(SEED),
                "--period", str(PERIOD), "--ramp", str(ramp), "--processes", str(args.processes),
                "--start-at", repr(start_at), "--codec", codec,
            ]),
            cwd=ROOT, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        listeners = None
        if series == "live":  # one live listener per tap (bench.live_load), on the load cores
            listeners = subprocess.Popen(
                pinned(args.load_cores, [
                    sys.executable, "-m", "bench.live_load", "--port", str(receiver.http_port),
                    "--taps", str(streams), "--seconds", str(seconds + settle + ramp + 60),
                ]),
                cwd=ROOT, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
        first, last, rss = measure_window(
            lambda: receiver.pids, start_at, ramp + settle, seconds + settle
        )
        out, _ = sender.communicate(timeout=seconds + settle + ramp + 120)
        ended = time.monotonic()
        summary = json.loads(out)
        sidecars = wait_sidecars(receiver.recordings, "rtp-*.json", streams, 60)
        drain = time.monotonic() - ended  # the idle timeout (1 s), then the writer's backlog
    finally:
        code = receiver.stop()
    heard = None
    if listeners is not None:
        heard = json.loads(listeners.communicate(timeout=120)[0])
    packets = int(summary["packets_per_stream"])
    window = last.at - first.at
    row.offered_pps = round(streams * 1000 / 20, 1)
    row.sent = int(summary["packets_sent"])
    row.received = sum(int(s.get("rtp", {}).get("received", 0)) for s in sidecars)
    gaps = sum(
        int(s.get("rtp", {}).get("lost", 0)) + int(s.get("rtp", {}).get("late", 0))
        for s in sidecars
    )
    row.lost = row.sent - row.received
    _cpu_and_io(row, first, last, rss, streams * 50 * window, streams, frames_per_packet * 50)
    row.taps = len(sidecars)
    complete = [
        s
        for s in sidecars
        if s.get("state") == "finished" and s.get("frames_written") == packets * frames_per_packet
    ]
    by_stream = {
        int(s["rtp"]["ssrcs"][0], 16) - 0x10000000: s
        for s in complete
        if s.get("rtp", {}).get("ssrcs")
    }
    row.per_worker = _per_worker(sidecars)
    checked, exact = check_spread(
        receiver.recordings, by_stream, streams, packets,
        recorded_only=series == "overload" or len(by_stream) < streams, codec=codec.upper(),
    )  # fmt: skip
    row.samples_compared = checked
    row.wavs_exact = len(complete) == streams == row.taps and exact == checked
    row.sender_kept_pace = float(summary["seconds"]) <= (seconds + settle + ramp) * 1.02 + 0.1
    row.exact_taps = len(complete) if checked == exact else 0
    row.refused = streams - row.taps
    row.sustainable = (
        row.lost == 0 and gaps == 0 and row.wavs_exact and row.sender_kept_pace and code == 0
    )
    if series == "overload":
        # Refused streams send packets that are never recorded: loss is counted per recording.
        damaged = row.taps - len(complete)
        row.lost = sum(packets - int(s.get("rtp", {}).get("received", 0)) for s in sidecars)
        row.wavs_exact = damaged == 0 and exact == checked
        row.sustainable = row.wavs_exact and row.exact_taps >= args.overload_floor and code == 0
    notes = []
    if series in ("opus", "g722") and drain > DRAIN_LIMIT:  # decoding fell behind real time
        row.sustainable = False
        notes.append(f"receiver behind (finished {drain:.1f} s after the last packet)")
    if row.refused:
        notes.append(f"{row.refused} refused, {row.exact_taps} recorded exactly")
    if gaps:
        notes.append(f"{gaps} lost/late in timelines")
    if not row.sender_kept_pace:
        notes.append(f"sender-limited ({summary['seconds']} s for {seconds + settle + ramp:.1f} s)")
    if code != 0:
        notes.append(f"receiver exit {code}")
    if heard is not None:
        heard_share = heard["bytes"] / (streams * packets * 160 * 2)
        notes.append(
            f"{heard['listeners']} live listeners (connected within "
            f"{heard['connected_within_seconds']} s), {heard_share:.3f} of the audio heard, "
            f"{heard.get('gap', 0)} gaps, {heard.get('end', 0)} ends"
        )
        row.sustainable = row.sustainable and heard["listeners"] == streams
    row.note = "; ".join(notes)
    receiver.set_aside()
    return row


def ws_step(
    workdir: Path, taps: int, seconds: float, workers: int, args: argparse.Namespace
) -> Row:
    row, receiver = start_step("ws", workdir, taps, seconds, workers, args)
    try:
        started = time.time()
        sender = subprocess.Popen(
            pinned(args.load_cores, [
                sys.executable, "-m", "bench.ws_load", "--url", f"ws://127.0.0.1:{receiver.http_port}",
                "--taps", str(taps), "--seconds", str(seconds), "--seed", str(SEED),
                "--period", str(PERIOD),
            ]),
            cwd=ROOT, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        # The sending starts once every connection is open (ws_load opens 500 per second).
        start_at = started + 1.0 + taps / 500
        first, last, rss = measure_window(lambda: receiver.pids, start_at, 0.5, seconds)
        out, _ = sender.communicate(timeout=seconds + taps / 100 + 120)
        ended = time.monotonic()
        summary = json.loads(out)
        sidecars = wait_sidecars(receiver.recordings, "ws-bench-*.json", taps, 15)
        drain = time.monotonic() - ended
    finally:
        code = receiver.stop()
    frames = int(summary["frames_per_tap"])
    window = last.at - first.at
    row.offered_pps = taps * 50.0
    row.sent = int(summary["frames_sent"])
    row.received = sum(int(s.get("frames_written", 0)) // 160 for s in sidecars)
    row.lost = row.sent - row.received
    _cpu_and_io(row, first, last, rss, taps * 50 * window, taps)
    row.taps = len(sidecars)
    complete = [
        s
        for s in sidecars
        if s.get("state") == "finished" and s.get("frames_written") == frames * 160
    ]
    by_tap = {int(s["tap_id"].rsplit("-", 1)[1]): s for s in complete}
    row.per_worker = _per_worker(sidecars)
    checked, exact = check_spread(receiver.recordings, by_tap, taps, frames)
    row.samples_compared = checked
    row.wavs_exact = len(complete) == taps == row.taps and exact == checked
    row.sender_kept_pace = (
        float(summary["worst_lag_ms"]) < 500 and int(summary["failed_connects"]) == 0
    )
    kept_up = drain < 5 and int(summary["max_write_backlog"]) < 64 * 1024
    row.sustainable = (
        row.lost == 0 and row.wavs_exact and row.sender_kept_pace and kept_up and code == 0
    )
    notes = []
    if not kept_up:
        notes.append(
            f"receiver behind (drain {drain:.1f} s, backlog {summary['max_write_backlog']} B)"
        )
    if not row.sender_kept_pace:
        notes.append(
            f"sender lag {summary['worst_lag_ms']} ms, {summary['failed_connects']} failed connects"
        )
    if code != 0:
        notes.append(f"receiver exit {code}")
    row.note = "; ".join(notes)
    receiver.set_aside()
    return row


def sink_step(workdir: Path, streams: int, seconds: float, args: argparse.Namespace) -> Row:
    row = Row("sink", 1, streams, seconds)
    row.page_cache_dropped = drop_page_cache()
    port = free_port()
    sink = subprocess.Popen(
        pinned(args.server_cores, [sys.executable, "-m", "bench.sink", "--port", str(port)]),
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert sink.stdout is not None
    sink.stdout.readline()  # {"ready": port}
    row.rss_idle_mib = rss_bytes([sink.pid]) / 2**20
    ramp = min(streams / 1000, seconds / 3)
    start_at = time.time() + 1.0 + streams / 1500
    sender = subprocess.Popen(
        pinned(args.load_cores, [
            sys.executable, "-m", "bench.rtp_load", "--port", str(port), "--streams", str(streams),
            "--seconds", str(seconds), "--seed", str(SEED), "--period", str(PERIOD),
            "--ramp", str(ramp), "--processes", str(args.processes), "--start-at", repr(start_at),
        ]),
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    first, last, rss = measure_window(lambda: [sink.pid], start_at, ramp, seconds)
    out, _ = sender.communicate(timeout=seconds + ramp + 120)
    summary = json.loads(out)
    time.sleep(0.3)
    sink.send_signal(signal.SIGTERM)
    counted, _ = sink.communicate(timeout=10)
    row.offered_pps = streams * 50.0
    row.sent = int(summary["packets_sent"])
    row.received = int(json.loads(counted.strip().splitlines()[-1])["datagrams"])
    row.lost = row.sent - row.received
    _cpu_and_io(row, first, last, rss, streams * 50 * (last.at - first.at), streams)
    row.sender_kept_pace = float(summary["seconds"]) <= (seconds + ramp) * 1.02 + 0.1
    row.wavs_exact = True
    row.sustainable = row.lost <= row.sent * 0.0 and row.sender_kept_pace
    if not row.sender_kept_pace:
        row.note = f"sender-limited ({summary['seconds']} s for {seconds + ramp:.1f} s)"
    return row


def _cpu_and_io(
    row: Row, first: Window, last: Window, rss: int, packets: float, taps: int, rate: int = 8000
) -> None:
    window = max(1e-6, last.at - first.at)
    cpu = last.cpu - first.cpu
    row.cpu_percent = round(100 * cpu / window, 1)
    row.us_per_packet = round(cpu * 1e6 / max(1.0, packets), 2)
    row.rss_mib = round(rss / 2**20, 1)
    row.rss_per_tap_kib = round((rss - row.rss_idle_mib * 2**20) / 1024 / max(1, taps), 1)
    row.rss_idle_mib = round(row.rss_idle_mib, 1)
    # write_bytes: what reached the storage layer. (wchar would count the pipe that carries the
    # audio to the disk-writer process as well.)
    written = last.io.get("write_bytes", 0) - first.io.get("write_bytes", 0)
    calls = last.io.get("syscw", 0) - first.io.get("syscw", 0)
    audio = taps * 2 * rate * window  # PCM 16-bit at the WAV's audio rate
    row.disk_bytes_per_audio_byte = round(written / audio, 3) if row.series != "sink" else 0.0
    row.writes_per_tap_second = round(calls / taps / window, 2) if row.series != "sink" else 0.0


def _per_worker(sidecars: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in sidecars:
        key = str(s.get("worker", "-"))
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


# -- output -----------------------------------------------------------------------------------

HEADER = (
    "| series | workers | streams | packets/s | sent | lost | CPU % | µs/packet | RSS MiB "
    "| RSS/tap KiB | disk B/audio B | writes/tap/s | WAVs exact | sustainable |"
)


def table(rows: list[Row]) -> str:
    lines = [HEADER, "|" + "---|" * 14]
    for r in rows:
        label = {
            "rtp": "RTP",
            "opus": "RTP Opus 20 ms",
            "g722": "RTP G.722",
            "burst": "RTP, all start at once",
            "overload": "RTP, 2x offered",
            "ws": "WebSocket",
            "sink": "bare uvloop sink",
            "live": "RTP, a live listener per tap",
        }[r.series]
        lines.append(
            f"| {label} | {r.workers} | {r.streams} | {r.offered_pps:,.0f} | {r.sent:,} "
            f"| {r.lost:,} "
            f"| {r.cpu_percent} | {r.us_per_packet} | {r.rss_mib} | "
            f"{r.rss_per_tap_kib if r.series != 'sink' else '-'} "
            f"| {r.disk_bytes_per_audio_byte if r.series != 'sink' else '-'} "
            f"| {r.writes_per_tap_second if r.series != 'sink' else '-'} "
            f"| {('yes' if r.wavs_exact else 'NO') if r.series != 'sink' else '-'} "
            f"| {'yes' if r.sustainable else 'no'}{' (' + r.note + ')' if r.note else ''} |"
        )
    return "\n".join(lines)


def counts(steps: str) -> list[int]:
    return [int(s) for s in steps.split(",") if s.strip()]


def grouped(rows: list[Row]) -> list[Row]:
    """The rows of each series together, series in the order they first ran."""
    first: dict[tuple[str, int], int] = {}
    for i, r in enumerate(rows):
        first.setdefault((r.series, r.workers), i)
    return sorted(rows, key=lambda r: first[(r.series, r.workers)])


def best(rows: list[Row], series: str, workers: int) -> Row | None:
    good = [r for r in rows if r.series == series and r.workers == workers and r.sustainable]
    return max(good, key=lambda r: r.streams) if good else None


def summarize(rows: list[Row]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for series, workers, key in (("rtp", 1, "rtp_1_worker"), ("rtp", 2, "rtp_2_workers"),
                                 ("ws", 1, "ws_1_worker"), ("sink", 1, "sink"),
                                 ("opus", 1, "opus_1_worker"),
                                 ("g722", 1, "g722_1_worker")):  # fmt: skip
        row = best(rows, series, workers)
        if row is not None:
            limited = any(
                r.series == series and r.workers == workers and not r.sender_kept_pace for r in rows
            )
            out[key] = {
                "max_streams": row.streams,
                "packets_per_second": row.offered_pps,
                "us_per_packet": row.us_per_packet,
                "bounded_by_sender": limited,
            }
    rtp, sink = out.get("rtp_1_worker"), out.get("sink")
    if rtp and sink:
        out["ratio_max_rate_receiver_to_sink"] = round(
            rtp["packets_per_second"] / sink["packets_per_second"], 3
        )
        # CPU per packet falls as the rate rises (per-batch costs spread wider): compare the two
        # at the same rate and length of step: the receiver's best, if the sink ran it too, else
        # the sink's best, if the receiver sustained it.
        sink_row, receiver = best(rows, "sink", 1), best(rows, "rtp", 1)
        assert sink_row is not None and receiver is not None
        same = {
            (r.series, r.streams, r.seconds): r for r in rows if r.workers == 1 and r.sustainable
        }
        if ("sink", receiver.streams, receiver.seconds) in same:
            sink_row = same[("sink", receiver.streams, receiver.seconds)]
        elif ("rtp", sink_row.streams, sink_row.seconds) in same:
            receiver = same[("rtp", sink_row.streams, sink_row.seconds)]
        out["ratio_cpu_cost_sink_to_receiver"] = round(
            sink_row.us_per_packet / receiver.us_per_packet, 3
        )
        out["ratio_cpu_cost_at_streams"] = receiver.streams
        # At every count both ran (back to back, see main)
        by_count = {
            str(n): round(same[("sink", n, t)].us_per_packet / r.us_per_packet, 3)
            for (kind, n, t), r in same.items()
            if kind == "rtp" and ("sink", n, t) in same and r.us_per_packet
        }
        if by_count:
            out["ratio_cpu_cost_by_streams"] = by_count
    sinks = {r.streams: r for r in rows if r.series == "sink" and r.sustainable}
    for codec in ("opus", "g722"):  # CPU per packet against the bare sink at the same count
        same_count = [r for r in rows if r.series == codec and r.sustainable and r.streams in sinks]
        if same_count:
            row = max(same_count, key=lambda r: r.streams)
            out[f"ratio_cpu_cost_sink_to_{codec}"] = round(
                sinks[row.streams].us_per_packet / row.us_per_packet, 3
            )
            out[f"ratio_cpu_cost_sink_to_{codec}_at_streams"] = row.streams
    # Live listeners: the receiver's CPU per packet with one listener per tap, against the same
    # step recorded alone.
    alone = {(r.streams, r.seconds): r for r in rows if r.series == "rtp" and r.workers == 1}
    for r in rows:
        match = alone.get((r.streams, r.seconds))
        if r.series == "live" and match is not None and match.us_per_packet:
            out.setdefault("live_cpu_ratio", {})[r.streams] = round(
                r.us_per_packet / match.us_per_packet, 3
            )
    burst = best(rows, "burst", 1)
    if burst is not None:
        out["burst_streams_exact"] = burst.streams
    overload = [r for r in rows if r.series == "overload"]
    if overload:
        out["overload"] = {
            "offered": overload[-1].streams,
            "recorded_exactly": overload[-1].exact_taps,
            "refused": overload[-1].refused,
            "damaged": overload[-1].taps - overload[-1].exact_taps,
        }
    if out.get("rtp_2_workers") and rtp:
        out["scaling_2_workers"] = round(
            out["rtp_2_workers"]["packets_per_second"] / rtp["packets_per_second"], 2
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few streams for a few seconds")
    parser.add_argument("--series", default="sink,rtp1,burst,overload,hold,rtp2,ws",
                        help="comma-separated: sink, rtp1, burst, overload, hold, rtp2, ws, "
                             "opus, g722, live (rtp1 with one live listener per tap) (these "
                             "three not in the default run); "
                             "burst and overload use the largest count rtp1 sustained (or "
                             "--burst-streams)")  # fmt: skip
    parser.add_argument(
        "--burst-streams",
        type=int,
        default=0,
        help="N for burst (N at once) and overload (2N offered); 0: from rtp1",
    )
    parser.add_argument("--rtp-steps", default="1000,1500,2000,2500,3000,3500,4000")
    parser.add_argument("--sink-steps", default="1000,1500,2000,3000")
    parser.add_argument("--codec-steps", default="300,600,900,1200",
                        help="streams of the opus and g722 series")  # fmt: skip
    parser.add_argument("--ws-steps", default="500,1000,1500,2000")
    parser.add_argument("--live-steps", default="", help="for the live series; default rtp-steps")
    parser.add_argument("--seconds", type=float, default=15.0, help="per step")
    parser.add_argument(
        "--hold-streams",
        type=int,
        default=0,
        help="streams of the hold series; 0: the largest count rtp1 sustained",
    )
    parser.add_argument("--hold-seconds", type=float, default=60.0)
    parser.add_argument("--processes", type=int, default=2, help="RTP sender processes")
    parser.add_argument("--server-cores", default="0")
    parser.add_argument("--load-cores", default="1")
    parser.add_argument("--all-cores", default="0,1", help="cores of a multi-worker receiver")
    parser.add_argument("--budget", type=float, default=1300.0, help="seconds; later steps skipped")
    parser.add_argument("--output", default=None, help="JSON path (default bench/results/...)")
    parser.add_argument("--label", default="")
    args = parser.parse_args(argv)
    if args.quick:
        args.rtp_steps, args.sink_steps, args.ws_steps = "20,40", "20,40", "20"
        args.codec_steps = "40"
        args.seconds, args.hold_seconds = 2.0, 0.0
        args.processes = 2
        if args.series == parser.get_default("series"):
            args.series = "sink,rtp1,burst,overload,ws"
    series = [s.strip() for s in args.series.split(",") if s.strip()]
    started = time.monotonic()
    rows: list[Row] = []
    workdir = Path(tempfile.mkdtemp(prefix="tap-bench-"))

    def over_budget() -> bool:
        return bool(time.monotonic() - started > args.budget)

    def step(run_step: Callable[[int], Row], count: int) -> bool:
        """One step; False if it was not sustainable."""
        row = run_step(count)
        rows.append(row)
        print(table([row]).splitlines()[-1], flush=True)
        return row.sustainable

    def budget_left() -> bool:
        if over_budget():
            print(f"(budget of {args.budget:.0f} s reached: skipping the rest)", flush=True)
            return False
        return True

    def stepped(run_step: Callable[[int], Row], steps: str) -> None:
        for count in counts(steps):
            if not budget_left() or not step(run_step, count):
                return

    def sink(n: int) -> Row:
        return sink_step(workdir, n, args.seconds, args)

    def rtp1(n: int) -> Row:
        return rtp_step(workdir, n, args.seconds, 1, args)

    def codec_step(codec: str, n: int) -> Row:
        return rtp_step(workdir, n, args.seconds, 1, args, codec, codec=codec)

    # The sink and the receiver at the same count run back to back: this VM's speed drifts over
    # minutes, and the ratio compares the two.
    if "sink" in series and "rtp1" in series:
        series = [s for s in series if s != "sink"]
        series[series.index("rtp1")] = "sink+rtp1"
    print(HEADER, flush=True)
    try:
        for name in series:
            if name == "sink":
                stepped(sink, args.sink_steps)
            elif name == "rtp1":
                stepped(rtp1, args.rtp_steps)
            elif name == "sink+rtp1":
                sink_counts, rtp_counts = counts(args.sink_steps), counts(args.rtp_steps)
                going = {"sink": True, "rtp": True}
                # The receiver's steps in the order given, each after the sink's at that count
                for n in rtp_counts + [c for c in sink_counts if c not in rtp_counts]:
                    if not budget_left():
                        break
                    if n in sink_counts and going["sink"]:
                        going["sink"] = step(sink, n)
                    if n in rtp_counts and going["rtp"]:
                        going["rtp"] = step(rtp1, n)
            elif name == "live":
                steps = args.live_steps or args.rtp_steps
                stepped(lambda n: rtp_step(workdir, n, args.seconds, 1, args, "live"), steps)
            elif name == "rtp2":
                stepped(lambda n: rtp_step(workdir, n, args.seconds, 2, args), args.rtp_steps)
            elif name == "ws":
                stepped(lambda n: ws_step(workdir, n, args.seconds, 1, args), args.ws_steps)
            elif name in ("opus", "g722"):
                stepped(partial(codec_step, name), args.codec_steps)
            elif name in ("burst", "overload"):
                sustained = best(rows, "rtp", 1)
                n = args.burst_streams or (sustained.streams if sustained else 0)
                if not n or over_budget():
                    continue
                args.overload_floor = n
                if name == "burst":
                    row = rtp_step(workdir, n, args.seconds, 1, args, "burst", ramp=0.0)
                else:
                    row = rtp_step(workdir, 2 * n, args.seconds, 1, args, "overload")
                rows.append(row)
                print(table([row]).splitlines()[-1], flush=True)
            elif name == "hold" and args.hold_seconds:
                sustained = best(rows, "rtp", 1)
                hold = args.hold_streams or (sustained.streams if sustained else 0)
                if hold and not over_budget():
                    row = rtp_step(workdir, hold, args.hold_seconds, 1, args)
                    rows.append(row)
                    print(table([row]).splitlines()[-1], flush=True)
            else:
                raise SystemExit(f"unknown series {name!r}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = summarize(rows)
    print()
    print(table(grouped(rows)))
    print()
    print(json.dumps(summary, indent=2))
    result = {
        "label": args.label,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "cpus": os.cpu_count(),
        "seconds_total": round(time.monotonic() - started, 1),
        "summary": summary,
        "rows": [asdict(r) for r in rows],
    }
    path = Path(args.output) if args.output else RESULTS / time.strftime("%Y%m%d-%H%M%S.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path} ({result['seconds_total']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
