"""One track of a JSON media stream (Media Streams `media.chunk` / `media.timestamp`), placed on
the stream's timeline.

Chunk numbers count per track, timestamps are milliseconds since the stream started. A chunk is
placed right after the previous chunk when the numbers are consecutive (sample-exact, immune to
the millisecond rounding of timestamps); a missing chunk leaves a hole of its length; when the
timestamp disagrees with that by more than `TIMESTAMP_TOLERANCE` (the sender skipped time, e.g.
silence suppression), the timestamp wins. Chunks that arrive out of order wait in a small buffer
and land in their place; a hole is given up (filled with silence) once `window` samples of later
audio are waiting behind it. Pure and synchronous: tested without sockets.

Hostile or broken senders are bounded like the RTP timeline's `max_gap`: a chunk number or
timestamp that would move the track more than `max_gap` away from its furthest audio is not
believed (non-finite ones are ignored); the chunk continues the track right after that audio, as a
discontinuity, and later timestamps are taken relative to it. At most `max_held` chunks wait for
a hole.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from receiver.codecs.encoding import Encoding
from receiver.codecs.opus_packet import packet_samples, samples_at

TIMESTAMP_TOLERANCE = 0.06  # seconds: timestamp jitter absorbed before the timestamp wins
MAX_GAP_SECONDS = 30.0  # the longest jump filled with silence (as the RTP timeline's max_gap)
MAX_HELD = 512  # chunks waiting behind a hole


class TrackOutput(Protocol):
    def append(self, encoding: Encoding, data: bytes) -> None: ...
    def append_silence(self, frames: int) -> None: ...


@dataclass(slots=True)
class TrackStats:
    chunks: int = 0  # media messages with audio
    out_of_order: int = 0  # arrived after a higher chunk number
    late: int = 0  # arrived after their place was written (dropped)
    duplicate: int = 0  # a chunk number seen before (dropped)
    timestamp_jumps: int = 0  # the timestamp, not the chunk number, placed the chunk
    discontinuities: int = 0  # a jump past max_gap: continued after the track's audio instead
    silence_filled: int = 0  # samples of silence inserted for holes and alignment
    first_chunk: int | None = None
    last_chunk: int | None = None
    distinct_chunks: int = 0

    @property
    def missing_chunks(self) -> int:
        """Chunk numbers between the first and the last that never arrived."""
        if self.first_chunk is None or self.last_chunk is None:
            return 0
        return self.last_chunk - self.first_chunk + 1 - self.distinct_chunks

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "missing_chunks": self.missing_chunks}


def _trim(kind: Encoding, data: bytes, samples: int) -> tuple[bytes, int]:
    """`data` less its first `samples`; and the samples of silence that must stand in for a
    part of a byte (G.722: a byte is two samples, and an odd overlap cuts one in half)."""
    if kind is Encoding.G722:
        cut = (samples + 1) // 2
        return data[cut:], 2 * cut - samples
    return data[samples * kind.bytes_per_sample :], 0


class TrackTimeline:
    def __init__(
        self,
        output: TrackOutput,
        sample_rate: int,
        window: int,
        max_gap: float = MAX_GAP_SECONDS,
        max_held: int = MAX_HELD,
    ) -> None:
        self.output = output
        self.rate = sample_rate
        self.window = window  # samples of later audio after which a hole is given up
        self.max_gap = round(max_gap * sample_rate)
        # The furthest position a chunk may take (the session sets it from the wall clock: time
        # since the stream began plus max_gap), so jumps under max_gap cannot add up to hours.
        self.horizon: int | None = None
        self.max_held = max_held
        self.end = 0  # samples handed to the output
        self.stats = TrackStats()
        self._tolerance = int(TIMESTAMP_TOLERANCE * sample_rate)
        self._held: list[
            tuple[int, int, Encoding, bytes]
        ] = []  # heap of (position, seq, kind, data)
        self._held_end = 0
        self._pushes = 0  # tie-breaker so the heap never compares payloads
        self._anchor: tuple[int, int, int] | None = None  # (chunk, position, samples), newest
        self._next_free = 0  # where a chunk with neither number nor timestamp goes
        self._time_shift = 0  # added to timestamp positions after a discontinuity
        self._seen: set[int] = set()
        self._seen_order: deque[int] = deque()

    def _samples(self, kind: Encoding, data: bytes) -> int:
        if kind is Encoding.G722:
            return 2 * len(data)  # 16 kHz audio, 8 bits for two samples
        if kind is Encoding.OPUS:  # one packet (the session has checked its TOC)
            return samples_at(packet_samples(data), self.rate)
        return len(data) // kind.bytes_per_sample

    def _by_time(self, timestamp_ms: float | None) -> int | None:
        if timestamp_ms is None:
            return None
        try:
            samples = float(timestamp_ms) * self.rate / 1000
        except (OverflowError, TypeError, ValueError):
            return None
        if not math.isfinite(samples):
            return None
        return round(samples) + self._time_shift

    def place(self, chunk: int | None, timestamp_ms: float | None, samples: int) -> int:
        """Where a chunk belongs, in samples from the stream start."""
        by_time = self._by_time(timestamp_ms)
        anchor = self._anchor
        by_chunk = None
        if chunk is not None and anchor is not None:
            a_chunk, a_pos, a_samples = anchor
            by_chunk = a_pos + (chunk - a_chunk) * a_samples
        if by_chunk is not None and (by_time is None or abs(by_time - by_chunk) <= self._tolerance):
            position = by_chunk
        elif by_time is not None:
            position = by_time
        else:
            position = self._next_free
        free = max(self._next_free, self.end)  # the end of the track's audio (or padding)
        limit = free + self.max_gap if self.horizon is None else max(free, self.horizon)
        rebase = False
        if abs(position - free) > self.max_gap or position > limit:
            if by_chunk is not None and abs(by_chunk - free) <= self.max_gap and by_chunk <= limit:
                position = by_chunk  # only the timestamp is absurd
            else:
                position, rebase = free, True
                self.stats.discontinuities += 1
            if by_time is not None:
                self._time_shift += position - by_time  # later timestamps continue from here
        elif by_chunk is not None and position != by_chunk:
            self.stats.timestamp_jumps += 1
        if chunk is not None and (anchor is None or chunk > anchor[0] or rebase):
            self._anchor = (chunk, position, samples)
        self._next_free = max(self._next_free, position + samples)
        return position

    def _note_chunk(self, chunk: int) -> bool:
        """Book-keeping of chunk numbers; False for a duplicate."""
        stats = self.stats
        if chunk in self._seen:
            stats.duplicate += 1
            return False
        self._seen.add(chunk)
        self._seen_order.append(chunk)
        if len(self._seen_order) > 1024:
            self._seen.discard(self._seen_order.popleft())
        stats.distinct_chunks += 1
        if stats.first_chunk is None or chunk < stats.first_chunk:
            stats.first_chunk = chunk
        if stats.last_chunk is None or chunk > stats.last_chunk:
            stats.last_chunk = chunk
        elif chunk < stats.last_chunk:
            stats.out_of_order += 1
        return True

    def add(
        self, chunk: int | None, timestamp_ms: float | None, kind: Encoding, data: bytes
    ) -> None:
        """A media message's audio (mono, whole samples)."""
        if not data:
            return
        self.stats.chunks += 1
        if chunk is not None and not self._note_chunk(chunk):
            return
        samples = self._samples(kind, data)
        position = self.place(chunk, timestamp_ms, samples)
        if not self._held and position <= self.end:
            self._put(position, kind, data)  # the usual case: next in line (or overlapping)
            return
        self._pushes += 1
        heapq.heappush(self._held, (position, self._pushes, kind, data))
        self._held_end = max(self._held_end, position + samples)
        self._release(force=False)

    def _put(self, position: int, kind: Encoding, data: bytes) -> None:
        """Write a chunk at its position: silence before it, overlap with the past cut off."""
        if position > self.end:
            self.stats.silence_filled += position - self.end
            self.output.append_silence(position - self.end)
            self.end = position
        samples = self._samples(kind, data)
        if position + samples <= self.end:
            self.stats.late += 1
            return
        if position < self.end and kind.is_packetized:
            self.stats.late += 1  # a packet cannot be cut: what it overlaps is kept instead
            return
        if position < self.end:
            data, fill = _trim(kind, data, self.end - position)
            if fill:
                self.output.append_silence(fill)
        self.output.append(kind, data)
        self.end = position + samples

    def _release(self, force: bool) -> None:
        held = self._held
        while held:
            position = held[0][0]
            if (
                position > self.end
                and not force
                and self._held_end - position <= self.window
                and len(held) <= self.max_held
            ):
                return  # the hole before it may still be filled
            _, _, kind, data = heapq.heappop(held)
            self._put(position, kind, data)

    def pad_to(self, position: int) -> None:
        """Bring the track up to `position`, held chunks first, then silence: keeps a stalled
        track aligned with the other one (what arrives later for that stretch is late)."""
        while self._held and self._held[0][0] < position:
            held_position, _, kind, data = heapq.heappop(self._held)
            self._put(held_position, kind, data)
        if position > self.end:
            self.stats.silence_filled += position - self.end
            self.output.append_silence(position - self.end)
            self.end = position
        self._next_free = max(self._next_free, position)

    def flush(self) -> None:
        """End of stream: everything held goes out, holes become silence."""
        self._release(force=True)

    @property
    def reach(self) -> int:
        """How far this track's known audio extends (written or held)."""
        return max(self.end, self._held_end) if self._held else self.end
