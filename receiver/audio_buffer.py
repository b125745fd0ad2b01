"""A tap's not-yet-written audio, kept as cheap runs of raw bytes until a batch is written.

Appending is a list append (no numpy per packet); `render` turns a whole batch into int16 frames
with one vectorised decode per run, in the writer thread.
"""

from __future__ import annotations

import numpy as np

from receiver import g711

SILENCE = "silence"
PCM16 = "L16"  # 16-bit little-endian linear PCM, interleaved channels

# A run is [kind, payload]: for G.711 and L16 a list of byte chunks, for silence a frame count.
Run = list[object]


class AudioBuffer:
    """Pending audio of one tap, in arrival order of the timeline."""

    __slots__ = ("_last", "_runs", "channels", "frames")

    def __init__(self, channels: int = 1) -> None:
        self.channels = channels
        self.frames = 0  # frames appended over the buffer's life (written or pending)
        self._runs: list[Run] = []
        self._last: Run | None = None

    def append(self, kind: str, data: bytes) -> None:
        """Append encoded audio: kind is g711.PCMU, g711.PCMA or PCM16 (whole frames only)."""
        if not data:
            return
        last = self._last
        if last is not None and last[0] == kind:
            last[1].append(data)  # type: ignore[attr-defined]
        else:
            self._last = [kind, [data]]
            self._runs.append(self._last)
        if kind == PCM16:
            self.frames += len(data) // (2 * self.channels)
        else:
            self.frames += len(data)

    def append_silence(self, frames: int) -> None:
        if frames <= 0:
            return
        last = self._last
        if last is not None and last[0] == SILENCE:
            last[1] = int(last[1]) + frames  # type: ignore[call-overload]
        else:
            self._last = [SILENCE, frames]
            self._runs.append(self._last)
        self.frames += frames

    @property
    def pending(self) -> bool:
        return bool(self._runs)

    def take(self) -> list[Run]:
        """Hand over everything pending (the caller renders it off the event loop)."""
        runs, self._runs, self._last = self._runs, [], None
        return runs


def render(runs: list[Run], channels: int = 1) -> np.ndarray:
    """Runs -> int16 array of shape (frames, channels). One numpy call per run."""
    parts: list[np.ndarray] = []
    for kind, payload in runs:
        if kind == SILENCE:
            parts.append(np.zeros(int(payload) * channels, dtype=np.int16))  # type: ignore[call-overload]
        elif kind == PCM16:
            parts.append(np.frombuffer(b"".join(payload), dtype="<i2"))  # type: ignore[arg-type]
        else:
            parts.append(g711.decode(str(kind), b"".join(payload)))  # type: ignore[arg-type]
    if not parts:
        return np.zeros((0, channels), dtype=np.int16)
    samples = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return samples.astype(np.int16, copy=False).reshape(-1, channels)
