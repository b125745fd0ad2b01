"""One live listener: a bounded queue of messages for its WebSocket.

Audio that does not fit (the listener reads slower than real time, or not at all) is dropped
whole batches at a time and counted; the next audio it gets is preceded by a gap marker that says
how many frames it missed and where the audio goes on. The end marker is always queued. Nothing
here waits: recording never waits for a listener.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import numpy as np

Message = bytes | dict[str, Any]  # binary PCM, or a JSON text frame


class Subscriber:
    def __init__(self, max_frames: int, channel: int | None, start: dict[str, Any]) -> None:
        self.max_frames = max_frames  # frames of audio it may have queued
        self.channel = channel  # one channel of the tap only (a per-track file), or all
        self._items: deque[tuple[int, Message]] = deque([(0, start)])
        self.queued_frames = 0
        self.skipped = 0  # frames dropped since the last gap marker
        self.dropped_frames = 0  # in all
        self.gaps = 0
        self.ended = False
        self.ended_event = asyncio.Event()
        self.wake = asyncio.Event()
        self.wake.set()

    def offer(self, frames: np.ndarray, data: bytes, position: int) -> int:
        """Queue audio (`frames` of shape (n, channels), `data` its s16le bytes) that begins at
        frame `position`; returns the frames dropped (0 or n). An empty queue takes any batch
        (one update's audio), so a listener that keeps up never drops."""
        count = len(frames)
        if self.ended:
            return 0
        if self.queued_frames and self.queued_frames + count > self.max_frames:
            self.skipped += count
            self.dropped_frames += count
            return count
        self._gap(position)
        if self.channel is not None:
            data = frames[:, self.channel].astype("<i2").tobytes()
        self._items.append((count, data))
        self.queued_frames += count
        self.wake.set()
        return 0

    def end(self, position: int, reason: str) -> None:
        if self.ended:
            return
        self._gap(position)
        self._items.append(
            (0, {"type": "end", "position": position, "reason": reason,
                 "dropped_frames": self.dropped_frames, "gaps": self.gaps})
        )  # fmt: skip
        self.ended = True
        self.ended_event.set()
        self.wake.set()

    def pop(self) -> Message | None:
        """The next message, or None (then `wake` is cleared until there is one)."""
        if not self._items:
            self.wake.clear()
            return None
        count, message = self._items.popleft()
        self.queued_frames -= count
        return message

    def _gap(self, position: int) -> None:
        if self.skipped:
            self._items.append(
                (0, {"type": "gap", "skipped_frames": self.skipped, "position": position})
            )
            self.skipped = 0
            self.gaps += 1
