"""The encodings a tap can carry, and the one table of the names senders give them.

`Encoding` members are strings ("PCMU", "PCMA", "L16", "L16BE"), so they go into sidecars and
logs as they are. Each knows its bytes per sample and how to decode a batch to int16 samples
(G.711 through the vectorised table codec in `receiver.codecs.g711`).
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np

from receiver.codecs import g711


class Encoding(StrEnum):
    PCMU = "PCMU"  # G.711 µ-law, one byte per sample
    PCMA = "PCMA"  # G.711 A-law
    L16 = "L16"  # 16-bit linear PCM, little-endian, interleaved channels
    L16BE = "L16BE"  # the same in network byte order (RFC 3551 L16)

    @property
    def bytes_per_sample(self) -> int:
        return 2 if self in (Encoding.L16, Encoding.L16BE) else 1

    @property
    def is_g711(self) -> bool:
        return self in (Encoding.PCMU, Encoding.PCMA)

    @property
    def mime(self) -> str:
        return _MIME[self]

    def decode(self, data: bytes) -> np.ndarray:
        """Encoded bytes (whole samples) -> int16 samples, interleaved as they came."""
        if self is Encoding.L16:
            return np.frombuffer(data, dtype="<i2")
        if self is Encoding.L16BE:
            return np.frombuffer(data, dtype=">i2").astype(np.int16)
        return g711.decode(self.value, data)


_MIME = {
    Encoding.PCMU: "audio/mulaw",
    Encoding.PCMA: "audio/alaw",
    Encoding.L16: "audio/l16",
    Encoding.L16BE: "audio/l16",
}

# Every name a sender uses for an encoding (content types, Media Streams `mediaFormat.encoding`,
# query strings), lower case. L16 is little-endian here: where a protocol says otherwise the
# dialect chooses L16BE.
NAMES: dict[str, Encoding] = {
    "audio/mulaw": Encoding.PCMU,
    "audio/x-mulaw": Encoding.PCMU,
    "audio/ulaw": Encoding.PCMU,
    "audio/x-ulaw": Encoding.PCMU,
    "audio/pcmu": Encoding.PCMU,
    "audio/basic": Encoding.PCMU,
    "pcmu": Encoding.PCMU,
    "audio/alaw": Encoding.PCMA,
    "audio/x-alaw": Encoding.PCMA,
    "audio/pcma": Encoding.PCMA,
    "pcma": Encoding.PCMA,
    "audio/l16": Encoding.L16,
    "audio/x-l16": Encoding.L16,
    "l16": Encoding.L16,
}


def encoding_named(name: str) -> Encoding | None:
    return NAMES.get(name.strip().lower())
