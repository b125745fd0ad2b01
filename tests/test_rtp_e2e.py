"""RTP taps end to end: real senders (ffmpeg, GStreamer, our own sockets) -> real server -> WAV."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.rtp_load import RAW_BASE_PORT, payload_for, raw_socket
from receiver.rtp.packet import RtpPacket, TelephoneEvent
from tests import reference
from tests.helpers import (
    ROOT,
    ServerProcess,
    assert_header_matches_data,
    missing,
    noise,
    read_wav,
    require_tool,
    wait_for_health,
    wait_for_live_frames,
    wait_for_sidecar,
    wait_until,
)

IDLE = "0.5"


@pytest.fixture
def rtp_server(make_server: Any) -> ServerProcess:
    server: ServerProcess = make_server("--no-auth", "--rtp-idle-timeout", IDLE)
    return server


def tap_name(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"rtp-{host}-{port}"


def sender() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def packet(seq: int, ts: int, payload: bytes, pt: int = 0, ssrc: int = 0xABCD, **kw: Any) -> bytes:
    return RtpPacket(pt, kw.pop("marker", False), seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc, payload,
                     **kw).serialize()  # fmt: skip


def finished_recording(server: ServerProcess, name: str) -> tuple[np.ndarray, dict[str, Any]]:
    sidecar = wait_for_sidecar(server.recordings, name)
    wav = server.recordings / f"{name}.wav"
    samples, rate = read_wav(wav)
    assert rate == 8000
    assert assert_header_matches_data(wav) == len(samples) == sidecar["frames_written"]
    return samples, sidecar


def only_rtp_recording(server: ServerProcess) -> str:
    names = wait_until(
        lambda: [p.stem for p in server.recordings.glob("rtp-*.json")], "an RTP recording"
    )
    assert len(names) == 1, names
    return names[0]


def finished_sidecars(server: ServerProcess, count: int) -> list[dict[str, Any]]:
    """Wait until `count` RTP recordings are finished; return their sidecars."""

    def finished() -> list[dict[str, Any]]:
        sidecars = []
        for path in server.recordings.glob("rtp-*.json"):
            try:
                sidecars.append(json.loads(path.read_text()))
            except ValueError:  # being replaced right now
                return []
        done = [s for s in sidecars if s["state"] == "finished"]
        return sidecars if len(done) == len(sidecars) >= count else []

    return wait_until(finished, f"{count} finished RTP recordings")


@pytest.mark.parametrize(("codec", "ffmpeg_format"), [("PCMU", "mulaw"), ("PCMA", "alaw")])
def test_ffmpeg_sender_is_recorded_exactly(
    rtp_server: ServerProcess, tmp_path: Path, codec: str, ffmpeg_format: str
) -> None:
    ffmpeg = require_tool("ffmpeg")
    sent = noise(8000 * 2 + 123, seed=1)  # 2 s and a partial packet
    source = tmp_path / "in.raw"
    source.write_bytes(sent)
    subprocess.run(
        [ffmpeg, "-v", "error", "-re", "-f", ffmpeg_format, "-ar", "8000", "-ac", "1",
         "-i", str(source), "-c:a", "copy", "-f", "rtp",
         f"rtp://127.0.0.1:{rtp_server.rtp_port}"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    samples, sidecar = finished_recording(rtp_server, only_rtp_recording(rtp_server))
    expected = reference.decode(codec, sent)
    assert len(samples) == len(expected)
    assert np.array_equal(samples, expected)
    assert sidecar["transport"] == "rtp" and sidecar["codec"] == codec
    rtp = sidecar["rtp"]
    assert rtp["lost"] == rtp["late"] == rtp["duplicate"] == rtp["malformed"] == 0
    assert rtp["payload_types"] == [0 if codec == "PCMU" else 8]
    assert len(rtp["ssrcs"]) == 1


@pytest.mark.parametrize(
    ("codec", "payloader", "ptime_ns"),
    [
        ("PCMU", "rtppcmupay", None),
        ("PCMA", "rtppcmapay", 20_000_000),
        ("PCMU", "rtppcmupay", 10_000_000),
    ],
)
def test_gstreamer_sender_is_recorded_exactly(
    rtp_server: ServerProcess, tmp_path: Path, codec: str, payloader: str, ptime_ns: int | None
) -> None:
    gst = require_tool("gst-launch-1.0")
    sent = noise(8000 * 2, seed=2)
    source = tmp_path / "in.raw"
    source.write_bytes(sent)
    pay = [payloader] + ([f"min-ptime={ptime_ns}", f"max-ptime={ptime_ns}"] if ptime_ns else [])
    fmt = "mulaw" if codec == "PCMU" else "alaw"
    subprocess.run(
        [gst, "-q", "filesrc", f"location={source}", "!", "rawaudioparse", f"format={fmt}",
         "sample-rate=8000", "num-channels=1", "!", *pay, "!", "udpsink", "host=127.0.0.1",
         f"port={rtp_server.rtp_port}"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    samples, sidecar = finished_recording(rtp_server, only_rtp_recording(rtp_server))
    assert np.array_equal(samples, reference.decode(codec, sent))
    assert sidecar["rtp"]["lost"] == 0
    if ptime_ns:
        assert sidecar["rtp"]["received"] == len(sent) // (ptime_ns // 125_000)


def test_loss_reorder_duplicates_over_real_udp(rtp_server: ServerProcess) -> None:
    """Sample n of the WAV is sample n of the sender's timeline, whatever the network did."""
    sock = sender()
    audio = noise(160 * 20, seed=3)
    chunks = [audio[i * 160 : (i + 1) * 160] for i in range(20)]
    base_seq, base_ts = 65530, 0xFFFFFF00  # both wrap during the call
    order = [0, 1, 2, 4, 3, 5, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]  # 7 lost
    for n in order:
        sock.sendto(
            packet(base_seq + n, base_ts + 160 * n, chunks[n]), ("127.0.0.1", rtp_server.rtp_port)
        )
        time.sleep(0.005)  # pacing: the sender spreads its packets out
    name = tap_name(sock)
    samples, sidecar = finished_recording(rtp_server, name)
    expected = reference.decode("PCMU", audio).copy()
    expected[7 * 160 : 8 * 160] = 0  # the lost packet is silence of exactly its length
    assert len(samples) == 20 * 160
    assert np.array_equal(samples, expected)
    rtp = sidecar["rtp"]
    assert (rtp["lost"], rtp["duplicate"], rtp["reordered"]) == (1, 1, 1)
    assert rtp["first_timestamp"] == base_ts
    assert rtp["last_timestamp"] == (base_ts + 160 * 19) & 0xFFFFFFFF


def test_a_gap_is_given_up_after_the_jitter_window_while_the_sender_pauses(
    make_server: Any,
) -> None:
    """Packets held behind a gap are released once the jitter window (200 ms) has passed, even
    when no further packet arrives to trigger it; afterwards the stream goes on in order."""
    # the idle timeout is far away: only the jitter window can release the held packets
    server: ServerProcess = make_server("--no-auth", "--rtp-idle-timeout", "60")
    sock = sender()
    audio = noise(160 * 12, seed=5)
    chunks = [audio[i * 160 : (i + 1) * 160] for i in range(12)]

    def send(numbers: list[int]) -> None:
        for n in numbers:
            sock.sendto(packet(n, 160 * n, chunks[n]), ("127.0.0.1", server.rtp_port))
            time.sleep(0.005)  # pacing: the sender spreads its packets out

    send([0, 1, 2, 3, 4, 6, 7])  # 5 lost: 6 and 7 wait behind it
    name = tap_name(sock)
    # released, with 5 as silence, while the stream goes on (nothing else comes to trigger it)
    live = wait_for_live_frames(server, name, 8 * 160)
    assert (live["rtp"]["lost"], live["rtp"]["received"]) == (1, 7)
    send(list(range(8, 12)))
    live = wait_for_live_frames(server, name, 12 * 160)
    assert live["rtp"]["received"] == 11
    assert server.stop() == 0
    samples, sidecar = finished_recording(server, name)
    expected = reference.decode("PCMU", audio).copy()
    expected[5 * 160 : 6 * 160] = 0
    assert np.array_equal(samples, expected)
    assert (sidecar["rtp"]["lost"], sidecar["rtp"]["received"]) == (1, 11)


def test_a_packet_that_came_just_in_time_fills_its_gap(make_server: Any) -> None:
    """The jitter window is measured against what has been read, not against the clock: a
    packet that reaches the socket just before its gap's deadline fills the gap, even when the
    sockets are next read after that deadline (they are read every 20 ms; held packets are
    released after a read, by the time up to which everything was read). Several streams,
    their deadlines spread over a read interval; each sends its missing packet 10 ms before the
    deadline. Nothing is lost."""
    window, streams = 0.3, 6
    server: ServerProcess = make_server(
        "--no-auth", "--rtp-idle-timeout", "60", "--rtp-jitter-ms", str(int(window * 1000))
    )
    socks = [sender() for _ in range(streams)]
    audio = [noise(160 * 8, seed=30 + k) for k in range(streams)]
    dest = ("127.0.0.1", server.rtp_port)

    def send(k: int, n: int) -> None:
        socks[k].sendto(packet(n, 160 * n, audio[k][n * 160 : (n + 1) * 160]), dest)

    sent_3 = []
    for k in range(streams):
        for n in (0, 1, 3):  # 3 is held behind the gap at 2 until the window has passed
            send(k, n)
        sent_3.append(time.monotonic())
        time.sleep(0.007)  # pacing: the deadlines fall at different points of a read interval
    in_time = []
    for k in range(streams):
        # pacing: the missing packet goes 10 ms before the deadline (the window after 3 arrived)
        time.sleep(max(0.0, sent_3[k] + window - 0.010 - time.monotonic()))
        send(k, 2)
        if time.monotonic() < sent_3[k] + window:  # it reached the socket before the deadline
            in_time.append(k)
    for k in range(streams):
        for n in range(4, 8):
            send(k, n)
    assert len(in_time) >= 2, "this machine was too slow to send in time: nothing was tested"
    for k in in_time:
        live = wait_for_live_frames(server, tap_name(socks[k]), 8 * 160)
        assert (live["rtp"]["lost"], live["rtp"]["late"], live["rtp"]["received"]) == (0, 0, 8)
    assert server.stop() == 0
    for k in in_time:
        samples, sidecar = finished_recording(server, tap_name(socks[k]))
        assert np.array_equal(samples, reference.decode("PCMU", audio[k]))
        assert (sidecar["rtp"]["lost"], sidecar["rtp"]["late"]) == (0, 0)


def test_a_stall_of_the_receiver_does_not_split_calls(make_server: Any) -> None:
    """The server process is stopped for 2 s (4x the idle timeout) while 300 calls go on sending.
    When it resumes, tens of thousands of their packets are still queued in the socket buffer,
    and working through them takes several receive ticks: no call may be taken for idle
    meanwhile (their last handled packets look old). Each call stays one complete recording."""
    server: ServerProcess = make_server("--no-auth", "--rtp-idle-timeout", "0.5")
    assert server.proc is not None
    streams, seconds = 300, 6
    start_at = time.time() + 1.5  # the sender's own schedule: every call starts then
    load = subprocess.Popen(
        [sys.executable, "-m", "bench.rtp_load", "--port", str(server.rtp_port),
         "--streams", str(streams), "--seconds", str(seconds), "--seed", "4",
         "--sender", "sockets", "--start-at", repr(start_at)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for_health(server, lambda h: h["rtp"]["active_streams"] == streams, "every call under way")
    server.proc.send_signal(signal.SIGSTOP)
    # The stimulus, not a wait: the server stays frozen for 2 s of wall time (4x the idle
    # timeout) while the calls go on. A stopped process has no state to wait on.
    time.sleep(2.0)
    server.proc.send_signal(signal.SIGCONT)
    assert load.poll() is None, "the calls ended before the stall was over: nothing was tested"
    out, _ = load.communicate(timeout=60)
    assert json.loads(out)["packets_sent"] == streams * seconds * 50
    sidecars = finished_sidecars(server, streams)
    assert len(sidecars) == streams, f"{len(sidecars) - streams} calls split by the stall"
    for sidecar in sidecars:
        assert sidecar["frames_written"] == seconds * 8000  # what the kernel dropped is silence
        rtp = sidecar["rtp"]
        assert rtp["received"] + rtp["lost"] == seconds * 50


def test_a_stream_whose_first_packets_waited_in_the_socket_is_recorded_whole(
    make_server: Any,
) -> None:
    """A burst of new streams can keep the receiver from reading for a while: a stream's first
    packets then wait in the socket and its tap begins after them. That audio came in real time
    (its first packet's arrival is the tap's start), so none of it is dropped as running ahead
    of the wall clock. Here the server is stopped while a call's first 1.5 s arrive."""
    server: ServerProcess = make_server("--no-auth", "--rtp-idle-timeout", IDLE)
    assert server.proc is not None
    seconds, seed = 3, 9
    start_at = time.time() + 1.0
    load = subprocess.Popen(
        [sys.executable, "-m", "bench.rtp_load", "--port", str(server.rtp_port),
         "--streams", "1", "--seconds", str(seconds), "--seed", str(seed),
         "--sender", "sockets", "--start-at", repr(start_at)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    server.proc.send_signal(signal.SIGSTOP)
    # The stimulus, not a wait: frozen from before the call's first packet until 1.5 s into it.
    time.sleep(max(0.0, start_at + 1.5 - time.time()))
    server.proc.send_signal(signal.SIGCONT)
    assert load.poll() is None, "the call ended before the server resumed: nothing was tested"
    out, _ = load.communicate(timeout=60)
    assert json.loads(out)["packets_sent"] == seconds * 50
    (sidecar,) = finished_sidecars(server, 1)
    assert sidecar["rtp"]["received"] == seconds * 50
    assert sidecar["frames_written"] == seconds * 8000
    assert not sidecar.get("dropped_ahead_frames")
    samples, _ = read_wav(server.recordings / sidecar["file"])
    expected = reference.decode("PCMU", payload_for(0, seconds * 8000, seed))
    assert np.array_equal(samples, expected)


def test_a_burst_of_new_streams_is_read_ahead_and_every_one_is_recorded_exactly(
    make_server: Any,
) -> None:
    """500 new sources whose packets all wait in the socket when the server resumes (it is
    stopped while they are sent, as after a restart while calls are tapped): creating their
    streams holds the loop for longer than a tick, so the rest is read ahead into the
    process's memory meanwhile (`read_ahead`), and every WAV is the audio sent, sample for
    sample, with nothing lost."""
    server: ServerProcess = make_server("--no-auth", "--rtp-idle-timeout", IDLE)
    assert server.proc is not None
    sources, packets = 500, 6
    socks = [sender() for _ in range(sources)]
    audio = [noise(160 * packets, 1000 + i) for i in range(sources)]
    dest = ("127.0.0.1", server.rtp_port)
    server.proc.send_signal(signal.SIGSTOP)
    try:
        for n in range(packets):  # round by round, as live calls send
            for sock, payload in zip(socks, audio, strict=True):
                sock.sendto(packet(n, 160 * n, payload[160 * n : 160 * (n + 1)]), dest)
    finally:
        server.proc.send_signal(signal.SIGCONT)
    sidecars = {s["tap_id"]: s for s in finished_sidecars(server, sources)}
    assert len(sidecars) == sources
    for sock, payload in zip(socks, audio, strict=True):
        name = tap_name(sock)
        assert sidecars[name]["rtp"]["received"] == packets, name
        samples, _ = read_wav(server.recordings / f"{name}.wav")
        assert np.array_equal(samples, reference.decode("PCMU", payload)), name
    health = server.health()
    assert health is not None
    assert health["rtp"]["read_ahead"] > 0  # the path under test was taken
    assert health["rtp"]["packets_refused"] == 0


def test_dtmf_cn_and_ssrc_change_on_one_source(rtp_server: ServerProcess) -> None:
    sock = sender()
    dest = ("127.0.0.1", rtp_server.rtp_port)
    a, b = noise(160 * 5, 4), noise(160 * 5, 5)
    seq, ts = 100, 8000
    for n in range(5):  # 100 ms of PCMU
        sock.sendto(packet(seq + n, ts + 160 * n, a[n * 160 : (n + 1) * 160]), dest)
    seq += 5
    # digit 5 starting at ts+800, 3 updates then 3 end packets (RFC 4733 retransmission)
    for i, (end, duration) in enumerate([(False, 160), (False, 320), (False, 480),
                                         (True, 640), (True, 640), (True, 640)]):  # fmt: skip
        event = TelephoneEvent(5, end, 10, duration).serialize()
        sock.sendto(packet(seq + i, ts + 800, event, pt=101, marker=i == 0), dest)
    seq += 6
    # comfort noise, then 100 ms later audio again: the gap is silence, not loss
    sock.sendto(packet(seq, ts + 800 + 640, b"\x40", pt=13), dest)
    seq += 1
    time.sleep(0.05)  # pacing: the sender pauses, as after comfort noise
    resume = ts + 800 + 640 + 800
    for n in range(5):
        sock.sendto(packet(seq + n, resume + 160 * n, b[n * 160 : (n + 1) * 160], pt=8), dest)
    time.sleep(0.05)  # pacing: the sender pauses before it restarts
    # the sender restarts with a new SSRC and new numbering: same file, right after
    c = noise(160 * 3, 6)
    for n in range(3):
        sock.sendto(packet(7 + n, 999 + 160 * n, c[n * 160 : (n + 1) * 160], ssrc=0x5555), dest)
    samples, sidecar = finished_recording(rtp_server, tap_name(sock))
    expected = np.concatenate(
        [
            reference.decode("PCMU", a),
            np.zeros(640 + 800, dtype=np.int16),  # DTMF time + CN time: silence
            reference.decode("PCMA", b),
            reference.decode("PCMU", c),
        ]
    )
    assert len(samples) == len(expected)
    assert np.array_equal(samples, expected)
    rtp = sidecar["rtp"]
    assert rtp["lost"] == 0
    assert rtp["comfort_noise"] == 1
    assert rtp["ssrcs"] == ["0x0000abcd", "0x00005555"]
    assert sorted(rtp["payload_types"]) == [0, 8, 13, 101]
    (dtmf,) = rtp["dtmf"]
    assert dtmf["digit"] == "5"
    assert dtmf["start"] == pytest.approx(0.1)
    assert dtmf["duration"] == pytest.approx(0.08)
    kinds = [e["type"] for e in sidecar["events"]]
    assert kinds.count("dtmf") == 1 and kinds.count("ssrc_change") == 1


@pytest.mark.parametrize(
    ("stray", "counted_as"),
    [
        (RtpPacket(72, False, 7, 123456, 0x5555, b"").serialize(), "rtcp"),  # 12 bytes, PT 72
        (RtpPacket(0, False, 7, 123456, 0x5555, b"\x55").serialize(), "ssrc_probation_dropped"),
    ],
    ids=["header-only-pt72", "one-byte-pcmu"],
)
def test_one_stray_packet_of_another_ssrc_does_not_hijack_the_stream(
    rtp_server: ServerProcess, stray: bytes, counted_as: str
) -> None:
    """Issue 16: a call and, after its 26th packet, one datagram with another SSRC from the same
    source. The WAV is still the call, sample for sample, and the stray is counted."""
    sock = sender()
    dest = ("127.0.0.1", rtp_server.rtp_port)
    count = 60
    audio = noise(160 * count, seed=16)
    for n in range(count):
        sock.sendto(packet(n, 160 * n, audio[n * 160 : (n + 1) * 160]), dest)
        if n == 25:
            sock.sendto(stray, dest)
        time.sleep(0.02)  # pacing: a real-time sender (faster audio would run ahead of time)
    samples, sidecar = finished_recording(rtp_server, tap_name(sock))
    assert sidecar["frames_written"] == count * 160
    assert np.array_equal(samples, reference.decode("PCMU", audio))
    rtp = sidecar["rtp"]
    assert (rtp["received"] + rtp["rtcp"], rtp["lost"], rtp["stale_ssrc"]) == (count + 1, 0, 0)
    assert rtp[counted_as] == 1
    assert rtp["ssrcs"] == ["0x0000abcd"]
    assert not [e for e in sidecar["events"] if e["type"] == "ssrc_change"]


def test_bad_datagrams_are_counted_and_hurt_nobody(rtp_server: ServerProcess) -> None:
    good = sender()
    bad = sender()
    dest = ("127.0.0.1", rtp_server.rtp_port)
    audio = noise(160 * 10, 7)
    garbage = [
        b"",
        b"\x80",
        b"\x00" * 12,  # version 0
        b"\x8f\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x01",  # 15 CSRCs announced, none present
        b"\x90\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x09",  # extension past end
        b"\xa0\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x01\xff",  # padding past end
        b"\x81\xc8\x00\x06" + b"\x00" * 24,  # RTCP sender report (muxed)
        b"\x81\xc9\x00\x01" + b"\x00" * 4,  # RTCP receiver report
    ]
    for n in range(10):
        good.sendto(packet(n, 160 * n, audio[n * 160 : (n + 1) * 160]), dest)
        for g in garbage:
            bad.sendto(g, dest)
            good.sendto(g, dest)  # also mixed into the good stream
    samples, sidecar = finished_recording(rtp_server, tap_name(good))
    assert np.array_equal(samples, reference.decode("PCMU", audio))
    assert sidecar["rtp"]["rtcp"] == 20
    assert sidecar["rtp"]["malformed"] == 60
    health = rtp_server.health()
    assert health is not None
    assert health["rtp"]["rtcp"] == 40
    assert health["rtp"]["malformed"] == 120
    for reason in ("too_short", "bad_version", "csrc_past_end", "extension_past_end"):
        assert health["rtp"][f"malformed_{reason}"] > 0
    assert not list(rtp_server.recordings.glob(f"{tap_name(bad)}*"))  # garbage makes no tap
    assert "Traceback" not in rtp_server.log()


def test_stream_cap_refuses_new_sources(make_server: Any) -> None:
    server = make_server("--no-auth", "--rtp-idle-timeout", "1", "--rtp-max-streams", "2")
    socks = [sender() for _ in range(3)]
    dest = ("127.0.0.1", server.rtp_port)
    for n in range(5):
        for sock in socks:
            sock.sendto(packet(n, 160 * n, b"\xff" * 160), dest)
        time.sleep(0.02)  # pacing: real time, a packet every 20 ms
    for sock in socks[:2]:
        finished_recording(server, tap_name(sock))
    assert not list(server.recordings.glob(f"{tap_name(socks[2])}*"))
    health = server.health()
    assert health is not None and health["rtp"]["streams_refused"] == 1  # one source
    assert health["rtp"]["packets_refused"] == 5 and health["rtp"]["refused_capacity"] == 1
    assert server.log().count("refused RTP stream") == 1  # logged once per source


def can_send_raw() -> bool:
    sock = raw_socket()
    if sock is not None:
        sock.close()
    return sock is not None


@pytest.mark.parametrize("sender", ["sockets", "raw"])
def test_load_smoke_300_streams_real_time(make_server: Any, sender: str) -> None:
    """300 concurrent 20 ms streams for 10 s from a separate process: nothing lost. Both ways the
    load generator sends: a UDP socket per stream, and whole packets over one raw socket."""
    if sender == "raw" and not can_send_raw():
        missing("cannot open a raw socket (needs CAP_NET_RAW: root)")
    server = make_server("--no-auth", "--rtp-idle-timeout", "1", "--flush-interval", "1")
    streams, seconds = 300, 10
    result = subprocess.run(
        [sys.executable, "-m", "bench.rtp_load", "--port", str(server.rtp_port),
         "--streams", str(streams), "--seconds", str(seconds), "--seed", "9",
         "--sender", sender],
        cwd=ROOT, check=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    summary = json.loads(result.stdout)
    assert summary["sender"] == sender
    assert summary["packets_sent"] == streams * seconds * 50
    sidecars = finished_sidecars(server, streams)
    assert len(sidecars) == streams
    received = sum(s["rtp"]["received"] for s in sidecars)
    assert received == summary["packets_sent"], (
        f"receiver lost {summary['packets_sent'] - received}"
    )
    expected_frames = seconds * 8000
    for sidecar in sidecars:
        assert sidecar["state"] == "finished"
        assert sidecar["frames_written"] == expected_frames
        assert sidecar["rtp"]["lost"] == sidecar["rtp"]["late"] == 0
    # every sample of a few streams, chosen across the range, equals what was sent
    by_ssrc = {s["rtp"]["ssrcs"][0]: s for s in sidecars}
    for index in (0, 149, 299):
        sidecar = by_ssrc[f"0x{0x10000000 + index:08x}"]
        if sender == "raw":  # a source port per stream, as from separate sockets
            assert sidecar["file"] == f"rtp-127.0.0.1-{RAW_BASE_PORT + index}.wav"
        samples, _ = read_wav(server.recordings / sidecar["file"])
        assert np.array_equal(
            samples, reference.decode("PCMU", payload_for(index, expected_frames, 9))
        )
