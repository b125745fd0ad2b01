"""What is in a recording: levels, clipping, silence, waveform peaks and a spectrogram.

Everything here is synchronous numpy over a memory-mapped file, read in blocks so a 4 GiB
recording never sits in memory at once; callers on the event loop run it in an executor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile

from receiver.inspect.png import encode_rgb
from receiver.storage.files import open_regular
from receiver.storage.wav_header import WavError, WavLayout, frames_in_file

FULL_SCALE = 32768.0
BLOCK_SAMPLES = 1 << 20  # samples (all channels) per block when scanning a whole file
MAX_WAVEFORM_POINTS = 40_000  # columns x channels: 10 000 columns of a stereo file
MAX_FFT = 4096  # the spectrogram's window, whatever rate the header claims
MAX_DECODED_BYTES = 64 << 20  # a non-PCM16 file is decoded in memory only up to this
DEFAULT_SILENCE_DBFS = -60.0
MIN_SILENCE_SECONDS = 0.02  # shorter runs (a sine's zero crossing) are not silence
SPECTROGRAM_FLOOR_DB = -100.0
SPECTROGRAM_TOP_DB = -20.0
WINDOWS_PER_COLUMN = 4


@dataclass(frozen=True, slots=True)
class Audio:
    """A WAV's audio as int16 frames of shape (frames, channels); memory-mapped for PCM16."""

    path: Path
    layout: WavLayout
    samples: np.ndarray

    @property
    def frames(self) -> int:
        return int(self.samples.shape[0])

    @property
    def sample_rate(self) -> int:
        return self.layout.sample_rate

    @property
    def channels(self) -> int:
        return self.layout.channels

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def open_audio(path: Path) -> Audio:
    """The frames that are really on disk: the declared data size, or less if the file is
    shorter (a file being recorded, or cut short). Raises WavError or OSError."""
    with open_regular(path) as fh:  # a link is not followed, a fifo not waited on
        layout, frames = frames_in_file(fh)
        shape = (frames, layout.channels)
        if layout.is_pcm16:
            if frames == 0:
                return Audio(path, layout, np.zeros(shape, dtype=np.int16))
            samples = np.memmap(fh, dtype="<i2", mode="r", offset=layout.data_offset, shape=shape)
            return Audio(path, layout, samples)
        # other encodings (24-bit, float, G.711 WAVs from other tools): decoded in memory, so
        # only up to a bound (memory per request must not follow what a header says)
        if frames * layout.channels * 2 > MAX_DECODED_BYTES:
            raise WavError(
                f"{layout.format_name}: {frames} frames are too many to decode for inspection "
                f"(at most {MAX_DECODED_BYTES >> 20} MiB as 16-bit); convert it to 16-bit PCM"
            )
        try:
            data, _ = soundfile.read(fh, dtype="int16", always_2d=True)
        except (soundfile.LibsndfileError, RuntimeError) as exc:
            raise WavError(f"cannot decode {layout.format_name}: {exc}") from None
    return Audio(path, layout, np.ascontiguousarray(data, dtype=np.int16))


def dbfs(amplitude: float) -> float:
    """Relative to digital full scale (32768); -inf for digital silence."""
    return 20.0 * math.log10(amplitude / FULL_SCALE) if amplitude > 0 else -math.inf


def _finite(value: float) -> float | None:
    return round(value, 2) if math.isfinite(value) else None


@dataclass(frozen=True, slots=True)
class ChannelLevels:
    peak: int  # largest |sample|
    rms: float  # in sample units
    clipped: int  # samples at full scale (-32768 or 32767)

    @property
    def peak_dbfs(self) -> float:
        return dbfs(self.peak)

    @property
    def rms_dbfs(self) -> float:
        return dbfs(self.rms)


@dataclass(frozen=True, slots=True)
class Levels:
    frames: int
    sample_rate: int
    channels: list[ChannelLevels]
    silence_threshold_dbfs: float
    longest_silence_start: int  # frame; both 0 when nothing is below the threshold
    longest_silence_frames: int

    def to_dict(self) -> dict[str, Any]:
        rate = self.sample_rate
        return {
            "frames": self.frames,
            "duration_seconds": round(self.frames / rate, 6),
            "channels": [
                {
                    "peak": c.peak,
                    "peak_dbfs": _finite(c.peak_dbfs),
                    "rms_dbfs": _finite(c.rms_dbfs),
                    "clipped_samples": c.clipped,
                }
                for c in self.channels
            ],
            "silence_threshold_dbfs": self.silence_threshold_dbfs,
            "longest_silence": {
                "start_seconds": round(self.longest_silence_start / rate, 6),
                "duration_seconds": round(self.longest_silence_frames / rate, 6),
            },
        }


class _LongestRun:
    """The longest run of True across consecutive blocks of a boolean series."""

    def __init__(self) -> None:
        self.start = 0
        self.length = 0
        self._open: int | None = None  # start of a run still going at the end of the last block

    def feed(self, flags: np.ndarray, offset: int) -> None:
        edges = np.diff(np.concatenate(([0], flags.view(np.int8), [0])))
        starts = np.flatnonzero(edges == 1) + offset
        ends = np.flatnonzero(edges == -1) + offset
        if self._open is not None:
            if len(starts) and starts[0] == offset:
                starts[0] = self._open  # the run continues from the previous block
            else:
                self._offer(self._open, offset)
            self._open = None
        if len(ends) and ends[-1] == offset + len(flags):
            self._open = int(starts[-1])  # still going: decided by the next block
            starts, ends = starts[:-1], ends[:-1]
        if len(starts):
            longest = int(np.argmax(ends - starts))
            self._offer(int(starts[longest]), int(ends[longest]))

    def close(self, end: int) -> None:
        if self._open is not None:
            self._offer(self._open, end)
            self._open = None

    def _offer(self, start: int, end: int) -> None:
        if end - start > self.length:  # the earliest of equal runs wins
            self.start, self.length = start, end - start


def measure_levels(audio: Audio, silence_threshold_dbfs: float = DEFAULT_SILENCE_DBFS) -> Levels:
    """Peak, RMS and clipping per channel; the longest stretch (of at least 20 ms) where every
    channel stays at or below the silence threshold."""
    channels = audio.channels
    peak = np.zeros(channels, dtype=np.int64)
    squares = np.zeros(channels, dtype=np.float64)
    clipped = np.zeros(channels, dtype=np.int64)
    threshold = FULL_SCALE * 10.0 ** (silence_threshold_dbfs / 20.0)
    silence = _LongestRun()
    step = block_frames(channels)
    for offset in range(0, audio.frames, step):
        block = np.asarray(audio.samples[offset : offset + step]).astype(np.int32)
        magnitude = np.abs(block)
        peak = np.maximum(peak, magnitude.max(axis=0))
        squares += np.einsum("ij,ij->j", block, block, dtype=np.float64)
        clipped += np.count_nonzero((block >= 32767) | (block <= -32768), axis=0)
        silence.feed(np.all(magnitude <= threshold, axis=1), offset)
    silence.close(audio.frames)
    if silence.length < MIN_SILENCE_SECONDS * audio.sample_rate:
        silence.start = silence.length = 0
    n = max(audio.frames, 1)
    per_channel = [
        ChannelLevels(int(peak[c]), math.sqrt(squares[c] / n), int(clipped[c]))
        for c in range(channels)
    ]
    return Levels(
        audio.frames, audio.sample_rate, per_channel, silence_threshold_dbfs,
        silence.start, silence.length,
    )  # fmt: skip


def block_frames(channels: int) -> int:
    """Frames per block: BLOCK_SAMPLES in all, however many channels."""
    return max(1, BLOCK_SAMPLES // channels)


def column_edges(frames: int, columns: int) -> np.ndarray:
    """First frame of each of `columns` equal pixel columns (plus the end)."""
    return (np.arange(columns + 1, dtype=np.int64) * frames) // columns


def waveform_peaks(audio: Audio, columns: int) -> tuple[np.ndarray, np.ndarray]:
    """Min and max sample per pixel column, shape (channels, columns) each. A recording shorter
    than `columns` frames gets one column per frame; one with many channels gets fewer columns
    (MAX_WAVEFORM_POINTS in all)."""
    columns = min(columns, audio.frames, max(1, MAX_WAVEFORM_POINTS // audio.channels))
    lows = np.zeros((audio.channels, columns), dtype=np.int16)
    highs = np.zeros((audio.channels, columns), dtype=np.int16)
    if columns == 0:
        return lows, highs
    edges = column_edges(audio.frames, columns)
    step = max(1, block_frames(audio.channels) * columns // audio.frames)  # columns per block
    for first in range(0, columns, step):
        last = min(columns, first + step)
        block = np.asarray(audio.samples[edges[first] : edges[last]])
        starts = edges[first:last] - edges[first]
        lows[:, first:last] = np.minimum.reduceat(block, starts, axis=0).T
        highs[:, first:last] = np.maximum.reduceat(block, starts, axis=0).T
    return lows, highs


def fft_size(sample_rate: int) -> int:
    """A power of two near 32 ms: 256 at 8 kHz (31 Hz bins), 512 at 16 kHz; at most MAX_FFT."""
    return min(MAX_FFT, int(2 ** round(math.log2(max(64, sample_rate * 0.032)))))


def spectrogram_db(audio: Audio, columns: int, rows: int) -> np.ndarray:
    """Level in dB relative to a full-scale sine, shape (channels, rows, columns), row 0 the
    highest frequency. Each column averages the power of a few Hann windows spread over it."""
    n = fft_size(audio.sample_rate)
    out = np.full((audio.channels, rows, columns), -np.inf, dtype=np.float64)
    if audio.frames == 0:
        return out
    edges = column_edges(audio.frames, columns).astype(np.float64)
    spans = np.diff(edges)
    k = (np.arange(WINDOWS_PER_COLUMN) + 0.5) / WINDOWS_PER_COLUMN
    centres = edges[:-1, None] + spans[:, None] * k
    starts = np.clip(np.round(centres - n / 2), 0, max(0, audio.frames - n)).astype(np.int64)
    window = np.hanning(n)
    scale = (window.sum() / 2) * FULL_SCALE  # a full-scale sine peaks at 1.0 in its bin
    bins = n // 2 + 1
    band = np.floor(np.linspace(0, bins, rows + 1)[:-1]).astype(np.int64)
    step = max(1, BLOCK_SAMPLES // (n * WINDOWS_PER_COLUMN))  # columns per block: ~1M samples
    for first in range(0, columns, step):
        last = min(columns, first + step)
        index = starts[first:last].reshape(-1, 1) + np.arange(n)
        valid = index < audio.frames  # only when the whole file is shorter than one window
        index = np.minimum(index, audio.frames - 1)
        for channel in range(audio.channels):
            segments = np.asarray(audio.samples[:, channel][index], dtype=np.float64) * valid
            spectrum = np.fft.rfft(segments * window, axis=1)
            power = spectrum.real**2 + spectrum.imag**2
            power = power.reshape(last - first, WINDOWS_PER_COLUMN, bins).mean(axis=1)
            per_row = np.maximum.reduceat(power / scale**2, band, axis=1)  # keep narrow tones
            with np.errstate(divide="ignore"):
                out[channel, :, first:last] = (10.0 * np.log10(per_row)).T[::-1]
    return out


# An "inferno"-like ramp: black -> purple -> red -> orange -> pale yellow.
_RAMP = [
    (0.00, (6, 6, 20)),
    (0.18, (40, 11, 84)),
    (0.36, (101, 21, 110)),
    (0.52, (159, 42, 99)),
    (0.68, (212, 72, 66)),
    (0.82, (245, 125, 21)),
    (0.93, (250, 193, 39)),
    (1.00, (252, 255, 164)),
]
_LUT = np.stack(
    [
        np.interp(np.linspace(0, 1, 256), [p for p, _ in _RAMP], [c[i] for _, c in _RAMP])
        for i in range(3)
    ],
    axis=1,
).astype(np.uint8)
_SEPARATOR = np.array([70, 70, 90], dtype=np.uint8)


def spectrogram_png(audio: Audio, columns: int, height: int) -> bytes:
    """The spectrogram as a PNG: channels stacked top to bottom, 2-pixel separators between."""
    channels = audio.channels
    gap = 2
    rows = max(8, (height - gap * (channels - 1)) // channels)
    levels = spectrogram_db(audio, columns, rows)
    span = SPECTROGRAM_TOP_DB - SPECTROGRAM_FLOOR_DB
    parts: list[np.ndarray] = []
    for channel in range(channels):  # one channel at a time: a copy of one, not of all
        scaled = np.clip((levels[channel] - SPECTROGRAM_FLOOR_DB) / span, 0.0, 1.0)
        indices = np.nan_to_num(scaled * 255.0, nan=0.0).astype(np.uint8)
        if channel:
            parts.append(np.broadcast_to(_SEPARATOR, (gap, columns, 3)))
        parts.append(_LUT[indices])
    return encode_rgb(np.ascontiguousarray(np.concatenate(parts, axis=0)))
