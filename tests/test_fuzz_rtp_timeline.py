"""Property-based fuzzing of the RTP timeline with streams gone wrong (jumps, wraps, reordering,
SSRC and payload type changes, odd sizes, arrival times that stall, burst or go back): its
invariants hold, and push()'s inlined in-order case gives exactly what the general path gives."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from receiver.rtp.packet import RtpPacket
from receiver.rtp.timeline import MAX_HELD, RtpTimeline
from tests.fuzzing import FAST, MAX_GAP, CountingOutput, RecordingOutput, rtp_streams


@FAST
@given(rtp_streams(), st.sampled_from([0.0, 0.06, 0.2]), st.sampled_from([4, MAX_HELD]))
def test_rtp_timeline_invariants(
    stream: list[tuple[RtpPacket, float]], jitter: float, max_held: int
) -> None:
    output = CountingOutput(round(MAX_GAP * 8000))
    timeline = RtpTimeline(output, jitter_window=jitter, max_gap=MAX_GAP, max_held=max_held)
    for packet, arrival in stream:
        timeline.push(packet, arrival)
        # `position` is exactly what was emitted; held packets stay bounded.
        assert timeline.position == output.audio_samples + output.silence_samples
        assert len(timeline._held) <= max_held
        if timeline.waiting:
            timeline.poll(arrival)
    timeline.flush()
    assert not timeline.waiting
    assert timeline.position == output.audio_samples + output.silence_samples
    stats = timeline.stats
    assert stats.received == len(stream)
    assert output.audio_samples <= sum(len(p.payload) for p, _ in stream)
    json.dumps(stats.to_dict(), allow_nan=False)


@FAST
@given(rtp_streams(), st.sampled_from([0.0, 0.2]))
def test_rtp_push_inlined_case_is_the_general_path(
    stream: list[tuple[RtpPacket, float]], jitter: float
) -> None:
    """push()'s inlined in-order audio case gives exactly what the general path gives."""
    by_packet, by_fields = RecordingOutput(), RecordingOutput()
    a = RtpTimeline(by_packet, jitter_window=jitter, max_gap=MAX_GAP)
    b = RtpTimeline(by_fields, jitter_window=jitter, max_gap=MAX_GAP)
    for packet, arrival in stream:
        a._push(packet, arrival)  # the general path: never the inlined case
        b.push(packet, arrival)
        assert b.waiting == a.waiting
        if a.waiting:
            a.poll(arrival)
            b.poll(arrival)
    a.flush()
    b.flush()
    assert by_fields.calls == by_packet.calls
    assert b.stats.to_dict() == a.stats.to_dict()
