"""What `tap-receiver send` plays: a WAV file, a tone, or a speech-like signal, as 16-bit PCM at
the rate the wire wants (8 kHz for G.711), one column per channel.

The speech-like signal is deterministic for a seed: syllables of a voiced sound (harmonics of a
gliding pitch, shaped by the formants of a few vowels) with pauses between words, so waveform,
spectrogram and levels on the page look like a call rather than a test tone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import soundfile

Pcm = npt.NDArray[np.int16]  # shape (frames, channels)

#: Formant frequencies and bandwidths (Hz) of a few vowels, roughly as spoken by an adult.
VOWELS = (
    ((730, 90), (1090, 110), (2440, 170)),  # a
    ((270, 60), (2290, 100), (3010, 150)),  # i
    ((300, 60), (870, 90), (2240, 150)),  # u
    ((530, 70), (1840, 100), (2480, 150)),  # e
    ((570, 80), (840, 90), (2410, 160)),  # o
)


class SignalError(ValueError):
    """A WAV that cannot be read or used: the message is one line for the user."""


def to_int16(samples: npt.NDArray[np.float64]) -> Pcm:
    """Float samples in [-1, 1] -> int16, clipped."""
    return np.clip(np.round(samples * 32767.0), -32768, 32767).astype(np.int16)


def tone(frequency: float, seconds: float, rate: int = 8000, dbfs: float = -12.0) -> Pcm:
    t = np.arange(round(seconds * rate)) / rate
    amplitude = 10 ** (dbfs / 20)
    return to_int16(amplitude * np.sin(2 * np.pi * frequency * t))[:, None]


def speech_like(seconds: float, seed: int = 1, rate: int = 8000) -> Pcm:
    """Syllables of voiced sound between pauses, about -20 dBFS RMS while voiced."""
    rng = np.random.default_rng(seed)
    total = round(seconds * rate)
    out = np.zeros(total)
    position = round(rng.uniform(0.05, 0.2) * rate)
    base_pitch = rng.uniform(100, 210)
    while position < total:
        syllables = int(rng.integers(1, 5))  # a word
        for _ in range(syllables):
            length = round(rng.uniform(0.12, 0.3) * rate)
            end = min(total, position + length)
            if end <= position:
                break
            out[position:end] += _syllable(end - position, rate, base_pitch, rng)
            position = end + round(rng.uniform(0.0, 0.04) * rate)
        position += round(rng.uniform(0.12, 0.45) * rate)  # the pause between words
    peak = float(np.max(np.abs(out))) or 1.0
    return to_int16(out * (0.5 / peak))[:, None]


def _syllable(
    length: int, rate: int, base_pitch: float, rng: np.random.Generator
) -> npt.NDArray[np.float64]:
    t = np.arange(length) / rate
    pitch = base_pitch * (1 + rng.uniform(-0.15, 0.15) + rng.uniform(-0.1, 0.1) * t / t[-1])
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    formants = VOWELS[int(rng.integers(len(VOWELS)))]
    voiced = np.zeros(length)
    for k in range(1, int((rate / 2 - 200) // float(pitch.max())) + 1):
        f = k * pitch
        gain = sum(1.0 / (1.0 + ((f - fc) / bw) ** 2) for fc, bw in formants) / k**0.5
        voiced += gain * np.sin(k * phase)
    envelope = np.sin(np.pi * np.arange(length) / length) ** 0.6  # rise and fall
    breath = rng.normal(0, 0.02, length)  # a little noise, as a microphone hears
    return (voiced + breath) * envelope


def resample(samples: npt.NDArray[np.float64], rate: int, target: int) -> npt.NDArray[np.float64]:
    """Band-limited resampling of whole columns (FFT: exact for these short files)."""
    if rate == target:
        return samples
    frames = samples.shape[0]
    out_frames = round(frames * target / rate)
    spectrum = np.fft.rfft(samples, axis=0)
    keep = min(spectrum.shape[0], out_frames // 2 + 1)
    resized = np.zeros((out_frames // 2 + 1, samples.shape[1]), dtype=complex)
    resized[:keep] = spectrum[:keep]
    result: npt.NDArray[np.float64] = np.fft.irfft(resized, n=out_frames, axis=0)
    result *= out_frames / frames
    return result


def read_wav(path: Path, rate: int, channels: int, max_seconds: float | None = None) -> Pcm:
    """A sound file as int16 at `rate` with `channels` columns: resampled when its rate differs,
    mixed down to one channel, or its one channel repeated. Raises SignalError."""
    if not path.is_file():
        raise SignalError(f"no sound file {str(path)!r}")
    try:
        info = soundfile.info(str(path))
        frames = info.frames
        if max_seconds is not None:
            frames = min(frames, round(max_seconds * info.samplerate))
        data, file_rate = soundfile.read(str(path), frames=frames, dtype="float64", always_2d=True)
    except (OSError, RuntimeError, soundfile.LibsndfileError) as exc:
        raise SignalError(f"cannot read {path}: {exc}") from None
    if data.shape[0] == 0:
        raise SignalError(f"{path} holds no audio")
    data = resample(data, int(file_rate), rate)
    have = data.shape[1]
    if channels == 1 and have > 1:
        data = data.mean(axis=1, keepdims=True)  # mixed down
    elif have == 1 and channels > 1:
        data = np.repeat(data, channels, axis=1)
    elif have > channels:
        data = data[:, :channels]
    return to_int16(data)
