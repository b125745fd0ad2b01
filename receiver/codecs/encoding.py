"""The encodings a tap can carry, and the one table of the names senders give them.

`Encoding` members are strings ("PCMU", "PCMA", "L16", "L16BE", "OPUS", "G722"), so they go into
sidecars and logs as they are. The stateless ones (G.711, L16) decode a batch to int16 samples
here (G.711 through the vectorised table codec in `receiver.codecs.g711`); every encoding is
decoded through `receiver.codecs.decoders`, which keeps the state of Opus and G.722.
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
    OPUS = "OPUS"  # Opus (RFC 6716), one packet at a time
    G722 = "G722"  # G.722 at 64 kbit/s: one byte = two samples at 16 kHz

    @property
    def is_packetized(self) -> bool:
        """Packets that must stay whole (Opus), not a byte stream cut anywhere."""
        return self is Encoding.OPUS

    @property
    def frames_per_byte(self) -> float:
        """Samples (of one channel) per encoded byte, for the byte-stream encodings."""
        return _FRAMES_PER_BYTE[self]

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
        """Encoded bytes (whole samples) -> int16 samples, interleaved as they came. The
        stateless encodings only (G.711, L16); see receiver.codecs.decoders for all."""
        if self is Encoding.L16:
            return np.frombuffer(data, dtype="<i2")
        if self is Encoding.L16BE:
            return np.frombuffer(data, dtype=">i2").astype(np.int16)
        if self.is_g711:
            return g711.decode(self.value, data)
        raise ValueError(f"{self.value} is stateful: see receiver.codecs.decoders")


_MIME = {
    Encoding.PCMU: "audio/mulaw",
    Encoding.PCMA: "audio/alaw",
    Encoding.L16: "audio/l16",
    Encoding.L16BE: "audio/l16",
    Encoding.OPUS: "audio/opus",
    Encoding.G722: "audio/G722",
}
_FRAMES_PER_BYTE = {
    Encoding.PCMU: 1.0,
    Encoding.PCMA: 1.0,
    Encoding.L16: 0.5,
    Encoding.L16BE: 0.5,
    Encoding.OPUS: 0.0,  # packetized: a packet's TOC says how long it plays
    Encoding.G722: 2.0,
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
    "audio/opus": Encoding.OPUS,
    "audio/x-opus": Encoding.OPUS,
    "opus": Encoding.OPUS,
    "audio/g722": Encoding.G722,
    "g722": Encoding.G722,
}


def encoding_named(name: str) -> Encoding | None:
    return NAMES.get(name.strip().lower())
