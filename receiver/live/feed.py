"""One tap's live audio: what its timeline appended to its buffer since the last look, decoded.

The buffer is read, not taken (receiver.taps.audio_buffer: `mark`, `runs_since`), so the disk
writer's batches stay as they are and a listener costs nothing while nobody listens. Positions
are frame indexes on the tap's timeline since it began: the WAV's frame index (for a recording
split by max_tap_duration, counted from the first segment's start). Channels that arrive apart
(Media Streams tracks) are put side by side by the same ChannelAligner as the WAV writer's; a
listener that joins mid-tap starts every channel at the same frame index.

The feed decodes with decoders of its own (the writer child's are in another process): for
G.711 and L16 that is the WAV's audio from any position. Opus and G.722 decoders carry state
from packet to packet, and a listener's decoder starts at its position: it hears what libopus
(or libg722) makes of the packets from there, which is the WAV's audio in length and position
but not sample for sample (the WAV's decoder had the earlier packets).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from receiver.codecs.decoders import StreamDecoders
from receiver.live.subscriber import Subscriber
from receiver.storage.channel_aligner import ChannelAligner
from receiver.taps.audio_buffer import AudioBuffer, ChannelBuffer, Mark, render
from receiver.taps.tap import Tap


class LiveFeed:
    def __init__(self, tap: Tap, on_end: Callable[[LiveFeed], None]) -> None:
        self.tap = tap
        self.on_end = on_end
        buffer = tap.buffer
        self.aligner: ChannelAligner | None = None
        self.buffers: list[AudioBuffer]
        if isinstance(buffer, ChannelBuffer):
            self.buffers = buffer.channel_buffers
            self.interleaved = 1
            counts = [b.frames for b in self.buffers]
            self.position = max(counts)  # the next frame to publish
            self.aligner = ChannelAligner(len(counts), [self.position - n for n in counts])
        else:
            self.buffers = [buffer]
            self.interleaved = buffer.channels
            self.position = buffer.frames
        self.marks: list[Mark] = [b.mark() for b in self.buffers]
        self.decoders = StreamDecoders(tap.sample_rate)
        self.subscribers: list[Subscriber] = []
        self.dropped_frames = 0  # by its subscribers, together
        self.ended = False

    def catch_up(self) -> None:
        """Publish what the buffer got since the last look (call before each `take`)."""
        parts = []
        for i, buffer in enumerate(self.buffers):
            runs, self.marks[i] = buffer.runs_since(self.marks[i])
            parts.append(render(runs, self.interleaved, self.decoders, i))
        if self.aligner is None:
            self._publish(parts[0])
        else:
            columns = self.aligner.push([p[:, 0] for p in parts])
            self._publish(np.column_stack(columns))

    def end(self, reason: str) -> None:
        """The tap ended: its last audio (the channels evened out as in the WAV), then the end
        marker to every subscriber."""
        if self.ended:
            return
        self.catch_up()
        if self.aligner is not None:
            self._publish(np.column_stack(self.aligner.drain()))
        self.ended = True
        for subscriber in self.subscribers:
            subscriber.end(self.position, reason)
        self.on_end(self)

    def _publish(self, frames: np.ndarray) -> None:
        if not len(frames):
            return
        data = frames.astype("<i2", copy=False).tobytes()
        for subscriber in self.subscribers:
            self.dropped_frames += subscriber.offer(frames, data, self.position)
        self.position += len(frames)
