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
