"""Independent references for checking audio: the stdlib C codec, a scalar G.191 transliteration
and ffmpeg. None of them shares code with receiver.codecs.g711."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np

try:
    import audioop
except ImportError:  # Python >= 3.13 without audioop-lts
    audioop = None  # type: ignore[assignment]


def g191_ulaw_expand(code: int) -> int:
    """ITU-T G.191 ulaw_expand, one sample, transliterated from the C reference."""
    code = ~code & 0xFF
    sign = code & 0x80
    exponent = (code >> 4) & 0x07
    mantissa = code & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return -magnitude if sign else magnitude


def g191_alaw_expand(code: int) -> int:
    """ITU-T G.191 alaw_expand, one sample."""
    code ^= 0x55
    magnitude = (code & 0x0F) << 4
    segment = (code & 0x70) >> 4
    if segment == 0:
        magnitude += 8
    elif segment == 1:
        magnitude += 0x108
    else:
        magnitude = (magnitude + 0x108) << (segment - 1)
    return magnitude if code & 0x80 else -magnitude


def g191_ulaw_compress(x: int) -> int:
    """ITU-T G.191 ulaw_compress on a 16-bit sample."""
    absno = ((~x) >> 2) + 33 if x < 0 else (x >> 2) + 33
    absno = min(absno, 0x1FFF)
    i = absno >> 6
    segno = 1
    while i != 0:
        segno += 1
        i >>= 1
    code = ((0x08 - segno) << 4) | (0x0F - ((absno >> segno) & 0x0F))
    return code | 0x80 if x >= 0 else code


def g191_alaw_compress(x: int) -> int:
    """ITU-T G.191 alaw_compress on a 16-bit sample."""
    ix = (~x) >> 4 if x < 0 else x >> 4
    if ix > 15:
        iexp = 1
        while ix > 16 + 15:
            ix >>= 1
            iexp += 1
        ix -= 16
        ix += iexp << 4
    if x >= 0:
        ix |= 0x80
    return ix ^ 0x55


def decode(codec: str, data: bytes) -> np.ndarray:
    """Reference decode of G.711 bytes: audioop where importable, else scalar G.191."""
    if audioop is not None:
        convert = audioop.ulaw2lin if codec == "PCMU" else audioop.alaw2lin
        return np.frombuffer(convert(data, 2), dtype="<i2").astype(np.int16)
    expand = g191_ulaw_expand if codec == "PCMU" else g191_alaw_expand
    return np.array([expand(b) for b in data], dtype=np.int16)


def ffmpeg_decode(codec: str, data: bytes) -> np.ndarray:
    """Decode with ffmpeg's pcm_mulaw / pcm_alaw decoders."""
    fmt = "mulaw" if codec == "PCMU" else "alaw"
    out = subprocess.run(
        [
            shutil.which("ffmpeg") or "ffmpeg",
            "-v",
            "error",
            "-f",
            fmt,
            "-ar",
            "8000",
            "-ac",
            "1",
            "-i",
            "pipe:0",
            "-f",
            "s16le",
            "-acodec",
            "pcm_s16le",
            "pipe:1",
        ],
        input=data,
        capture_output=True,
        check=True,
    ).stdout
    return np.frombuffer(out, dtype="<i2").astype(np.int16)


# -- Opus and G.722: real encoders and the Debian ffmpeg CLI's decoders ------------------------

#: The test signal every codec test encodes: a wavering tone over pink noise, well below full
#: scale (libopus's int16 output soft-clips near it, FFmpeg's float path does not).
LAVFI_SIGNAL = (
    "sine=frequency=330:sample_rate={rate}:duration={seconds},volume=0.3[a];"
    "anoisesrc=d={seconds}:c=pink:r={rate}:a=0.05[b];[a][b]amix=inputs=2"
)


def _ffmpeg(*args: str, data: bytes | None = None) -> bytes:
    command = [shutil.which("ffmpeg") or "ffmpeg", "-hide_banner", "-v", "error", *args]
    return subprocess.run(command, input=data, capture_output=True, check=True).stdout


def ffmpeg_encode_ogg_opus(seconds: float, bitrate: str = "24k", channels: int = 1) -> bytes:
    """An Ogg Opus file made by ffmpeg's libopus encoder, 20 ms packets (stereo: the tone on
    the left, the noise on the right)."""
    graph = LAVFI_SIGNAL.format(rate=48000, seconds=seconds)
    if channels == 2:
        graph = graph.replace("amix=inputs=2", "join=inputs=2:channel_layout=stereo")
    return _ffmpeg("-filter_complex", graph, "-ac", str(channels), "-c:a", "libopus", "-b:a",
                   bitrate, "-frame_duration", "20", "-f", "ogg", "pipe:1")  # fmt: skip


def ogg_packets(data: bytes) -> list[bytes]:
    """The packets of an Ogg stream (RFC 3533), its two Opus header packets included."""
    packets, current, pos = [], b"", 0
    while pos < len(data):
        assert data[pos : pos + 4] == b"OggS", "not an Ogg page"
        segments = data[pos + 26]
        lacing = data[pos + 27 : pos + 27 + segments]
        body = pos + 27 + segments
        for length in lacing:
            current += data[body : body + length]
            body += length
            if length < 255:
                packets.append(current)
                current = b""
        pos = body
    return packets


def ffmpeg_decode_ogg_opus(data: bytes, channels: int = 1) -> np.ndarray:
    """Every sample ffmpeg's libopus decoder (the system's libopus) makes of an Ogg Opus file at
    48 kHz, int16: nothing trimmed (`skip_manual`: the pre-skip stays, as a tap has no Ogg
    header to say it), int16 straight from libopus (`request_sample_fmt s16`)."""
    decoder = ["-flags2", "skip_manual", "-request_sample_fmt", "s16", "-c:a", "libopus"]
    out = _ffmpeg(*decoder, "-i", "-", "-f", "s16le", "-ac", str(channels), "-", data=data)
    return np.frombuffer(out, dtype="<i2").astype(np.int16)


def ffmpeg_encode_g722(seconds: float) -> bytes:
    """Raw G.722 at 64 kbit/s from ffmpeg's encoder."""
    graph = LAVFI_SIGNAL.format(rate=16000, seconds=seconds)
    return _ffmpeg("-filter_complex", graph, "-ac", "1", "-c:a", "g722", "-f", "g722", "pipe:1")


def ffmpeg_decode_g722(data: bytes) -> np.ndarray:
    """ffmpeg's own G.722 decoder (not libg722): 16 kHz int16."""
    out = _ffmpeg("-f", "g722", "-i", "pipe:0", "-f", "s16le", "pipe:1", data=data)
    return np.frombuffer(out, dtype="<i2").astype(np.int16)
