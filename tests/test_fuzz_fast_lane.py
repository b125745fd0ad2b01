"""Property-based fuzzing of the RTP fast lane: two hostile streams interleaved and cut into
batches give, through the vectorised lane plus the general path, exactly what the general path
alone gives."""

from __future__ import annotations

import numpy as np
from hypothesis import example, given
from hypothesis import strategies as st

from receiver.rtp.datagrams import MAX_DATAGRAM, Batch
from receiver.rtp.fast_lane import STORE_BYTES, FastLane
from receiver.rtp.packet import RtpPacket
from receiver.rtp.timeline import RtpTimeline
from tests.fuzzing import FAST, MAX_GAP, RecordingOutput, rtp_streams


def make_batch(packets: list[tuple[int, bytes, float]]) -> Batch:
    """A datagrams.Batch as a reader would return it: (lane key, datagram, arrival) each."""
    rows = np.zeros((len(packets), MAX_DATAGRAM), dtype=np.uint8)
    for i, (_, data, _) in enumerate(packets):
        rows[i, : len(data)] = np.frombuffer(data, dtype=np.uint8)
    return Batch(
        None,  # type: ignore[arg-type]
        len(packets),
        rows,
        np.array([len(d) for _, d, _ in packets], dtype=np.int64),
        np.array([k for k, _, _ in packets], dtype=np.uint64),
        np.array([a for _, _, a in packets], dtype=np.float64),
        [k for k, _, _ in packets],
    )


def joined(calls: list[tuple[object, ...]]) -> list[tuple[object, ...]]:
    """Consecutive audio calls of one codec as one call (what the buffer makes of them)."""
    out: list[tuple[object, ...]] = []
    for call in calls:
        if call[0] == "audio" and out and out[-1][0] == "audio" and out[-1][1] == call[1]:
            out[-1] = ("audio", call[1], out[-1][2] + call[2])  # type: ignore[operator]
        else:
            out.append(call)
    return out


@FAST
@given(
    rtp_streams(),
    rtp_streams(),
    st.lists(st.booleans(), min_size=250, max_size=250),
    st.lists(st.integers(1, 12), min_size=60, max_size=60),
    st.sampled_from([40, 300, STORE_BYTES]),
)
@example(  # clean streams, one packet per batch: the 300-byte store fills every other packet
    [(RtpPacket(0, False, n, 160 * n, 1, bytes([n]) * 160), 0.02 * n) for n in range(30)],
    [(RtpPacket(8, False, n, 80 * n, 2, bytes([n]) * 80), 0.02 * n + 0.01) for n in range(30)],
    [True, False] * 125,
    [1] * 60,
    300,
)
def test_fast_lane_is_the_general_path(
    one: list[tuple[RtpPacket, float]],
    two: list[tuple[RtpPacket, float]],
    interleave: list[bool],
    batch_sizes: list[int],
    store_bytes: int,
) -> None:
    """Two streams interleaved and cut into batches: the vectorised lane plus the general path
    (as the receiver runs them) give exactly what the general path alone gives, per stream.
    The lane hands audio over in chunks (its store, drained when full or disarmed), so
    consecutive audio of one codec is compared joined."""
    keys = [2 | 5004 << 16 | 0x0100007F << 32, 2 | 5006 << 16 | 0x0100007F << 32]
    streams = [sorted(one, key=lambda p: p[1]), sorted(two, key=lambda p: p[1])]
    merged: list[tuple[int, RtpPacket, float]] = []
    cursors, turn = [0, 0], iter(interleave)
    while cursors[0] < len(streams[0]) or cursors[1] < len(streams[1]):
        which = int(next(turn, False)) if cursors[1] < len(streams[1]) else 0
        if cursors[which] >= len(streams[which]):
            which = 1 - which
        packet, arrival = streams[which][cursors[which]]
        cursors[which] += 1
        merged.append((which, packet, arrival))
    lane = FastLane(capacity=1, store_bytes=store_bytes)  # grows on the second add
    reference = [RecordingOutput(), RecordingOutput()]
    outputs = [RecordingOutput(), RecordingOutput()]
    ref_timelines = [RtpTimeline(o, max_gap=MAX_GAP) for o in reference]
    timelines = [RtpTimeline(o, max_gap=MAX_GAP) for o in outputs]
    slots = [lane.add(keys[0]), lane.add(keys[1])]
    sizes = iter(batch_sizes)
    at = 0
    while at < len(merged):
        part = merged[at : at + next(sizes, 1000)]
        at += len(part)
        for which, packet, arrival in part:
            ref_timelines[which]._push(packet, arrival)
        batch = make_batch([(keys[w], p.serialize(), a) for w, p, a in part])
        done = lane.process(batch)
        for i, (which, packet, arrival) in enumerate(part):
            if done[i]:
                continue
            lane.disarm(slots[which])
            timelines[which].push(packet, arrival)
            lane.arm(slots[which], timelines[which], outputs[which].audio)
        now = part[-1][2]
        for which in (0, 1):
            if ref_timelines[which].waiting:
                ref_timelines[which].poll(now)
                timelines[which].poll(now)
            lane.arm(slots[which], timelines[which], outputs[which].audio)
    for which in (0, 1):
        lane.disarm(slots[which])
        ref_timelines[which].flush()
        timelines[which].flush()
        assert joined(outputs[which].calls) == joined(reference[which].calls)
        assert timelines[which].stats.to_dict() == ref_timelines[which].stats.to_dict()
        assert timelines[which].position == ref_timelines[which].position
