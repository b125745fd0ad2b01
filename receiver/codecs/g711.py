"""Vectorised G.711 (PCMU / PCMA) codec, built from the ITU-T G.711 / G.191 reference algorithm.

Decoding is one table look-up per pair of samples (`ndarray.take` in a 65 536-entry table of
both samples of every two-byte pair, ~1.3x faster than a look-up per byte), encoding one look-up
in a 65 536-entry table indexed by the int16 sample's bit pattern. numpy costs ~1-2 µs per call
whatever the size, so callers decode whole batches (a second of audio), never single 20 ms
packets.
"""

from __future__ import annotations

import sys

import numpy as np
import numpy.typing as npt

Int16Array = npt.NDArray[np.int16]

PCMU = "PCMU"
PCMA = "PCMA"


def _ulaw_decode_table() -> Int16Array:
    # G.191 ulaw_expand: complement, split sign/segment/mantissa, add the bias, shift, remove bias.
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (u >> 4) & 0x07
    mantissa = u & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(u & 0x80, -magnitude, magnitude).astype(np.int16)


def _alaw_decode_table() -> Int16Array:
    # G.191 alaw_expand: undo the even-bit inversion, then segment 0 is linear, others shifted.
    a = np.arange(256, dtype=np.int32) ^ 0x55
    exponent = (a >> 4) & 0x07
    mantissa = a & 0x0F
    magnitude = np.where(
        exponent == 0,
        (mantissa << 4) + 8,
        ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0),
    )
    return np.where(a & 0x80, magnitude, -magnitude).astype(np.int16)


def _segment(magnitude: npt.NDArray[np.int32], first_limit: int) -> npt.NDArray[np.int32]:
    """Number of doublings of `first_limit` needed to reach `magnitude` (the G.711 segment)."""
    segment = np.zeros_like(magnitude)
    limit = first_limit
    for _ in range(7):
        segment += magnitude >= limit
        limit <<= 1
    return segment


def _ulaw_encode_table() -> npt.NDArray[np.uint8]:
    # G.191 ulaw_compress on the 14-bit value: ones' complement magnitude for negatives, + bias 33.
    x = np.arange(65536, dtype=np.int32).astype(np.uint16).view(np.int16).astype(np.int32)
    absno = np.where(x < 0, (~x) >> 2, x >> 2) + 33
    absno = np.minimum(absno, 0x1FFF)
    segno = _segment(absno, 64) + 1
    high = 8 - segno
    low = 0x0F - ((absno >> segno) & 0x0F)
    code = (high << 4) | low
    table: npt.NDArray[np.uint8] = np.where(x >= 0, code | 0x80, code).astype(np.uint8)
    return table


def _alaw_encode_table() -> npt.NDArray[np.uint8]:
    # G.191 alaw_compress on the 12-bit ones' complement magnitude, then the even-bit inversion.
    x = np.arange(65536, dtype=np.int32).astype(np.uint16).view(np.int16).astype(np.int32)
    ix = np.where(x < 0, (~x) >> 4, x >> 4)
    shift = _segment(ix, 32)  # segments 2.. halve the magnitude until it fits 16..31
    code = np.where(ix > 15, ((ix >> shift) - 16) + ((shift + 1) << 4), ix)
    code = np.where(x >= 0, code | 0x80, code)
    return (code ^ 0x55).astype(np.uint8)


def _pair_table(table: Int16Array) -> npt.NDArray[np.uint32]:
    """Two bytes read as one native uint16 -> their two samples as one uint32, laid out so that
    the result viewed as int16 is the samples in byte order."""
    pair = np.arange(65536, dtype=np.uint32)
    low, high = pair & 0xFF, pair >> 8
    first, second = (low, high) if sys.byteorder == "little" else (high, low)
    samples = np.empty((65536, 2), dtype=np.int16)
    samples[:, 0], samples[:, 1] = table[first], table[second]
    return samples.view(np.uint32)[:, 0].copy()


_DECODE = {PCMU: _ulaw_decode_table(), PCMA: _alaw_decode_table()}
_DECODE_PAIRS = {codec: _pair_table(table) for codec, table in _DECODE.items()}
_ENCODE = {PCMU: _ulaw_encode_table(), PCMA: _alaw_encode_table()}
_TABLES: list[np.ndarray] = [*_DECODE.values(), *_DECODE_PAIRS.values(), *_ENCODE.values()]
for _table in _TABLES:
    _table.flags.writeable = False


def decode(codec: str, data: bytes | bytearray | memoryview) -> Int16Array:
    """G.711 bytes -> int16 samples, one sample per byte."""
    codes = np.frombuffer(data, dtype=np.uint8)
    if len(codes) & 1 or len(codes) < 64:  # odd (rare), or short: a look-up per byte
        return _DECODE[codec].take(codes)
    samples: Int16Array = _DECODE_PAIRS[codec].take(codes.view(np.uint16)).view(np.int16)
    return samples


def encode(codec: str, samples: npt.ArrayLike) -> bytes:
    """int16 samples -> G.711 bytes."""
    pcm = np.ascontiguousarray(samples, dtype=np.int16)
    return bytes(_ENCODE[codec].take(pcm.view(np.uint16)))
