"""`tap-receiver send` against the real server, in each of its modes: it plays a WAV the test
wrote, the server records it, `send` says MATCH (exit 0), and the test checks the recording on
disk itself against an independent G.711 reference (tests/reference.py's scalar G.191 encoder
and its decoder), sample for sample, lengths included. A recording that does not hold what was
sent makes `send` exit non-zero; a wrong token or an unreachable receiver is one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile

from tests import reference
from tests.helpers import (
    ROOT,
    TOKEN,
    ServerProcess,
    assert_header_matches_data,
    free_port,
    make_certificates,
    new_id,
    read_wav,
    wait_for_sidecar,
)
from tests.test_tls import TlsServerProcess

RATE = 8000
PACKET = 160  # samples per 20 ms


def run_send(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> Any:
    """`python -m receiver send ...` as a user runs it; no RECEIVER_* settings unless given."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RECEIVER_")}
    return subprocess.run(
        [sys.executable, "-m", "receiver", "send", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={**clean, **(env or {})},
    )


def write_wav(path: Path, seconds: float, channels: int = 1, seed: int = 0) -> np.ndarray:
    """Noise-like int16 audio (never a whole silent packet) at 8 kHz; returns the samples."""
    rng = np.random.default_rng(seed)
    samples = rng.integers(-12000, 12000, (round(seconds * RATE), channels), dtype=np.int16)
    samples[np.abs(samples) < 100] = 1000  # no sample decodes to silence
    soundfile.write(str(path), samples, RATE, subtype="PCM_16")
    return samples


def g711_roundtrip(codec: str, samples: np.ndarray) -> np.ndarray:
    """What a receiver must record for these samples sent as G.711: the independent scalar
    G.191 encoder, then the reference decoder."""
    compress = reference.g191_ulaw_compress if codec == "PCMU" else reference.g191_alaw_compress
    encoded = bytes(compress(int(x)) for x in samples)
    return reference.decode(codec, encoded)


def tap_uri(server: ServerProcess, kind: str = "tap") -> str:
    return f"{server.ws_url}/t/{TOKEN}/{kind}/{{tap_id}}"


def assert_matched(result: Any) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    assert "MATCH: every sample as sent" in result.stdout, result.stdout
    assert "Traceback" not in result.stderr
    return str(result.stdout)


def test_send_websocket_tap(server: ServerProcess, tmp_path: Path) -> None:
    sent = write_wav(tmp_path / "in.wav", 1.0, seed=1)
    tap_id = new_id("send-ws")
    output = assert_matched(
        run_send(tap_uri(server), "--wav", str(tmp_path / "in.wav"), "--tap-id", tap_id)
    )
    assert f"/t/{TOKEN}/#/tap/{tap_id}" in output  # where to see it
    sidecar = wait_for_sidecar(server.recordings, tap_id)
    assert sidecar["dialect"] == "signalwire-tap" and sidecar["codec"] == "PCMU"
    samples, rate = read_wav(server.recordings / f"{tap_id}.wav")
    assert rate == RATE
    assert np.array_equal(samples, g711_roundtrip("PCMU", sent[:, 0]))
    assert assert_header_matches_data(server.recordings / f"{tap_id}.wav") == len(sent)


def test_send_websocket_tap_pcma_with_a_format_frame(server: ServerProcess, tmp_path: Path) -> None:
    sent = write_wav(tmp_path / "in.wav", 0.6, seed=2)
    tap_id = new_id("send-pcma")
    assert_matched(
        run_send(
            tap_uri(server),
            "--wav",
            str(tmp_path / "in.wav"),
            "--tap-id",
            tap_id,
            "--codec",
            "pcma",
            "--format-frame",
            "--ptime",
            "30",
        )
    )
    sidecar = wait_for_sidecar(server.recordings, tap_id)
    assert sidecar["codec"] == "PCMA" and sidecar["counters"]["format_frames"] == 1
    assert sidecar["counters"]["frames_received"] == 20  # 0.6 s in 30 ms frames
    samples, _ = read_wav(server.recordings / f"{tap_id}.wav")
    assert np.array_equal(samples, g711_roundtrip("PCMA", sent[:, 0]))


def test_send_media_streams_both_tracks(server: ServerProcess, tmp_path: Path) -> None:
    sent = write_wav(tmp_path / "stereo.wav", 1.0, channels=2, seed=3)
    tap_id = new_id("send-ms")
    output = assert_matched(
        run_send(
            tap_uri(server, "stream"),
            "--media-streams",
            "--tracks",
            "both",
            "--wav",
            str(tmp_path / "stereo.wav"),
            "--tap-id",
            tap_id,
        )
    )
    assert "stereo" in output
    sidecar = wait_for_sidecar(server.recordings, tap_id)
    assert sidecar["dialect"] == "media-streams"
    assert sidecar["channels"] == 2 and sidecar["channel_names"] == ["inbound", "outbound"]
    samples, _ = read_wav(server.recordings / f"{tap_id}.wav")
    assert samples.shape == (RATE, 2)
    assert np.array_equal(samples[:, 0], g711_roundtrip("PCMU", sent[:, 0]))  # left: inbound
    assert np.array_equal(samples[:, 1], g711_roundtrip("PCMU", sent[:, 1]))  # right: outbound


def test_send_media_streams_one_track_of_a_generated_signal(server: ServerProcess) -> None:
    tap_id = new_id("send-ms1")
    assert_matched(
        run_send(
            tap_uri(server),
            "--media-streams",
            "--tracks",
            "outbound",
            "--seconds",
            "0.5",
            "--tap-id",
            tap_id,
            "--codec",
            "pcma",
        )
    )
    sidecar = wait_for_sidecar(server.recordings, tap_id)
    assert sidecar["channels"] == 1 and sidecar["channel_names"] == ["outbound"]
    assert sidecar["frames_written"] == RATE // 2


def test_send_rtp_with_loss_and_reordering(server: ServerProcess, tmp_path: Path) -> None:
    sent = write_wav(tmp_path / "in.wav", 2.0, seed=4)
    result = run_send(
        f"rtp://127.0.0.1:{server.rtp_port}",
        "--wav",
        str(tmp_path / "in.wav"),
        "--api",
        f"{server.base_url}/t/{TOKEN}/",
        "--loss",
        "0.1",
        "--reorder",
        "0.1",
        "--seed",
        "7",
    )
    output = assert_matched(result)
    name = next(w for w in output.split() if w.startswith("rtp-127.0.0.1-")).rstrip(":")
    sidecar = wait_for_sidecar(server.recordings, name)
    rtp = sidecar["rtp"]
    assert rtp["lost"] > 0 and rtp["reordered"] > 0 and rtp["late"] == 0
    assert rtp["received"] + rtp["lost"] == 100
    samples, _ = read_wav(server.recordings / f"{name}.wav")
    expected = g711_roundtrip("PCMU", sent[:, 0])
    assert len(samples) == len(expected) == len(sent)
    # every packet is exactly what was sent, or, where it was left out, silence of its length
    silent = 0
    for start in range(0, len(expected), PACKET):
        got, want = samples[start : start + PACKET], expected[start : start + PACKET]
        if not np.any(got):
            silent += 1
        else:
            assert np.array_equal(got, want), start
    assert silent == rtp["lost"]
    assert f"{rtp['lost']} lost packets silent" in output


def test_send_rtp_finds_a_local_receiver_from_its_settings(
    make_server: Any, tmp_path: Path
) -> None:
    """No --api and no --token: the receiver configured here (RECEIVER_RECORDINGS holds the
    token it generated; RECEIVER_HTTP_PORT) is asked."""
    server = make_server("--rtp-idle-timeout", "0.5")
    env = {
        "RECEIVER_RECORDINGS": str(server.recordings),
        "RECEIVER_HTTP_PORT": str(server.http_port),
    }
    assert_matched(
        run_send(
            f"rtp://127.0.0.1:{server.rtp_port}",
            "--seconds",
            "0.5",
            "--codec",
            "pcma",
            "--ptime",
            "40",
            env=env,
            cwd=tmp_path,
        )
    )


def test_send_over_wss_with_a_private_ca(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path / "tls")
    server = TlsServerProcess(tmp_path / "recordings", certs, "--token", TOKEN).start()
    try:
        uri = f"wss://127.0.0.1:{server.http_port}/t/{TOKEN}/tap/{{tap_id}}"
        untrusted = run_send(uri, "--seconds", "0.2")
        assert untrusted.returncode == 2 and "--cafile" in untrusted.stderr, untrusted.stderr
        ca = tmp_path / "ca.pem"
        certs.ca.cert_pem.write_to_path(str(ca))
        assert_matched(run_send(uri, "--seconds", "0.5", "--cafile", str(ca)))
    finally:
        assert server.stop() == 0, server.log()


def test_send_says_mismatch_when_the_recording_differs(make_server: Any) -> None:
    """A receiver that stops recording after 1 s (max_tap_duration, stop) holds less than the
    2 s sent: `send` says what differs and exits 1."""
    server = make_server(
        "--token",
        TOKEN,
        "--rtp-idle-timeout",
        "0.5",
        "--max-tap-duration",
        "1",
        "--max-tap-duration-action",
        "stop",
    )
    result = run_send(
        f"rtp://127.0.0.1:{server.rtp_port}",
        "--seconds",
        "2",
        "--api",
        f"{server.base_url}/t/{TOKEN}/",
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "MISMATCH" in result.stdout and "frames recorded, 16000 sent" in result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("uri", "args", "message"),
    [
        ("{ws}/t/wrong-token-123/tap/{{tap_id}}", (), "401 Unauthorized: the URI must carry"),
        ("ws://127.0.0.1:{closed}/tap/{{tap_id}}", (), "cannot connect to 127.0.0.1:"),
        ("{ws}/t/{token}/tap/{{tap_id}}", ("--wav", "/no/such.wav"), "no sound file"),
        ("{ws}/t/{token}/tap/{{tap_id}}", ("--loss", "0.1"), "--loss and --reorder are for rtp"),
        ("http://127.0.0.1/tap/x", (), "a tap URI starts with ws://, wss:// or rtp://"),
        ("{ws}/t/{token}/tap/-dash", (), "tap id '-dash'"),
        ("rtp://127.0.0.1", (), "an RTP address is rtp://HOST:PORT"),
    ],
)
def test_send_refusals_are_one_clear_line(
    server: ServerProcess, uri: str, args: tuple[str, ...], message: str
) -> None:
    target = uri.format(ws=server.ws_url, token=TOKEN, closed=free_port())
    result = run_send(target, "--seconds", "0.2", *args)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tap-receiver send: "), result.stderr
    assert message in lines[0], lines[0]
