"""Channels that arrive separately (Media Streams tracks), put side by side frame by frame.

A batch may hold more of one channel than of another; frames are handed on only as far as every
channel has them, and the rest waits for the next batch. The WAV writer (receiver.storage.wav_sink)
and the live listeners (receiver.live) use this same piece, so what a listener hears is the WAV.
"""

from __future__ import annotations

import numpy as np

_EMPTY = np.zeros(0, np.int16)


class ChannelAligner:
    """`skip[c]`: frames of channel c to leave out first (a listener joining mid-tap starts
    every channel at the same frame index)."""

    __slots__ = ("_carry", "_skip")

    def __init__(self, channels: int, skip: list[int] | None = None) -> None:
        self._carry: list[np.ndarray] = [_EMPTY] * channels
        self._skip = list(skip) if skip is not None else [0] * channels

    def push(self, parts: list[np.ndarray]) -> list[np.ndarray]:
        """One int16 array per channel in; equal-length columns out (possibly empty)."""
        if any(self._skip):
            parts = [self._skipped(c, p) for c, p in enumerate(parts)]
        carry = [
            np.concatenate((c, p)) if len(c) else p for c, p in zip(self._carry, parts, strict=True)
        ]
        ready = min(len(c) for c in carry)
        self._carry = [c[ready:] for c in carry]
        return [c[:ready] for c in carry]

    def drain(self) -> list[np.ndarray]:
        """At the end: what is left, the shorter channels padded with silence."""
        longest = max((len(c) for c in self._carry), default=0)
        padded = [np.pad(c, (0, longest - len(c))) for c in self._carry]
        self._carry = [_EMPTY] * len(self._carry)
        return padded

    def hand_over(self, successor: ChannelAligner) -> None:
        """A segment split: what one channel has beyond the others goes on in the next file."""
        successor._carry, self._carry = self._carry, [_EMPTY] * len(self._carry)

    def _skipped(self, channel: int, part: np.ndarray) -> np.ndarray:
        cut = min(self._skip[channel], len(part))
        self._skip[channel] -= cut
        return part[cut:]
