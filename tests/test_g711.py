"""The vectorised codec against three independent references: the stdlib C codec (audioop), a
scalar transliteration of ITU-T G.191, and ffmpeg's pcm_mulaw / pcm_alaw decoders."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from receiver.codecs import g711
from tests import reference
from tests.helpers import missing, require_tool

ALL_CODES = bytes(range(256))
ALL_SAMPLES = np.arange(-32768, 32768, dtype=np.int32).astype(np.int16)
LAWS = [("PCMU", reference.g191_ulaw_expand), ("PCMA", reference.g191_alaw_expand)]


@pytest.mark.parametrize(("codec", "expand"), LAWS)
def test_decode_all_codes_equals_g191(codec: str, expand: object) -> None:
    expected = np.array([expand(c) for c in ALL_CODES], dtype=np.int16)  # type: ignore[operator]
    assert np.array_equal(g711.decode(codec, ALL_CODES), expected)


@pytest.mark.parametrize("codec", ["PCMU", "PCMA"])
def test_decode_every_pair_and_every_length_equals_audioop(codec: str) -> None:
    """Batches are decoded a pair of bytes per look-up: every two-byte pair, odd and short
    lengths and data that starts at an odd address decode as audioop decodes them."""
    convert = audioop().ulaw2lin if codec == "PCMU" else audioop().alaw2lin
    every_pair = np.arange(65536, dtype="<u2").tobytes()
    odd_start = memoryview(b"\x00" + every_pair)[1:]
    for data in (every_pair, every_pair[:-1], every_pair[:63], every_pair[:64], odd_start, b""):
        expected = np.frombuffer(convert(bytes(data), 2), dtype="<i2")
        decoded = g711.decode(codec, data)
        assert decoded.dtype == np.int16 and np.array_equal(decoded, expected)


def audioop() -> Any:
    """The stdlib C codec (Python >= 3.13: the audioop-lts test extra)."""
    if reference.audioop is None:
        missing("audioop is not importable (Python >= 3.13 needs audioop-lts, a test extra)")
    return reference.audioop


@pytest.mark.parametrize("codec", ["PCMU", "PCMA"])
def test_decode_all_codes_equals_audioop(codec: str) -> None:
    convert = audioop().ulaw2lin if codec == "PCMU" else audioop().alaw2lin
    expected = np.frombuffer(convert(ALL_CODES, 2), dtype="<i2")
    assert np.array_equal(g711.decode(codec, ALL_CODES), expected)


@pytest.mark.parametrize("codec", ["PCMU", "PCMA"])
def test_decode_all_codes_equals_ffmpeg(codec: str) -> None:
    require_tool("ffmpeg")
    expected = reference.ffmpeg_decode(codec, ALL_CODES)
    assert len(expected) == 256
    assert np.array_equal(g711.decode(codec, ALL_CODES), expected)


def test_known_extremes() -> None:
    # Facts from the G.191 reference (see performance.md): spans and the zero codes.
    u = g711.decode("PCMU", ALL_CODES)
    assert (u[0x00], u[0x80], u[0x7F], u[0xFF]) == (-32124, 32124, 0, 0)
    a = g711.decode("PCMA", ALL_CODES)
    extremes = (a[0xD5], a[0x55], a[0xAA], a[0x2A], a[0x80], a[0x00])
    assert extremes == (8, -8, 32256, -32256, 5504, -5504)
    assert 0 not in a


@pytest.mark.parametrize(
    ("codec", "compress"),
    [("PCMU", reference.g191_ulaw_compress), ("PCMA", reference.g191_alaw_compress)],
)
def test_encode_every_sample_equals_g191(codec: str, compress: object) -> None:
    expected = bytes(compress(int(x)) for x in ALL_SAMPLES)  # type: ignore[operator]
    assert g711.encode(codec, ALL_SAMPLES) == expected


def test_encode_against_audioop() -> None:
    stdlib = audioop()
    pcm = ALL_SAMPLES.tobytes()
    assert g711.encode("PCMA", ALL_SAMPLES) == stdlib.lin2alaw(pcm, 2)
    # audioop's mu-law encoder uses two's complement magnitudes: it differs from G.191 by one
    # code on exactly 508 negative inputs (performance.md). Ours follows G.191.
    ours = np.frombuffer(g711.encode("PCMU", ALL_SAMPLES), dtype=np.uint8)
    theirs = np.frombuffer(stdlib.lin2ulaw(pcm, 2), dtype=np.uint8)
    differ = np.nonzero(ours != theirs)[0]
    assert len(differ) == 508
    assert (ALL_SAMPLES[differ] < 0).all()
    assert (np.abs(ours[differ].astype(int) - theirs[differ].astype(int)) == 1).all()


@pytest.mark.parametrize("codec", ["PCMU", "PCMA"])
def test_round_trip(codec: str) -> None:
    back = g711.encode(codec, g711.decode(codec, ALL_CODES))
    expected = bytearray(ALL_CODES)
    if codec == "PCMU":
        expected[0x7F] = 0xFF  # negative zero decodes to 0, which encodes as positive zero
    assert back == bytes(expected)


def test_large_batch() -> None:
    rng = np.random.default_rng(7)
    data = rng.integers(0, 256, 80_000, dtype=np.uint8).tobytes()
    assert np.array_equal(g711.decode("PCMA", data), reference.decode("PCMA", data))
    assert np.array_equal(g711.decode("PCMU", data), reference.decode("PCMU", data))
