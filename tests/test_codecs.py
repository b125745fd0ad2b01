"""Opus and G.722 taps end to end: real encoders (ffmpeg's libopus and g722), real senders, the
WAV compared sample for sample with the Debian ffmpeg CLI's decode of the same packets."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from receiver.codecs.formats import FormatError, parse_content_type
from receiver.codecs.opus_packet import OpusPacketError, packet_samples
from tests import reference
from tests.helpers import (
    ROOT,
    TOKEN,
    ServerProcess,
    assert_header_matches_data,
    new_id,
    read_wav,
    require_tool,
    send_tap,
    tap_url,
    wait_for_sidecar,
)


@pytest.fixture(scope="module")
def opus_packets() -> tuple[list[bytes], np.ndarray]:
    """Three seconds of ffmpeg-encoded Opus (151 packets of 20 ms) and ffmpeg's decode."""
    require_tool("ffmpeg")
    ogg = reference.ffmpeg_encode_ogg_opus(3.0)
    packets = reference.ogg_packets(ogg)[2:]  # after OpusHead and OpusTags
    return packets, reference.ffmpeg_decode_ogg_opus(ogg)


def recording(server: ServerProcess, tap_id: str) -> tuple[np.ndarray, int, dict[str, Any]]:
    sidecar = wait_for_sidecar(server.recordings, tap_id)
    wav = server.recordings / f"{tap_id}.wav"
    samples, rate = read_wav(wav)
    assert assert_header_matches_data(wav) == len(samples) == sidecar["frames_written"]
    return samples, rate, sidecar


# -- Opus over WebSocket: one packet per binary frame -----------------------------------------


@pytest.mark.parametrize(
    ("query", "header"),
    [
        ("?codec=opus", None),
        ("", '{"content-type": "audio/opus;rate=48000"}'),
        ("", "content-type:audio/opus"),
    ],
)
def test_opus_tap_equals_ffmpeg_libopus(
    server: ServerProcess, opus_packets: tuple[list[bytes], np.ndarray], query: str,
    header: str | None,
) -> None:  # fmt: skip
    packets, expected = opus_packets
    tap_id = new_id("opus")
    frames: list[bytes | str] = ([header] if header else []) + list(packets)
    asyncio.run(send_tap(tap_url(server, tap_id, query), frames))
    samples, rate, sidecar = recording(server, tap_id)
    assert rate == 48000 and sidecar["sample_rate"] == 48000
    assert sidecar["codec"] == "OPUS"
    assert len(samples) == len(expected) == sum(packet_samples(p) for p in packets)
    assert len(samples) == len(packets) * 960
    assert np.array_equal(samples, expected)
    assert sidecar["counters"]["frames_received"] == len(packets)
    assert sidecar["decoding"] == {
        "concealment": "opus-plc",
        "concealed_frames": 0,
        "corrupt_packets": 0,
    }


def test_opus_tap_at_a_declared_rate(server: ServerProcess, opus_packets: Any) -> None:
    """`?rate=16000`: libopus decodes at 16 kHz itself (ffmpeg's libopus decoder only decodes
    at 48 kHz: the reference is libopus through the binding's own per-packet API); the length
    follows exactly."""
    opuslib_next = pytest.importorskip("opuslib_next")
    packets, _ = opus_packets
    decoder = opuslib_next.Decoder(16000, 1)
    expected = np.frombuffer(b"".join(decoder.decode(p, 320) for p in packets), "<i2")
    tap_id = new_id("opus16")
    asyncio.run(send_tap(tap_url(server, tap_id, "?codec=opus&rate=16000"), list(packets)))
    samples, rate, sidecar = recording(server, tap_id)
    assert rate == 16000 and sidecar["sample_rate"] == 16000
    assert len(samples) == len(expected) == len(packets) * 320
    assert np.array_equal(samples, expected)
    assert np.abs(samples.astype(np.int32)).max() > 500  # audio, not silence


def test_corrupt_opus_packets_are_counted_and_concealed(
    server: ServerProcess, opus_packets: tuple[list[bytes], np.ndarray]
) -> None:
    """A frame that is no Opus packet (TOC: code 3, zero frames) is counted on arrival; one
    whose TOC is fine but whose body libopus rejects is counted by the decoder; both become
    libopus's concealment of the time it covers (the first: as long as the packet before it,
    20 ms; the second: what its TOC says, two 20 ms frames), so the file keeps its length and
    the audio before them is exact."""
    packets, expected = opus_packets
    tap_id = new_id("opusbad")
    bad_toc = bytes([packets[0][0] | 0x03, 0x00])
    bad_body = bytes([(packets[0][0] & 0xFC) | 0x02, 0xFF, 0x01])  # code 2: length past the end
    frames: list[bytes | str] = [*packets[:50], bad_toc, *packets[50:100], bad_body, *packets[100:]]
    asyncio.run(send_tap(tap_url(server, tap_id, "?codec=opus"), frames))
    samples, _, sidecar = recording(server, tap_id)
    assert len(samples) == len(expected) + 960 + 2 * 960
    assert np.array_equal(samples[: 50 * 960], expected[: 50 * 960])
    assert sidecar["counters"]["corrupt_packets"] == 1  # the TOC, on the event loop
    assert sidecar["decoding"]["corrupt_packets"] == 1  # the body, in the decoder
    assert sidecar["decoding"]["concealed_frames"] == 960 + 2 * 960
    assert "not an Opus packet" in server.log()
    # concealment continues the signal instead of a hole of digital silence
    assert np.abs(samples[50 * 960 : 51 * 960].astype(np.int32)).max() > 100


# -- G.722 over WebSocket -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "header"),
    [
        ("?codec=g722", None),
        ("", "content-type:audio/G722;rate=8000"),
        ("", '{"content-type": "audio/G722"}'),
    ],
)
def test_g722_tap_equals_ffmpeg(server: ServerProcess, query: str, header: str | None) -> None:
    require_tool("ffmpeg")
    encoded = reference.ffmpeg_encode_g722(2.0)
    expected = reference.ffmpeg_decode_g722(encoded)
    tap_id = new_id("g722")
    chunks = [encoded[i : i + 160] for i in range(0, len(encoded), 160)]  # 20 ms each
    frames: list[bytes | str] = ([header] if header else []) + chunks
    asyncio.run(send_tap(tap_url(server, tap_id, query), frames))
    samples, rate, sidecar = recording(server, tap_id)
    assert rate == 16000 and sidecar["sample_rate"] == 16000 and sidecar["codec"] == "G722"
    assert len(samples) == len(expected) == 2 * len(encoded) == 32000
    assert np.array_equal(samples, expected)


# -- the TOC parser ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("packet", "samples"),
    [
        (bytes([0x08]), 960),  # SILK NB 20 ms, one frame
        (bytes([0x70 | 1, 0, 0]), 960),  # hybrid FB 10 ms, two frames
        (bytes([0xF8 | 3, 0x03]), 2880),  # CELT FB 20 ms, three frames
        (bytes([0x80]), 120),  # CELT NB 2.5 ms
        (bytes([0x18 | 3, 0x02]), 5760),  # SILK 60 ms x 2 = 120 ms: the most there may be
    ],
)
def test_packet_samples(packet: bytes, samples: int) -> None:
    assert packet_samples(packet) == samples


@pytest.mark.parametrize("packet", [b"", bytes([0x03]), bytes([0x03, 0x00]), bytes([0x1B, 0x03])])
def test_packet_samples_refuses_what_is_no_packet(packet: bytes) -> None:
    with pytest.raises(OpusPacketError):
        packet_samples(packet)


# -- Media Streams: G.722 (Telnyx, SignalWire `stream`) and L16 with modifiers --------------


def stream_start(encoding: str, rate: int | None, tracks: list[str]) -> dict[str, Any]:
    media_format: dict[str, Any] = {"encoding": encoding, "channels": 1}
    if rate is not None:
        media_format["sample_rate"] = rate
    return {"event": "start", "stream_id": "tx-1",
            "start": {"tracks": tracks, "media_format": media_format}}  # fmt: skip


def stream_media(track: str, chunk: int, payload: bytes) -> dict[str, Any]:
    body = {"track": track, "chunk": str(chunk), "timestamp": str((chunk - 1) * 20),
            "payload": base64.b64encode(payload).decode()}  # fmt: skip
    return {"event": "media", "stream_id": "tx-1", "media": body}


async def replay(url: str, messages: list[dict[str, Any]]) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        for message in messages:
            await ws.send_str(json.dumps(message))
        await ws.close()


def test_g722_media_stream_two_tracks(server: ServerProcess) -> None:
    """Telnyx-style G.722 (its SDP clock rate 8000 declared), both tracks: a stereo WAV at
    16 kHz, each channel ffmpeg's decode of its track's bytes; a chunk that never came on the
    inbound track is 320 samples of silence there (and the decoder goes on with the next)."""
    require_tool("ffmpeg")
    inbound, outbound = reference.ffmpeg_encode_g722(1.0), reference.ffmpeg_encode_g722(1.0)[::-1]
    tap_id = new_id("g722s")
    messages = [stream_start("G722", 8000, ["both_tracks"])]
    for n in range(1, 51):
        piece = slice((n - 1) * 160, n * 160)
        if n != 20:
            messages.append(stream_media("inbound", n, inbound[piece]))
        messages.append(stream_media("outbound", n, outbound[piece]))
    asyncio.run(replay(f"{server.ws_url}/t/{TOKEN}/stream/{tap_id}", messages))
    samples, rate, sidecar = recording(server, tap_id)
    assert rate == 16000 and sidecar["codec"] == "G722" and samples.shape == (16000, 2)
    without = inbound[: 19 * 160] + inbound[20 * 160 :]  # what the inbound decoder was fed
    decoded = reference.ffmpeg_decode_g722(without)
    expected_in = np.concatenate(
        [decoded[: 19 * 320], np.zeros(320, np.int16), decoded[19 * 320 :]]
    )
    assert np.array_equal(samples[:, 0], expected_in)
    assert np.array_equal(samples[:, 1], reference.ffmpeg_decode_g722(outbound))


@pytest.mark.parametrize(
    ("encoding", "rate"),
    [
        ("L16@24000h@40i", None),
        ("audio/x-L16@16000h", None),
        ("L16@24000h@40i", 24000),
    ],
)
def test_l16_with_modifiers(server: ServerProcess, encoding: str, rate: int | None) -> None:
    """SignalWire `stream` codecs such as `L16@24000h@40i`: the rate comes from the `h`
    modifier (40 ms packets: `i`) when the start message gives no sample rate."""
    hz = int(encoding.split("@")[1].rstrip("h"))
    pcm = np.random.default_rng(hz).integers(-32768, 32767, hz // 25 * 6, dtype=np.int16)
    raw = pcm.astype("<i2").tobytes()
    per = hz // 25 * 2  # bytes in 40 ms
    tap_id = new_id("l16m")
    messages = [stream_start(encoding, rate, ["inbound"])]
    messages += [stream_media("inbound", n + 1, raw[n * per : (n + 1) * per]) for n in range(6)]
    for message in messages[1:]:
        message["media"]["timestamp"] = str(int(message["media"]["chunk"]) * 40 - 40)
    asyncio.run(replay(f"{server.ws_url}/t/{TOKEN}/stream/{tap_id}", messages))
    samples, wav_rate, sidecar = recording(server, tap_id)
    assert wav_rate == hz == sidecar["sample_rate"] and sidecar["codec"] == "L16"
    assert np.array_equal(samples, pcm)


@pytest.mark.parametrize("encoding", ["L16@24000x", "L16@h", "L16@8000h@8000h"])
def test_bad_codec_modifiers_are_refused(encoding: str) -> None:
    with pytest.raises(FormatError):
        parse_content_type(encoding)


# -- what ls and inspect say ------------------------------------------------------------------


def test_ls_and_inspect_show_codec_rate_and_concealment(
    server: ServerProcess, opus_packets: tuple[list[bytes], np.ndarray], tmp_path: Path
) -> None:
    packets, _ = opus_packets
    tap_id = new_id("opusls")
    frames: list[bytes | str] = [*packets[:20], bytes([0x03, 0x00]), *packets[20:40]]
    asyncio.run(send_tap(tap_url(server, tap_id, "?codec=opus&rate=24000"), frames))
    wait_for_sidecar(server.recordings, tap_id)
    directory = tmp_path / "recordings"
    directory.mkdir()
    for ext in ("wav", "json"):
        shutil.copy(server.recordings / f"{tap_id}.{ext}", directory)

    def cli(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "receiver", *args, "--recordings",
                                 str(directory)], capture_output=True, text=True, timeout=60,
                                cwd=ROOT)  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result.stdout

    row = cli("ls").splitlines()[1].split()
    assert row[:6] == [tap_id, "finished", "websocket", "OPUS", "24000", "1"]
    text = cli("inspect", tap_id)
    assert "OPUS 24000 Hz x1" in text
    assert "concealment opus-plc: 480 frames concealed, 0 corrupt packets" in text


def test_opus_media_stream_with_a_lost_chunk(
    server: ServerProcess, opus_packets: tuple[list[bytes], np.ndarray]
) -> None:
    """Telnyx-style OPUS: one packet per media message. Until the chunk that never came the
    recording is the ffmpeg CLI's libopus decode; that chunk is libopus's concealment; the
    whole equals libopus fed the same packets with the loss marked; a corrupt packet is
    counted and concealed too."""
    opuslib_next = pytest.importorskip("opuslib_next")
    packets, expected = opus_packets
    lost = {30, 31}
    corrupt = 60
    tap_id = new_id("opuss")
    messages = [stream_start("OPUS", 48000, ["inbound"])]
    for n, packet in enumerate(packets):
        if n not in lost:
            messages.append(
                stream_media("inbound", n + 1, bytes([0x03]) if n == corrupt else packet)
            )
    asyncio.run(replay(f"{server.ws_url}/t/{TOKEN}/stream/{tap_id}", messages))
    samples, rate, sidecar = recording(server, tap_id)
    assert rate == 48000 and sidecar["codec"] == "OPUS"
    assert len(samples) == len(packets) * 960
    assert np.array_equal(samples[: 30 * 960], expected[: 30 * 960])
    decoder = opuslib_next.Decoder(48000, 1)
    gone = lost | {corrupt}
    same_library = b"".join(
        decoder.decode(b"" if n in gone else p, 960) for n, p in enumerate(packets)
    )
    assert np.array_equal(samples, np.frombuffer(same_library, "<i2"))
    assert sidecar["counters"]["corrupt_packets"] == 1
    assert sidecar["decoding"]["concealed_frames"] == 3 * 960


def test_stereo_opus_tap(server: ServerProcess) -> None:
    """`audio/opus;channels=2`: one stereo libopus decoder, a 2-channel WAV equal to the
    ffmpeg CLI's decode of the same packets."""
    require_tool("ffmpeg")
    ogg = reference.ffmpeg_encode_ogg_opus(1.0, bitrate="48k", channels=2)
    packets = reference.ogg_packets(ogg)[2:]
    expected = reference.ffmpeg_decode_ogg_opus(ogg, channels=2).reshape(-1, 2)
    tap_id = new_id("opus2")
    header = '{"content-type": "audio/opus;rate=48000;channels=2"}'
    asyncio.run(send_tap(tap_url(server, tap_id), [header, *packets]))
    samples, rate, sidecar = recording(server, tap_id)
    assert rate == 48000 and sidecar["channels"] == 2 and samples.shape == expected.shape
    assert len(samples) == 960 * len(packets)
    assert np.array_equal(samples, expected)
    assert not np.array_equal(samples[:, 0], samples[:, 1])  # two different channels
