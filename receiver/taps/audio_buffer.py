"""A tap's not-yet-written audio, kept as cheap runs of raw bytes until a batch is written.

Appending is a list append (no numpy per packet); rendering turns a whole batch into int16 samples
with one vectorised decode per run, in the writer thread. `AudioBuffer` holds one stream (mono, or
interleaved L16 channels); `ChannelBuffer` holds one mono buffer per channel, for sources whose
channels arrive separately (Media Streams inbound/outbound tracks).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from receiver.codecs.encoding import Encoding


class Run:
    """Consecutive audio of one encoding (its byte chunks), or silence (`encoding` None)."""

    __slots__ = ("chunks", "encoding", "silence")

    def __init__(self, encoding: Encoding | None, chunks: list[bytes], silence: int = 0) -> None:
        self.encoding = encoding
        self.chunks = chunks
        self.silence = silence  # frames, for a run of silence


class AudioBuffer:
    """Pending audio of one tap, in arrival order of the timeline."""

    __slots__ = ("_last", "_runs", "channels", "frames")

    def __init__(self, channels: int = 1) -> None:
        self.channels = channels
        self.frames = 0  # frames appended over the buffer's life (written or pending)
        self._runs: list[Run] = []
        self._last: Run | None = None

    def append(self, encoding: Encoding, data: bytes) -> None:
        """Append encoded audio (whole frames only)."""
        if not data:
            return
        last = self._last
        if last is not None and last.encoding is encoding:
            last.chunks.append(data)
        else:
            self._last = Run(encoding, [data])
            self._runs.append(self._last)
        if encoding.bytes_per_sample == 2:
            self.frames += len(data) // (2 * self.channels)
        else:
            self.frames += len(data)

    def append_silence(self, frames: int) -> None:
        if frames <= 0:
            return
        last = self._last
        if last is not None and last.encoding is None:
            last.silence += frames
        else:
            self._last = Run(None, [], frames)
            self._runs.append(self._last)
        self.frames += frames

    @property
    def pending(self) -> bool:
        return bool(self._runs)

    def take(self) -> Pending:
        """Hand over everything pending (the writer renders it off the event loop)."""
        runs, self._runs, self._last = self._runs, [], None
        return Pending([runs], self.channels)


class ChannelBuffer:
    """One mono AudioBuffer per channel; the channels are interleaved when written."""

    __slots__ = ("channel_buffers", "channels")

    def __init__(self, channels: int) -> None:
        self.channels = channels
        self.channel_buffers = [AudioBuffer(1) for _ in range(channels)]

    @property
    def frames(self) -> int:
        return max(b.frames for b in self.channel_buffers)

    @property
    def pending(self) -> bool:
        return any(b.pending for b in self.channel_buffers)

    def take(self) -> Pending:
        return Pending([b.take().runs[0] for b in self.channel_buffers], 1)


class Pending:
    """A batch taken from a buffer: runs of one interleaved stream, or of one stream per channel."""

    __slots__ = ("interleaved_channels", "runs")

    def __init__(self, runs: list[list[Run]], interleaved_channels: int) -> None:
        self.runs = runs
        self.interleaved_channels = interleaved_channels

    def __bool__(self) -> bool:
        return any(self.runs)

    def encoded(self) -> Iterator[tuple[Encoding, bytes]]:
        """The encoded audio as it came, a run at a time (silence left out)."""
        for runs in self.runs:
            for run in runs:
                if run.encoding is not None:
                    yield run.encoding, b"".join(run.chunks)

    def render(self) -> list[np.ndarray]:
        """One int16 array per channel (the channels may differ in length)."""
        if len(self.runs) > 1:
            return [render(runs, 1)[:, 0] for runs in self.runs]
        frames = render(self.runs[0], self.interleaved_channels)
        return [frames[:, c] for c in range(self.interleaved_channels)]


def render(runs: list[Run], channels: int = 1) -> np.ndarray:
    """Runs -> int16 array of shape (frames, channels). One numpy call per run."""
    parts: list[np.ndarray] = []
    for run in runs:
        if run.encoding is None:
            parts.append(np.zeros(run.silence * channels, dtype=np.int16))
        else:
            parts.append(run.encoding.decode(b"".join(run.chunks)))
    if not parts:
        return np.zeros((0, channels), dtype=np.int16)
    samples = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return samples.astype(np.int16, copy=False).reshape(-1, channels)
