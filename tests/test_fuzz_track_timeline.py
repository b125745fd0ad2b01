"""Property-based fuzzing of the WebSocket track timeline (Media Streams chunk numbers and
timestamps, absurd ones included): what it emits and holds stays bounded. Then the fixes for
what the fuzzer found, pinned as exact examples."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from receiver.codecs.encoding import Encoding
from receiver.ws.track_timeline import MAX_GAP_SECONDS, TrackTimeline
from tests.fuzzing import FAST


class TrackRecorder:
    def __init__(self) -> None:
        self.frames = 0

    def append(self, kind: Encoding, data: bytes) -> None:
        assert isinstance(kind, Encoding)
        assert data and len(data) % kind.bytes_per_sample == 0
        self.frames += len(data) // kind.bytes_per_sample

    def append_silence(self, frames: int) -> None:
        assert frames > 0
        self.frames += frames


absurd_numbers = st.one_of(
    st.none(),
    st.integers(-(10**6), 10**6),
    st.integers(-(10**30), 10**30),
    st.floats(allow_nan=True, allow_infinity=True),
)


@FAST
@given(
    st.lists(
        st.tuples(
            absurd_numbers,  # chunk
            absurd_numbers,  # timestamp (ms)
            st.sampled_from([0, 1, 80, 160, 320]),
        ),
        max_size=80,
    ),
    st.sampled_from([8000, 16000]),
)
@example([(1, 0, 160), (2, 1e15, 160), (3, 40, 160)], 8000)  # one absurd timestamp
@example([(1, 0, 160), (10**18, None, 160)], 8000)  # one absurd chunk number
@example([(None, 10**6 * n, 160) for n in range(3)], 8000)  # a sender's clock in µs
@example([(None, 1e308, 160)], 8000)  # overflows once scaled to samples
@example([(None, 5000, 160)] * 300, 8000)  # everything at one far place
def test_track_timeline_is_bounded(chunks: list[tuple[Any, Any, int]], rate: int) -> None:
    output = TrackRecorder()
    timeline = TrackTimeline(output, rate, window=rate // 5)
    max_gap = round(MAX_GAP_SECONDS * rate)
    total = 0
    for n, (chunk, timestamp, samples) in enumerate(chunks):
        if isinstance(chunk, float):
            chunk = None if chunk != chunk or abs(chunk) == float("inf") else int(chunk)
        timeline.add(chunk, timestamp, Encoding.PCMU, bytes([n % 256]) * samples)
        total += samples
        # Each chunk may move the track by at most max_gap of silence plus its own length;
        # what waits for a hole is bounded.
        assert timeline.reach <= total + len(chunks) * max_gap
        assert len(timeline._held) <= timeline.max_held
    timeline.flush()
    assert not timeline._held
    assert output.frames == timeline.end <= total + len(chunks) * max_gap
    json.dumps(timeline.stats.to_dict(), allow_nan=False)


# -- the fixes, exactly ---------------------------------------------------------------------------


class SampleRecorder:
    """One entry per sample: the chunk's byte, or None for silence."""

    def __init__(self) -> None:
        self.samples: list[int | None] = []

    def append(self, kind: str, data: bytes) -> None:
        self.samples.extend(data)

    def append_silence(self, frames: int) -> None:
        self.samples.extend([None] * frames)


def layout(*chunks: int | None) -> list[int | None]:
    return [s for n in chunks for s in [n] * 160]


def test_an_absurd_timestamp_loses_to_the_chunk_number() -> None:
    rec = SampleRecorder()
    timeline = TrackTimeline(rec, 8000, 1600)
    for n, ts in ((1, 0), (2, 1e12), (3, 40)):
        timeline.add(n, ts, Encoding.PCMU, bytes([n]) * 160)
    timeline.flush()
    assert rec.samples == layout(1, 2, 3)
    assert timeline.stats.discontinuities == 0 and timeline.stats.timestamp_jumps == 0


def test_a_jump_past_max_gap_is_a_discontinuity_and_later_timestamps_follow_it() -> None:
    rec = SampleRecorder()
    timeline = TrackTimeline(rec, 8000, 1600)
    for n, ts in ((1, 0), (2, 20), (3, 1e12), (4, 1e12 + 20), (5, 1e12 + 60)):
        timeline.add(None, ts, Encoding.PCMU, bytes([n]) * 160)
    timeline.flush()
    assert rec.samples == layout(1, 2, 3, 4, None, 5)  # the 20 ms hole after 4 is kept
    assert timeline.stats.discontinuities == 1


def test_a_gap_within_max_gap_is_still_silence_of_its_length() -> None:
    rec = SampleRecorder()
    timeline = TrackTimeline(rec, 8000, 1600)
    timeline.add(None, 0, Encoding.PCMU, b"\1" * 160)
    timeline.add(None, 29_000, Encoding.PCMU, b"\2" * 160)
    timeline.flush()
    assert rec.samples == layout(1) + [None] * (29 * 8000 - 160) + layout(2)
    assert timeline.stats.discontinuities == 0


def test_chunks_piling_up_at_one_far_place_are_bounded() -> None:
    rec = SampleRecorder()
    timeline = TrackTimeline(rec, 8000, 8000, max_held=16)
    timeline.add(None, 0, Encoding.PCMU, b"\1" * 160)
    for _ in range(1000):
        timeline.add(None, 500, Encoding.PCMU, b"\2" * 160)  # all wait for the hole before 500 ms
        assert len(timeline._held) <= 16
    timeline.flush()
    assert rec.samples[:4000] == layout(1) + [None] * (4000 - 160)
    assert len(rec.samples) == 4000 + 160  # they overlap each other: one chunk's length
