"""TrackTimeline: Media Streams chunks placed by chunk number and timestamp, exactly."""

from __future__ import annotations

import pytest

from receiver.codecs.encoding import Encoding
from receiver.ws.track_timeline import TrackTimeline

RATE = 8000
CHUNK = 160  # 20 ms of G.711


class Recorder:
    """Renders the output as one byte per sample, silence as None, to compare exactly."""

    def __init__(self) -> None:
        self.samples: list[int | None] = []

    def append(self, kind: Encoding, data: bytes) -> None:
        step = 2 if kind is Encoding.L16 else 1
        self.samples.extend(data[::step])

    def append_silence(self, frames: int) -> None:
        self.samples.extend([None] * frames)


def chunk_bytes(n: int, size: int = CHUNK) -> bytes:
    return bytes([n % 256]) * size


def expected(layout: list[int | None], size: int = CHUNK) -> list[int | None]:
    """Chunk numbers (None = silence) -> per-sample expectation."""
    out: list[int | None] = []
    for n in layout:
        out.extend([None if n is None else n % 256] * size)
    return out


def make(window_chunks: int = 5) -> tuple[TrackTimeline, Recorder]:
    rec = Recorder()
    return TrackTimeline(rec, RATE, window_chunks * CHUNK), rec


def feed(tl: TrackTimeline, chunks: list[int], ts: bool = True) -> None:
    for n in chunks:
        tl.add(n, (n - 1) * 20 if ts else None, Encoding.PCMU, chunk_bytes(n))


def test_in_order() -> None:
    tl, rec = make()
    feed(tl, [1, 2, 3, 4])
    tl.flush()
    assert rec.samples == expected([1, 2, 3, 4])
    assert tl.stats.missing_chunks == 0 and tl.stats.out_of_order == 0


def test_out_of_order_lands_in_place() -> None:
    tl, rec = make()
    feed(tl, [1, 3, 2, 5, 4, 6])
    assert rec.samples == expected([1, 2, 3, 4, 5, 6])  # released without waiting for flush
    assert tl.stats.out_of_order == 2
    assert tl.stats.missing_chunks == 0


def test_missing_chunk_is_silence_of_its_length_after_the_window() -> None:
    tl, rec = make(window_chunks=3)
    feed(tl, [1, 2, 4, 5, 6])
    assert rec.samples == expected([1, 2])  # 3 chunks (window) waiting: hole still open
    feed(tl, [7])
    assert rec.samples == expected([1, 2, None, 4, 5, 6, 7])
    assert tl.stats.missing_chunks == 1
    tl.add(3, 40, Encoding.PCMU, chunk_bytes(3))  # too late now
    assert tl.stats.late == 1
    tl.flush()
    assert rec.samples == expected([1, 2, None, 4, 5, 6, 7])


def test_flush_fills_holes() -> None:
    tl, rec = make()
    feed(tl, [1, 4])
    tl.flush()
    assert rec.samples == expected([1, None, None, 4])
    assert tl.stats.missing_chunks == 2


def test_duplicates_dropped() -> None:
    tl, rec = make()
    feed(tl, [1, 2, 2, 3, 1])
    tl.flush()
    assert rec.samples == expected([1, 2, 3])
    assert tl.stats.duplicate == 2


def test_first_chunk_placed_by_timestamp() -> None:
    tl, rec = make()
    tl.add(1, 1000, Encoding.PCMU, chunk_bytes(1))  # this track starts 1 s into the stream
    tl.flush()
    assert rec.samples == [None] * 8000 + expected([1])


def test_timestamp_rounding_does_not_move_consecutive_chunks() -> None:
    tl, rec = make()
    # millisecond timestamps that jitter around the 20 ms grid: chunk numbers decide
    for n, ts in [(1, 0), (2, 21), (3, 39), (4, 61), (5, 80)]:
        tl.add(n, ts, Encoding.PCMU, chunk_bytes(n))
    tl.flush()
    assert rec.samples == expected([1, 2, 3, 4, 5])
    assert tl.stats.timestamp_jumps == 0


def test_timestamp_wins_when_the_sender_skipped_time() -> None:
    tl, rec = make()
    tl.add(1, 0, Encoding.PCMU, chunk_bytes(1))
    tl.add(2, 20, Encoding.PCMU, chunk_bytes(2))
    tl.add(
        3, 1040, Encoding.PCMU, chunk_bytes(3)
    )  # consecutive number, 1 s later: silence suppression
    tl.add(4, 1060, Encoding.PCMU, chunk_bytes(4))
    tl.flush()
    assert rec.samples == expected([1, 2]) + [None] * 8000 + expected([3, 4])
    assert tl.stats.timestamp_jumps == 1
    assert tl.stats.missing_chunks == 0


def test_no_chunk_numbers_uses_timestamps_and_no_timestamps_appends() -> None:
    tl, rec = make()
    tl.add(None, 0, Encoding.PCMU, chunk_bytes(1))
    tl.add(None, 40, Encoding.PCMU, chunk_bytes(3))
    tl.add(None, None, Encoding.PCMU, chunk_bytes(4))
    tl.flush()
    assert rec.samples == expected([1, None, 3, 4])


def test_overlap_keeps_only_the_new_part() -> None:
    tl, rec = make()
    tl.add(None, 0, Encoding.PCMU, bytes([1]) * 160)
    tl.add(None, 10, Encoding.PCMU, bytes([2]) * 160)  # starts 80 samples before the end
    tl.flush()
    assert rec.samples == [1] * 160 + [2] * 80


def test_l16_positions_count_samples_not_bytes() -> None:
    rec = Recorder()
    tl = TrackTimeline(rec, 16000, 16000)
    tl.add(1, 0, Encoding.L16, bytes([1, 0]) * 320)  # 20 ms at 16 kHz
    tl.add(3, 40, Encoding.L16, bytes([3, 0]) * 320)
    tl.flush()
    assert rec.samples == [1] * 320 + [None] * 320 + [3] * 320


def test_pad_to_releases_held_then_pads() -> None:
    tl, rec = make(window_chunks=50)
    feed(tl, [1, 3])
    tl.pad_to(5 * CHUNK)
    assert rec.samples == expected([1, None, 3, None, None])
    assert tl.end == 5 * CHUNK
    feed(tl, [2])
    assert tl.stats.late == 1


@pytest.mark.parametrize("order", [[2, 1, 3], [3, 2, 1], [1, 3, 2]])
def test_any_order_within_window(order: list[int]) -> None:
    tl, rec = make()
    feed(tl, order)
    tl.flush()
    assert rec.samples == expected([1, 2, 3])
    assert None not in rec.samples


def test_horizon_stops_jumps_from_adding_up() -> None:
    """Each jump is under max_gap, but together they would run hours ahead of the wall clock:
    past the horizon (set by the session from the time since the stream began) a chunk continues
    right after the track's audio, as a discontinuity, instead of after minutes of silence."""
    tl, rec = make()
    tl.horizon = 10 * CHUNK
    for n in range(1, 6):  # no chunk numbers, timestamps 20 s apart
        tl.add(None, (n - 1) * 20_000, Encoding.PCMU, chunk_bytes(n))
    tl.flush()
    assert rec.samples == expected([1, 2, 3, 4, 5])
    assert tl.stats.discontinuities == 4
    tl2, rec2 = make()
    tl2.horizon = 10 * CHUNK
    for n in range(1, 6):  # consecutive chunk numbers: those are believed, the timestamps not
        tl2.add(n, (n - 1) * 20_000, Encoding.PCMU, chunk_bytes(n))
    tl2.flush()
    assert rec2.samples == expected([1, 2, 3, 4, 5])
    assert tl2.stats.discontinuities == 0


def test_no_horizon_keeps_honest_gaps() -> None:
    tl, rec = make()
    tl.horizon = 2000 * CHUNK  # 40 s since the stream began
    tl.add(1, 0, Encoding.PCMU, chunk_bytes(1))
    tl.add(2, 10_020, Encoding.PCMU, chunk_bytes(2))  # the sender was silent for 10 s: silence
    tl.flush()
    assert rec.samples == expected([1]) + [None] * (10_000 * 8) + expected([2])
