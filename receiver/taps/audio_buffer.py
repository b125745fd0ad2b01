"""A tap's not-yet-written audio, kept as cheap runs of raw bytes until a batch is written.

Appending is a list append (no numpy per packet); rendering turns a whole batch into int16 samples
with one decode per run (vectorised for G.711 and L16), in the disk writer, through the tap's
stream decoders (receiver.codecs.decoders), which keep Opus and G.722 state between batches. Opus
is appended a packet at a time with the frames its TOC says it plays; audio that was lost is
appended as such (`append_lost`) and concealed by the decoder.

`AudioBuffer` holds one stream (mono, or interleaved L16 channels); `ChannelBuffer` holds one mono
buffer per channel, for sources whose channels arrive separately (Media Streams inbound/outbound
tracks).

A `BufferGuard` bounds what a buffer takes: audio that would run further ahead of the wall clock
(since the tap began) than its allowance is dropped, and audio beyond `max_unwritten` seconds
waiting for the disk becomes silence of its length (the file keeps its timeline); both counted.

Live listeners (receiver.live) read a buffer without taking it: `mark` says where its pending
audio ends now, `runs_since` gives what was appended after a mark (runs are only ever appended
to at the end, until `take` hands them all over).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np

from receiver.codecs.decoders import StreamDecoders
from receiver.codecs.encoding import Encoding

_BYTES_PER_SAMPLE = {e: e.bytes_per_sample for e in Encoding}  # a dict look-up: cheaper
_G722 = Encoding.G722
DRIFT = 0.001  # a sender's clock may run this much fast (1000 ppm) before its audio is "ahead"


class BufferGuard:
    """The bounds of one tap's buffers (shared by its channels)."""

    __slots__ = (
        "_per_second",
        "allowance",
        "dropped_ahead",
        "max_unwritten",
        "on_drop",
        "overflow",
        "rate",
        "started",
    )

    def __init__(
        self,
        rate: int,
        allowance: float,
        max_unwritten: float,
        started: float | None = None,
        on_drop: Callable[[str], None] | None = None,
    ) -> None:
        self.rate = rate
        self.allowance = allowance * rate  # frames the audio may lead the wall clock by
        self.max_unwritten = max_unwritten * rate  # frames a buffer may hold unwritten
        self.started = time.monotonic() if started is None else started
        self._per_second = rate * (1.0 + DRIFT)
        self.dropped_ahead = 0  # frames of audio dropped for running ahead of time
        self.overflow = 0  # frames of audio turned into silence: the disk was behind
        self.on_drop = on_drop  # told "ahead" or "overflow" the first time each happens

    def allowed(self, now: float) -> float:
        """Frames of audio a buffer may have taken by `now`."""
        return (now - self.started) * self._per_second + self.allowance

    def ahead_seconds(self, audio_frames: int, now: float) -> float:
        """How far `audio_frames` of audio lead the wall clock since the tap began."""
        return audio_frames / self.rate - (now - self.started)

    def _dropped(self, kind: str, frames: int) -> None:
        first = self.dropped_ahead == 0 if kind == "ahead" else self.overflow == 0
        if kind == "ahead":
            self.dropped_ahead += frames
        else:
            self.overflow += frames
        if first and self.on_drop is not None:
            self.on_drop(kind)


class Run:
    """Consecutive audio of one encoding (its byte chunks; Opus: its packets), or silence
    (`encoding` None), or audio of an encoding that was lost (no chunks; the decoder conceals
    `silence` frames)."""

    __slots__ = ("chunks", "encoding", "silence")

    def __init__(self, encoding: Encoding | None, chunks: list[bytes], silence: int = 0) -> None:
        self.encoding = encoding
        self.chunks = chunks
        self.silence = silence  # frames, for a run of silence or of lost audio

    def __reduce__(self) -> tuple[type[Run], tuple[Encoding | None, list[bytes], int]]:
        # Pickled to the disk writer's process for every tap every flush: a plain tuple of
        # the fields pickles ~3x faster than the default for __slots__ classes.
        return Run, (self.encoding, self.chunks, self.silence)


Mark = tuple[int, int, int, int]  # (takes, runs, chunks of the last run, its silence)


class AudioBuffer:
    """Pending audio of one tap, in arrival order of the timeline."""

    __slots__ = (
        "_last",
        "_runs",
        "_takes",
        "audio_frames",
        "channels",
        "frames",
        "guard",
        "pending_audio",
        "pending_bytes",
    )

    def __init__(self, channels: int = 1, guard: BufferGuard | None = None) -> None:
        self.channels = channels
        self.frames = 0  # frames appended over the buffer's life (written or pending)
        self.audio_frames = 0  # of them audio (not silence)
        self.pending_audio = 0  # audio frames since the last `take`
        self.pending_bytes = 0  # and their encoded bytes
        self.guard = guard
        self._runs: list[Run] = []
        self._last: Run | None = None
        self._takes = 0  # how many times the pending audio was handed over

    def append(self, encoding: Encoding, data: bytes) -> None:
        """Append encoded audio (whole frames only)."""
        if not data:
            return
        if encoding is _G722:
            frames = len(data) * 2
        else:
            frames = len(data) // (_BYTES_PER_SAMPLE[encoding] * self.channels)
        self._append(encoding, data, frames)

    def append_packet(self, encoding: Encoding, packet: bytes, frames: int) -> None:
        """Append one packet (Opus) that plays `frames` frames."""
        self._append(encoding, packet, frames)

    def _append(self, encoding: Encoding, data: bytes, frames: int) -> None:
        guard = self.guard
        if guard is not None:
            if self.audio_frames + frames > guard.allowed(time.monotonic()):
                guard._dropped("ahead", frames)
                return
            if self.pending_audio + frames > guard.max_unwritten:
                guard._dropped("overflow", frames)
                self.append_silence(frames)
                return
        last = self._last
        if last is not None and last.encoding is encoding and not last.silence:
            last.chunks.append(data)
        else:
            self._last = Run(encoding, [data])
            self._runs.append(self._last)
        self.frames += frames
        self.audio_frames += frames
        self.pending_audio += frames
        self.pending_bytes += len(data)

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

    def append_lost(self, encoding: Encoding, frames: int) -> None:
        """`frames` of `encoding` audio that never came: the decoder conceals them (Opus: its
        packet loss concealment; the others: silence)."""
        if frames <= 0:
            return
        if encoding is not Encoding.OPUS:
            self.append_silence(frames)
            return
        last = self._last
        if last is not None and last.encoding is encoding and last.silence:
            last.silence += frames
        else:
            self._last = Run(encoding, [], frames)
            self._runs.append(self._last)
        self.frames += frames

    @property
    def pending(self) -> bool:
        return bool(self._runs)

    def take(self) -> Pending:
        """Hand over everything pending (the writer renders it off the event loop)."""
        runs, self._runs, self._last = self._runs, [], None
        self._takes += 1
        pending = Pending([runs], self.channels, self.pending_bytes)
        self.pending_audio = self.pending_bytes = 0
        return pending

    def ahead_seconds(self, now: float) -> float:
        """How far the audio leads the wall clock (0 without a guard)."""
        return self.guard.ahead_seconds(self.audio_frames, now) if self.guard else 0.0

    def mark(self) -> Mark:
        """Where the pending audio ends now."""
        last = self._last
        if last is None:
            return (self._takes, len(self._runs), 0, 0)
        return (self._takes, len(self._runs), len(last.chunks), last.silence)

    def runs_since(self, mark: Mark) -> tuple[list[Run], Mark]:
        """The audio appended after `mark` (new Run objects; nothing is taken), and the new
        mark. A mark from before a `take` counts as the start of what is pending now: whoever
        reads must do so before each take, or miss what it took."""
        takes, count, chunks, silence = mark
        runs = self._runs
        if takes != self._takes:
            count = chunks = silence = 0
        new: list[Run] = []
        if count:
            grown = runs[count - 1]  # the last run then: it may have grown since
            if grown.encoding is None:
                if grown.silence > silence:
                    new.append(Run(None, [], grown.silence - silence))
            elif len(grown.chunks) > chunks:
                new.append(Run(grown.encoding, grown.chunks[chunks:]))
        new.extend(Run(r.encoding, list(r.chunks), r.silence) for r in runs[count:])
        return new, self.mark()


class ChannelBuffer:
    """One mono AudioBuffer per channel; the channels are interleaved when written."""

    __slots__ = ("channel_buffers", "channels")

    def __init__(self, channels: int, guard: BufferGuard | None = None) -> None:
        self.channels = channels
        self.channel_buffers = [AudioBuffer(1, guard) for _ in range(channels)]

    @property
    def guard(self) -> BufferGuard | None:
        return self.channel_buffers[0].guard

    @guard.setter
    def guard(self, guard: BufferGuard | None) -> None:
        for buffer in self.channel_buffers:
            buffer.guard = guard

    def ahead_seconds(self, now: float) -> float:
        return max(b.ahead_seconds(now) for b in self.channel_buffers)

    @property
    def frames(self) -> int:
        return max(b.frames for b in self.channel_buffers)

    @property
    def pending(self) -> bool:
        return any(b.pending for b in self.channel_buffers)

    def take(self) -> Pending:
        taken = [b.take() for b in self.channel_buffers]
        return Pending([p.runs[0] for p in taken], 1, sum(p.nbytes for p in taken))


class Pending:
    """A batch taken from a buffer: runs of one interleaved stream, or of one stream per channel."""

    __slots__ = ("interleaved_channels", "nbytes", "runs")

    def __init__(self, runs: list[list[Run]], interleaved_channels: int, nbytes: int = 0) -> None:
        self.runs = runs
        self.interleaved_channels = interleaved_channels
        self.nbytes = nbytes  # encoded audio in it (silence costs nothing)

    def __reduce__(self) -> tuple[type[Pending], tuple[list[list[Run]], int, int]]:
        return Pending, (self.runs, self.interleaved_channels, self.nbytes)  # see Run's

    def __bool__(self) -> bool:
        return any(self.runs)

    def encoded(self) -> Iterator[tuple[Encoding, bytes]]:
        """The encoded audio as it came, a run at a time (silence left out)."""
        for runs in self.runs:
            for run in runs:
                if run.encoding is not None:
                    yield run.encoding, b"".join(run.chunks)

    def render(self, decoders: StreamDecoders) -> list[np.ndarray]:
        """One int16 array per channel (the channels may differ in length), decoded by the
        tap's stream `decoders` (stream i: the i-th channel buffer, or the interleaved one)."""
        if len(self.runs) > 1:
            return [render(runs, 1, decoders, i)[:, 0] for i, runs in enumerate(self.runs)]
        frames = render(self.runs[0], self.interleaved_channels, decoders)
        return [frames[:, c] for c in range(self.interleaved_channels)]


def render(runs: list[Run], channels: int, decoders: StreamDecoders, stream: int = 0) -> np.ndarray:
    """Runs -> int16 array of shape (frames, channels). One decoder call per run."""
    parts: list[np.ndarray] = []
    for run in runs:
        if run.encoding is None:
            parts.append(np.zeros(run.silence * channels, dtype=np.int16))
        elif not run.chunks:
            parts.append(decoders.get(stream, run.encoding, channels).conceal(run.silence))
        else:
            parts.append(decoders.get(stream, run.encoding, channels).decode(run.chunks))
    if not parts:
        return np.zeros((0, channels), dtype=np.int16)
    samples = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return samples.astype(np.int16, copy=False).reshape(-1, channels)
