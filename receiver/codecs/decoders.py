"""One decoder interface for every encoding a tap can carry: encoded audio in, int16 out.

A `Decoder` belongs to one stream of one tap and keeps that stream's state from batch to batch
(Opus and G.722 are stateful). It decodes a whole batch at a time, in the disk writer (off the
event loop), and fills audio that never came (`conceal`): Opus with libopus's own packet loss
concealment, the others with digital silence.

* G.711 (PCMU, PCMA) and L16: the vectorised numpy paths of `Encoding.decode`, stateless.
* Opus: libopus through `opuslib-next` (ctypes; the system's libopus, e.g. Debian `libopus0`).
  Decoded at the tap's rate (8, 12, 16, 24 or 48 kHz) natively, one `opus_decode` per packet
  straight into the batch's array. A packet libopus rejects is counted and concealed. Lost
  audio is libopus's packet loss concealment (PLC). In-band FEC (LBRR data in the packet after
  a loss) is not used: it needs that next packet before the lost one is rendered, which a loss
  at the end of a batch does not have; PLC keeps every batch self-contained and the file's
  length exact either way.
* G.722: `G722` (sippy's libg722, the ITU-T reference algorithm as in spandsp), 64 kbit/s, to
  16 kHz. Its output is equal to FFmpeg's `g722` decoder sample for sample (tests); the ITU-T
  test vectors could not be had here, libg722 states that it passes them.

Why these libraries and not PyAV (which bundles FFmpeg's decoders): PyAV's wheel is ~36 MB
(~100 MB installed) and bundles a GPL build of FFmpeg (x264, x265); FFmpeg's libopus wrapper
always decodes at 48 kHz and exposes neither libopus's concealment nor its FEC. libopus through a
thin binding decodes at any Opus rate and conceals losses itself, and with the system's libopus
it is the very library Debian's `ffmpeg -c:a libopus` uses: the tests compare against it bit
for bit. Both bindings are tiny (opuslib-next is BSD, libg722 public domain).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from receiver.codecs.encoding import Encoding
from receiver.codecs.opus_packet import (
    MAX_PACKET_SAMPLES,
    OpusPacketError,
    packet_samples,
    samples_at,
)

OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
G722_RATE = 16000
# Concealment fills at most this much of one gap with libopus's PLC (it fades to silence within
# a few frames anyway); the rest of a long gap (a sender's DTX, a pause) is digital silence.
MAX_CONCEAL_SECONDS = 1.0
_INT16_P = ctypes.POINTER(ctypes.c_int16)


class Decoder(Protocol):
    encoding: Encoding
    #: How audio that never came is filled: "silence" or "opus-plc" (the sidecar says which).
    concealment: str
    corrupt_packets: int  # packets the codec could not decode (concealed)
    concealed_frames: int  # frames filled by `conceal` (and for corrupt packets)

    def decode(self, chunks: list[bytes]) -> np.ndarray:
        """A run of encoded audio (G.711/L16/G.722: byte chunks; Opus: one packet per chunk)
        -> int16 samples, channels interleaved."""
        ...

    def conceal(self, frames: int) -> np.ndarray:
        """`frames` of audio that were lost -> int16 samples, channels interleaved."""
        ...


@dataclass(eq=False)
class TableDecoder:
    """G.711 and L16: stateless, one vectorised numpy call per run."""

    encoding: Encoding
    channels: int = 1
    concealment: str = "silence"
    corrupt_packets: int = 0
    concealed_frames: int = 0

    def decode(self, chunks: list[bytes]) -> np.ndarray:
        return self.encoding.decode(b"".join(chunks))

    def conceal(self, frames: int) -> np.ndarray:
        self.concealed_frames += frames
        return np.zeros(frames * self.channels, dtype=np.int16)


@dataclass(eq=False)
class G722Decoder:
    """G.722 at 64 kbit/s to 16 kHz mono; stateful (ADPCM)."""

    encoding: Encoding = Encoding.G722
    concealment: str = "silence"
    corrupt_packets: int = 0  # every byte string is valid G.722
    concealed_frames: int = 0
    _codec: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        import G722

        self._codec = G722.G722(G722_RATE, 64000)

    def decode(self, chunks: list[bytes]) -> np.ndarray:
        return np.frombuffer(self._codec.decode(b"".join(chunks)), dtype=np.int16)

    def conceal(self, frames: int) -> np.ndarray:
        self.concealed_frames += frames
        return np.zeros(frames, dtype=np.int16)


def _libopus() -> Any:
    """opuslib-next's handle on libopus (imported on first use: a server without Opus taps
    needs no libopus)."""
    from opuslib_next.api import decoder

    return decoder


@dataclass(eq=False)
class OpusDecoder:
    """One libopus decoder state at `rate` with `channels`."""

    rate: int
    channels: int = 1
    encoding: Encoding = Encoding.OPUS
    concealment: str = "opus-plc"
    corrupt_packets: int = 0
    concealed_frames: int = 0
    _state: Any = field(default=None, repr=False)
    _decode: Any = field(default=None, repr=False)
    _last_frames: int = 0

    def __post_init__(self) -> None:
        api = _libopus()
        self._state = api.create_state(self.rate, self.channels)
        self._decode = api.libopus_decode
        self._last_frames = self.rate // 50  # 20 ms until a packet says otherwise

    def __del__(self) -> None:
        state = getattr(self, "_state", None)
        if state is not None:
            _libopus().destroy(state)

    def decode(self, chunks: list[bytes]) -> np.ndarray:
        channels, rate = self.channels, self.rate
        lengths = []
        for packet in chunks:
            try:
                lengths.append(samples_at(packet_samples(packet), rate))
            except OpusPacketError:  # the event loop counted it already: conceal its time
                lengths.append(-1)
        known = sum(n if n >= 0 else self._last_frames for n in lengths)
        out = np.empty((known + samples_at(MAX_PACKET_SAMPLES, rate)) * channels, np.int16)
        base = out.ctypes.data
        position = 0
        for packet, frames in zip(chunks, lengths, strict=True):
            if frames < 0:
                position += self._plc(base, position, self._last_frames)
                self.corrupt_packets += 1
                continue
            pointer = ctypes.cast(base + position * channels * 2, _INT16_P)
            n = self._decode(self._state, packet, len(packet), pointer, frames, 0)
            if n < 0:  # rejected by libopus (a corrupt body): conceal the time it covers
                self.corrupt_packets += 1
                position += self._plc(base, position, frames)
                continue
            position += n
            self._last_frames = n
        return out[: position * channels]

    def _plc(self, base: int, position: int, frames: int) -> int:
        """libopus's concealment of `frames` at `position` of the output; frames written."""
        done = 0
        while done < frames:
            step = min(frames - done, samples_at(MAX_PACKET_SAMPLES, self.rate))
            pointer = ctypes.cast(base + (position + done) * self.channels * 2, _INT16_P)
            n = self._decode(self._state, None, 0, pointer, step, 0)
            if n <= 0:
                ctypes.memset(pointer, 0, step * self.channels * 2)
                n = step
            done += n
        self.concealed_frames += done
        return done

    def conceal(self, frames: int) -> np.ndarray:
        out = np.zeros(frames * self.channels, np.int16)
        plc = min(frames, round(MAX_CONCEAL_SECONDS * self.rate))
        plc -= plc % (self.rate // 400)  # libopus conceals whole 2.5 ms steps
        if plc > 0:
            self._plc(out.ctypes.data, 0, plc)
        self.concealed_frames += frames - plc
        return out


def new_decoder(encoding: Encoding, rate: int, channels: int) -> Decoder:
    if encoding is Encoding.OPUS:
        return OpusDecoder(rate, channels)
    if encoding is Encoding.G722:
        return G722Decoder()
    return TableDecoder(encoding, channels)


class StreamDecoders:
    """The decoders of one tap's streams (one per channel buffer, or one for an interleaved
    stream), kept by the disk writer with the tap's files; handed to the next file when a tap
    is split into segments, so the codec state goes on."""

    __slots__ = ("_decoders", "rate")

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._decoders: dict[tuple[int, Encoding, int], Decoder] = {}

    def get(self, stream: int, encoding: Encoding, channels: int) -> Decoder:
        key = (stream, encoding, channels)
        decoder = self._decoders.get(key)
        if decoder is None:
            decoder = self._decoders[key] = new_decoder(encoding, self.rate, channels)
        return decoder

    def summary(self) -> dict[str, Any] | None:
        """The sidecar's `decoding` block, for taps with a stateful codec (None otherwise)."""
        stateful = [d for d in self._decoders.values() if not isinstance(d, TableDecoder)]
        if not stateful:
            return None
        return {
            "concealment": sorted({d.concealment for d in stateful})[0],
            "concealed_frames": sum(d.concealed_frames for d in stateful),
            "corrupt_packets": sum(d.corrupt_packets for d in stateful),
        }
