"""Opus and G.722 over RTP, end to end: ffmpeg and GStreamer send, the WAV is compared sample for
sample with the Debian ffmpeg CLI's decode of the same packets; lost packets are concealed by
libopus and the file keeps its exact length."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from receiver.rtp.packet import RtpPacket
from tests import reference
from tests.helpers import (
    ServerProcess,
    assert_header_matches_data,
    free_port,
    read_wav,
    require_tool,
    wait_for_sidecar,
    wait_until,
)
from tests.test_control import post


@pytest.fixture
def rtp_server(make_server: Any) -> ServerProcess:
    server: ServerProcess = make_server("--no-auth", "--rtp-idle-timeout", "0.5")
    return server


def only_recording(server: ServerProcess) -> tuple[np.ndarray, int, dict[str, Any]]:
    names = wait_until(
        lambda: [p.stem for p in server.recordings.glob("rtp-*.json")], "an RTP recording"
    )
    assert len(names) == 1, names
    sidecar = wait_for_sidecar(server.recordings, names[0])
    wav = server.recordings / f"{names[0]}.wav"
    samples, rate = read_wav(wav)
    assert assert_header_matches_data(wav) == len(samples) == sidecar["frames_written"]
    return samples, rate, sidecar


def test_ffmpeg_g722_sender(rtp_server: ServerProcess, tmp_path: Path) -> None:
    """Static PT 9: the RTP clock is 8 kHz, the audio 16 kHz (one byte: one tick, two
    samples); the recording is ffmpeg's own G.722 decode of the bytes sent."""
    ffmpeg = require_tool("ffmpeg")
    encoded = reference.ffmpeg_encode_g722(2.0)
    source = tmp_path / "in.g722"
    source.write_bytes(encoded)
    subprocess.run(
        [ffmpeg, "-v", "error", "-re", "-f", "g722", "-i", str(source), "-c:a", "copy",
         "-f", "rtp", f"rtp://127.0.0.1:{rtp_server.rtp_port}"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    samples, rate, sidecar = only_recording(rtp_server)
    expected = reference.ffmpeg_decode_g722(encoded)
    assert rate == 16000 and sidecar["sample_rate"] == 16000 and sidecar["codec"] == "G722"
    assert len(samples) == len(expected) == 2 * len(encoded)
    assert np.array_equal(samples, expected)
    assert sidecar["rtp"]["payload_types"] == [9] and sidecar["rtp"]["lost"] == 0


def test_ffmpeg_opus_sender(rtp_server: ServerProcess, tmp_path: Path) -> None:
    """ffmpeg's libopus packets, sent by ffmpeg's RTP muxer on PT 111 (the default mapping of
    `rtp_payload_types`): the recording is the ffmpeg CLI's libopus decode of those packets."""
    ffmpeg = require_tool("ffmpeg")
    ogg = reference.ffmpeg_encode_ogg_opus(2.0)
    source = tmp_path / "in.ogg"
    source.write_bytes(ogg)
    subprocess.run(
        [ffmpeg, "-v", "error", "-re", "-i", str(source), "-c:a", "copy", "-payload_type", "111",
         "-f", "rtp", f"rtp://127.0.0.1:{rtp_server.rtp_port}"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    samples, rate, sidecar = only_recording(rtp_server)
    expected = reference.ffmpeg_decode_ogg_opus(ogg)
    packets = reference.ogg_packets(ogg)[2:]
    assert rate == 48000 and sidecar["sample_rate"] == 48000 and sidecar["codec"] == "OPUS"
    assert len(samples) == len(expected) == 960 * len(packets)
    assert np.array_equal(samples, expected)
    assert sidecar["rtp"]["payload_types"] == [111] and sidecar["rtp"]["lost"] == 0
    assert sidecar["decoding"]["concealed_frames"] == 0


def test_gstreamer_opus_sender(rtp_server: ServerProcess, tmp_path: Path) -> None:
    """GStreamer `opusenc ! rtpopuspay`, the same packets also written to an Ogg file (tee),
    which the ffmpeg CLI decodes for the reference."""
    gst = require_tool("gst-launch-1.0")
    require_tool("ffmpeg")
    ogg = tmp_path / "sent.ogg"
    subprocess.run(
        [gst, "-q", "audiotestsrc", "is-live=true", "wave=sine", "freq=440", "volume=0.3",
         "samplesperbuffer=960", "num-buffers=100", "!", "audio/x-raw,rate=48000,channels=1",
         "!", "opusenc", "bitrate=32000", "frame-size=20", "!", "tee", "name=t",
         "!", "queue", "!", "rtpopuspay", "pt=111", "!", "udpsink", "host=127.0.0.1",
         f"port={rtp_server.rtp_port}",
         "t.", "!", "queue", "!", "oggmux", "!", "filesink", f"location={ogg}"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    samples, rate, sidecar = only_recording(rtp_server)
    data = ogg.read_bytes()
    expected = reference.ffmpeg_decode_ogg_opus(data)
    packets = reference.ogg_packets(data)[2:]
    assert rate == 48000 and sidecar["codec"] == "OPUS"
    assert len(samples) == len(expected) == 960 * len(packets)
    assert np.array_equal(samples, expected)


def test_lost_opus_packets_are_concealed_by_libopus(rtp_server: ServerProcess) -> None:
    """Packets 40 and 90-91 never arrive: the file keeps its exact length, the audio before
    the first loss is the ffmpeg CLI's decode, the gaps are libopus's concealment (the sidecar
    says so), and the whole equals libopus fed the same packets with the losses marked."""
    opuslib_next = pytest.importorskip("opuslib_next")
    require_tool("ffmpeg")
    ogg = reference.ffmpeg_encode_ogg_opus(2.0)
    packets = reference.ogg_packets(ogg)[2:]
    lost = {40, 90, 91}
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        for n, payload in enumerate(packets):
            if n not in lost:
                datagram = RtpPacket(111, n == 0, 1000 + n, 5000 + 960 * n, 0x1234, payload)
                sock.sendto(datagram.serialize(), ("127.0.0.1", rtp_server.rtp_port))
            time.sleep(0.02)  # pacing: a real-time sender (audio ahead of the clock is dropped)
    samples, _, sidecar = only_recording(rtp_server)
    assert len(samples) == 960 * len(packets)
    expected = reference.ffmpeg_decode_ogg_opus(ogg)
    assert np.array_equal(samples[: 40 * 960], expected[: 40 * 960])
    assert sidecar["rtp"]["lost"] == 3
    assert sidecar["decoding"] == {
        "concealment": "opus-plc",
        "concealed_frames": 3 * 960,
        "corrupt_packets": 0,
    }
    decoder = opuslib_next.Decoder(48000, 1)
    same_library = b"".join(
        decoder.decode(b"" if n in lost else p, 960) for n, p in enumerate(packets)
    )
    assert np.array_equal(samples, np.frombuffer(same_library, "<i2"))
    assert np.abs(samples[40 * 960 : 41 * 960].astype(np.int32)).max() > 100  # not a hole


def test_lost_g722_packet_is_silence_of_its_16_khz_length(rtp_server: ServerProcess) -> None:
    """A G.722 packet that never arrives: 160 clock ticks of the 8 kHz RTP clock, so 320
    samples of silence in the 16 kHz file; the decoder goes on with the next packet."""
    require_tool("ffmpeg")
    encoded = reference.ffmpeg_encode_g722(1.0)
    chunks = [encoded[i : i + 160] for i in range(0, len(encoded), 160)]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        for n, payload in enumerate(chunks):
            if n != 20:
                datagram = RtpPacket(9, n == 0, 7 + n, 160 * n, 0x5678, payload)
                sock.sendto(datagram.serialize(), ("127.0.0.1", rtp_server.rtp_port))
            time.sleep(0.02)  # pacing: a real-time sender
    samples, rate, sidecar = only_recording(rtp_server)
    decoded = reference.ffmpeg_decode_g722(b"".join(c for n, c in enumerate(chunks) if n != 20))
    expected = np.concatenate([decoded[: 20 * 320], np.zeros(320, np.int16), decoded[20 * 320 :]])
    assert rate == 16000 and len(samples) == len(expected) == 16000
    assert np.array_equal(samples, expected)
    assert sidecar["rtp"]["lost"] == 1


def test_a_tap_registered_as_opus_takes_its_dynamic_payload_type(make_server: Any) -> None:
    """A pool port registered with `"codec": "OPUS"` records a stream on PT 96 (not in
    `rtp_payload_types`) as Opus; the same stream on the shared port would be unknown audio."""
    opuslib_next = pytest.importorskip("opuslib_next")
    first = free_port()
    server: ServerProcess = make_server(
        "--no-auth", "--rtp-port-range", f"{first}-{first}", "--rtp-idle-timeout", "0.5"
    )
    body = {"tap_id": "opus-call", "codec": "OPUS"}
    status, answer = asyncio.run(post(f"{server.base_url}/api/taps", body))
    assert status == 201 and answer["device"]["params"]["codec"] == "OPUS", answer
    encoder = opuslib_next.Encoder(48000, 1, "voip")
    tone = (3000 * np.sin(np.arange(960 * 25) * 2 * np.pi * 440 / 48000)).astype(np.int16)
    packets = [encoder.encode(tone[k * 960 : (k + 1) * 960].tobytes(), 960) for k in range(25)]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        for n, payload in enumerate(packets):
            datagram = RtpPacket(96, n == 0, n, 960 * n, 0x9ABC, payload)
            sock.sendto(datagram.serialize(), ("127.0.0.1", answer["rtp"]["port"]))
            time.sleep(0.02)  # pacing: a real-time sender
    sidecar = wait_for_sidecar(server.recordings, "opus-call")
    samples, rate = read_wav(server.recordings / "opus-call.wav")
    decoder = opuslib_next.Decoder(48000, 1)
    expected = np.frombuffer(b"".join(decoder.decode(p, 960) for p in packets), "<i2")
    assert sidecar["codec"] == "OPUS" and rate == 48000
    assert sidecar["audio_payload_types"] == {"96": "OPUS", "111": "OPUS"}
    assert np.array_equal(samples, expected)
