"""RtpTimeline: scripted packet sequences rendered to exact sample-level output.

Each audio packet's payload is its sequence number (mod 256) repeated, so the recorder can name
every output sample: "U7" is a PCMU sample from packet 7, "A7" a PCMA one, "-" digital silence.
"""

from __future__ import annotations

import pytest

from receiver.rtp.packet import RtpPacket, TelephoneEvent
from receiver.rtp.timeline import RtpTimeline

SSRC = 0x0000000A
OTHER = 0x0000000B
PCMU, PCMA, CN, DTMF = 0, 8, 13, 101
Run = tuple[str, int]


class Recorder:
    """A TimelineOutput that keeps one marker per output sample."""

    def __init__(self) -> None:
        self.samples: list[str] = []
        self.events: list[dict[str, object]] = []

    def audio(self, codec: str, payload: bytes) -> None:
        self.samples.extend(f"{codec[-1]}{byte}" for byte in payload)

    def silence(self, samples: int) -> None:
        assert samples > 0
        self.samples.extend(["-"] * samples)

    def event(self, event: dict[str, object]) -> None:
        self.events.append(event)

    def runs(self) -> list[Run]:
        runs: list[Run] = []
        for marker in self.samples:
            if runs and runs[-1][0] == marker:
                runs[-1] = (marker, runs[-1][1] + 1)
            else:
                runs.append((marker, 1))
        return runs

    def of_type(self, kind: str) -> list[dict[str, object]]:
        return [event for event in self.events if event["type"] == kind]


def rtp(
    sequence: int,
    timestamp: int,
    samples: int = 160,
    *,
    pt: int = PCMU,
    ssrc: int = SSRC,
    marker: bool = False,
    payload: bytes | None = None,
) -> RtpPacket:
    if payload is None:
        payload = bytes([sequence % 256]) * samples
    return RtpPacket(pt, marker, sequence & 0xFFFF, timestamp & 0xFFFFFFFF, ssrc, payload)


def dtmf(
    sequence: int, start: int, duration: int, *, end: bool = False, digit: int = 5
) -> RtpPacket:
    event = TelephoneEvent(event=digit, end=end, volume=10, duration=duration)
    return rtp(sequence, start, pt=DTMF, payload=event.serialize())


def make(**options: float) -> tuple[RtpTimeline, Recorder]:
    recorder = Recorder()
    return RtpTimeline(recorder, **options), recorder  # type: ignore[arg-type]


def feed(timeline: RtpTimeline, *packets: tuple[RtpPacket, float]) -> None:
    for packet, arrival in packets:
        timeline.push(packet, arrival)


def check(timeline: RtpTimeline, recorder: Recorder, expected: list[Run]) -> None:
    assert recorder.runs() == expected
    assert len(recorder.samples) == timeline.position == sum(count for _, count in expected)


# Ordering


def test_in_order_is_released_at_once_and_contiguous() -> None:
    timeline, out = make()
    timeline.push(rtp(1, 1000), 0.00)
    check(timeline, out, [("U1", 160)])
    feed(timeline, (rtp(2, 1160), 0.02), (rtp(3, 1320), 0.04))
    check(timeline, out, [("U1", 160), ("U2", 160), ("U3", 160)])
    assert not timeline.waiting
    assert out.events == []
    stats = timeline.stats
    assert (stats.received, stats.lost, stats.reordered, stats.duplicate) == (3, 0, 0, 0)


def test_reorder_within_window_is_released_in_place() -> None:
    timeline, out = make()
    feed(timeline, (rtp(1, 0), 0.00), (rtp(3, 320), 0.02))
    assert timeline.waiting
    check(timeline, out, [("U1", 160)])  # 3 is held, not played early
    timeline.push(rtp(2, 160), 0.03)
    assert not timeline.waiting
    check(timeline, out, [("U1", 160), ("U2", 160), ("U3", 160)])
    timeline.push(rtp(4, 480), 0.04)
    check(timeline, out, [("U1", 160), ("U2", 160), ("U3", 160), ("U4", 160)])
    assert (timeline.stats.reordered, timeline.stats.lost) == (1, 0)


def test_reorder_of_several_held_packets() -> None:
    timeline, out = make()
    feed(
        timeline,
        (rtp(1, 0), 0.00),
        (rtp(4, 480), 0.01),
        (rtp(3, 320), 0.02),
        (rtp(2, 160), 0.03),
    )
    check(timeline, out, [("U1", 160), ("U2", 160), ("U3", 160), ("U4", 160)])
    assert timeline.stats.reordered == 2  # 3 and 2 each arrived after a higher sequence


def test_loss_is_declared_after_the_window_and_filled_exactly() -> None:
    timeline, out = make(jitter_window=0.2)
    feed(timeline, (rtp(1, 0), 0.00), (rtp(2, 160), 0.02), (rtp(4, 480), 0.06))
    feed(timeline, (rtp(5, 640), 0.08))
    timeline.poll(0.25)  # 4 has waited 0.19 s
    assert timeline.waiting
    check(timeline, out, [("U1", 160), ("U2", 160)])
    timeline.poll(0.27)
    assert not timeline.waiting
    check(timeline, out, [("U1", 160), ("U2", 160), ("-", 160), ("U4", 160), ("U5", 160)])
    assert timeline.stats.lost == 1


def test_loss_is_also_declared_by_a_later_push() -> None:
    timeline, out = make(jitter_window=0.2)
    feed(timeline, (rtp(1, 0), 0.00), (rtp(3, 320), 0.04), (rtp(4, 480), 0.30))
    check(timeline, out, [("U1", 160), ("-", 160), ("U3", 160), ("U4", 160)])
    assert timeline.stats.lost == 1
    assert not timeline.waiting


def test_each_gap_gets_its_own_window() -> None:
    timeline, out = make(jitter_window=0.2)
    feed(timeline, (rtp(1, 0), 0.00), (rtp(3, 320), 0.04), (rtp(5, 640), 0.10))
    timeline.poll(0.245)  # 3 has waited 0.205 s; 5 only 0.145 s
    check(timeline, out, [("U1", 160), ("-", 160), ("U3", 160)])
    assert timeline.waiting
    timeline.push(rtp(4, 480), 0.25)  # fills the second gap in time
    check(timeline, out, [("U1", 160), ("-", 160), ("U3", 160), ("U4", 160), ("U5", 160)])
    assert (timeline.stats.lost, timeline.stats.reordered) == (1, 1)


def test_oldest_held_packet_releases_everything_up_to_it() -> None:
    timeline, out = make(jitter_window=0.2)
    # 5 arrives first (gap 2..4); 3 arrives later: when 5 expires both gaps are given up.
    feed(timeline, (rtp(1, 0), 0.00), (rtp(5, 640), 0.01), (rtp(3, 320), 0.10))
    timeline.poll(0.205)  # 5 has waited 0.195 s
    check(timeline, out, [("U1", 160)])
    timeline.poll(0.215)
    expected = [("U1", 160), ("-", 160), ("U3", 160), ("-", 160), ("U5", 160)]
    check(timeline, out, expected)
    assert timeline.stats.lost == 2


def test_duplicates_of_released_and_held_packets_are_dropped() -> None:
    timeline, out = make()
    feed(
        timeline,
        (rtp(1, 0), 0.00),
        (rtp(3, 320), 0.01),
        (rtp(3, 320), 0.02),  # duplicate of a held packet
        (rtp(2, 160), 0.03),
        (rtp(2, 160), 0.04),  # duplicate of a released packet
        (rtp(1, 0), 0.05),
    )
    check(timeline, out, [("U1", 160), ("U2", 160), ("U3", 160)])
    assert (timeline.stats.duplicate, timeline.stats.late, timeline.stats.lost) == (3, 0, 0)


def test_late_packet_after_loss_declared_is_dropped() -> None:
    timeline, out = make(jitter_window=0.2)
    feed(timeline, (rtp(1, 0), 0.00), (rtp(3, 320), 0.02))
    timeline.poll(0.30)
    expected = [("U1", 160), ("-", 160), ("U3", 160)]
    check(timeline, out, expected)
    timeline.push(rtp(2, 160), 0.31)  # too late: never overwrites the silence
    check(timeline, out, expected)
    timeline.push(rtp(2, 160), 0.32)  # a second copy is a duplicate
    assert (timeline.stats.late, timeline.stats.duplicate, timeline.stats.lost) == (1, 1, 1)


def test_packet_before_the_first_one_is_late() -> None:
    timeline, out = make()
    feed(timeline, (rtp(10, 1600), 0.00), (rtp(9, 1440), 0.01), (rtp(11, 1760), 0.02))
    check(timeline, out, [("U10", 160), ("U11", 160)])
    assert (timeline.stats.late, timeline.stats.duplicate) == (1, 0)


def test_sequence_wraps_at_16_bits() -> None:
    timeline, out = make()
    feed(
        timeline,
        (rtp(65534, 0), 0.00),
        (rtp(0, 320), 0.01),  # arrives before 65535, across the wrap
        (rtp(65535, 160), 0.02),
        (rtp(1, 480), 0.03),
    )
    expected = [("U254", 160), ("U255", 160), ("U0", 160), ("U1", 160)]
    check(timeline, out, expected)
    stats = timeline.stats
    assert (stats.lost, stats.reordered, stats.duplicate, stats.late) == (0, 1, 0, 0)
    assert out.events == []


def test_loss_across_the_sequence_wrap() -> None:
    timeline, out = make()
    feed(timeline, (rtp(65535, 0), 0.00), (rtp(1, 320), 0.02))
    timeline.flush()
    check(timeline, out, [("U255", 160), ("-", 160), ("U1", 160)])
    assert timeline.stats.lost == 1


def test_timestamp_wraps_at_32_bits() -> None:
    timeline, out = make()
    feed(
        timeline,
        (rtp(1, 2**32 - 160), 0.00),
        (rtp(2, 0), 0.02),
        (rtp(3, 320), 0.06),  # 160 samples of sender silence right after the wrap
    )
    check(timeline, out, [("U1", 160), ("U2", 160), ("-", 160), ("U3", 160)])
    assert out.events == []
    assert timeline.stats.first_timestamp == 2**32 - 160
    assert timeline.stats.last_timestamp == 320


def test_marker_and_silence_suppression_become_exact_silence_not_loss() -> None:
    timeline, out = make()
    feed(
        timeline,
        (rtp(1, 0), 0.00),
        (rtp(2, 160), 0.02),
        (rtp(3, 8160, marker=True), 1.02),  # new talkspurt after 1 s of DTX
        (rtp(4, 8320), 1.04),
    )
    check(timeline, out, [("U1", 160), ("U2", 160), ("-", 7840), ("U3", 160), ("U4", 160)])
    assert timeline.stats.lost == 0
    assert out.events == []


def test_timestamp_jump_back_with_next_sequence_rebases() -> None:
    timeline, out = make()
    feed(
        timeline,
        (rtp(1, 10000), 0.00),
        (rtp(2, 10160), 0.02),
        (rtp(3, 500), 0.04),  # sender reset its clock
        (rtp(4, 660), 0.06),
    )
    check(timeline, out, [("U1", 160), ("U2", 160), ("U3", 160), ("U4", 160)])
    assert out.events == [
        {
            "type": "timestamp_jump",
            "at": 320 / 8000,
            "jump": -9820 / 8000,
            "ssrc": "0x0000000a",
            "sequence": 3,
        }
    ]
    assert timeline.stats.timestamp_jumps == 1


def test_partial_overlap_is_appended_without_an_event() -> None:
    timeline, out = make()
    feed(timeline, (rtp(1, 0), 0.00), (rtp(2, 100), 0.02), (rtp(3, 260), 0.04))
    check(timeline, out, [("U1", 160), ("U2", 160), ("U3", 160)])
    assert out.events == []
    assert (timeline.stats.overlaps, timeline.stats.timestamp_jumps) == (1, 0)


def test_gap_up_to_max_gap_is_filled_and_beyond_is_a_discontinuity() -> None:
    timeline, out = make(max_gap=1.0)
    feed(
        timeline,
        (rtp(1, 0), 0.0),
        (rtp(2, 160 + 8000), 1.0),  # exactly max_gap: filled
        (rtp(3, 320 + 8000 + 8001), 2.0),  # one sample over: skipped
        (rtp(4, 480 + 8000 + 8001), 2.02),
    )
    check(timeline, out, [("U1", 160), ("-", 8000), ("U2", 160), ("U3", 160), ("U4", 160)])
    discontinuity = {
        "type": "discontinuity",
        "at": 8320 / 8000,
        "skipped": 8001 / 8000,
        "ssrc": "0x0000000a",
        "sequence": 3,
    }
    assert out.events == [discontinuity]
    assert timeline.stats.discontinuities == [discontinuity]


def test_default_max_gap_is_30_seconds() -> None:
    timeline, out = make()
    feed(timeline, (rtp(1, 0), 0.0), (rtp(2, 160 + 240000), 30.0))
    feed(timeline, (rtp(3, 320 + 240000 + 240001), 60.0))
    check(timeline, out, [("U1", 160), ("-", 240000), ("U2", 160), ("U3", 160)])
    assert len(out.of_type("discontinuity")) == 1


# Streams


def test_ssrc_change_with_short_pause_continues_directly() -> None:
    timeline, out = make(jitter_window=0.2)
    feed(timeline, (rtp(1, 1000), 0.00), (rtp(2, 1160), 0.02), (rtp(4, 1480), 0.05))
    timeline.push(rtp(500, 90000, ssrc=OTHER), 0.07)  # on probation
    timeline.push(rtp(501, 90160, ssrc=OTHER), 0.09)  # passed: flushes 4 (filling 3) first
    timeline.push(rtp(3, 1320), 0.10)  # the old SSRC's straggler: stale, already counted lost
    expected = [("U1", 160), ("U2", 160), ("-", 160), ("U4", 160), ("U244", 160), ("U245", 160)]
    check(timeline, out, expected)
    assert out.events == [
        {"type": "ssrc_change", "from": "0x0000000a", "to": "0x0000000b", "at": 0.08, "pause": 0.0}
    ]
    stats = timeline.stats
    assert (stats.lost, stats.stale_ssrc, stats.late) == (1, 1, 0)
    assert stats.to_dict()["ssrcs"] == ["0x0000000a", "0x0000000b"]


def test_ssrc_change_with_long_pause_keeps_the_pause_as_silence() -> None:
    timeline, out = make(jitter_window=0.2)
    feed(timeline, (rtp(1, 1000), 0.00), (rtp(2, 1160), 0.02))
    # Old audio ends at 0.02 + 0.02 = 0.04 s wall clock; the new SSRC starts at 1.04 s.
    feed(timeline, (rtp(7, 5555, ssrc=OTHER), 1.04), (rtp(8, 5715, ssrc=OTHER), 1.06))
    check(timeline, out, [("U1", 160), ("U2", 160), ("-", 8000), ("U7", 160), ("U8", 160)])
    assert out.of_type("ssrc_change") == [
        {"type": "ssrc_change", "from": "0x0000000a", "to": "0x0000000b", "at": 0.04, "pause": 1.0}
    ]


def test_ssrc_change_pause_just_inside_the_window_is_not_inserted() -> None:
    timeline, out = make(jitter_window=0.2)
    feed(timeline, (rtp(1, 0), 0.00), (rtp(9, 777, ssrc=OTHER), 0.19))  # pause 0.17 s
    feed(timeline, (rtp(10, 937, ssrc=OTHER), 0.21))
    check(timeline, out, [("U1", 160), ("U9", 160), ("U10", 160)])


def test_ssrc_change_pause_longer_than_max_gap_is_a_discontinuity() -> None:
    timeline, out = make(max_gap=1.0)
    feed(timeline, (rtp(1, 0), 0.00), (rtp(9, 777, ssrc=OTHER), 5.02))
    feed(timeline, (rtp(10, 937, ssrc=OTHER), 5.04))
    check(timeline, out, [("U1", 160), ("U9", 160), ("U10", 160)])
    assert [event["type"] for event in out.events] == ["ssrc_change", "discontinuity"]
    assert out.events[0]["pause"] == 0.0
    assert out.events[1]["skipped"] == 5.0


def test_old_ssrc_returning_after_the_timeout_is_another_change() -> None:
    timeline, out = make()
    feed(timeline, (rtp(1, 0), 0.00), (rtp(50, 0, ssrc=OTHER), 0.02))
    feed(timeline, (rtp(51, 160, ssrc=OTHER), 0.04))
    feed(timeline, (rtp(2, 160), 1.00))  # B alive: stale
    # B silent for > 2 s: A is back, after a pause of 3.10 - (0.04 + 0.02) = 3.04 s.
    feed(timeline, (rtp(3, 320), 3.10), (rtp(4, 480), 3.12))
    changes = [(e["from"], e["to"]) for e in out.of_type("ssrc_change")]
    assert changes == [("0x0000000a", "0x0000000b"), ("0x0000000b", "0x0000000a")]
    assert (timeline.stats.stale_ssrc, timeline.stats.lost) == (1, 1)
    assert out.runs() == [
        ("U1", 160),
        ("U50", 160),
        ("U51", 160),
        ("-", 24320),
        ("U3", 160),
        ("U4", 160),
    ]


# One stray packet must not hijack a stream (issue 16)


def attacked(stray: RtpPacket, *, after: int = 100) -> tuple[RtpTimeline, Recorder]:
    """250 PCMU packets of one SSRC, 20 ms apart, and `stray` right after packet `after`."""
    timeline, out = make()
    for n in range(250):
        timeline.push(rtp(n, 160 * n), 0.02 * n)
        if n == after:
            timeline.push(stray, 0.02 * n + 0.01)
    timeline.flush()
    return timeline, out


ALL_250 = [(f"U{n}", 160) for n in range(250)]  # every packet's samples, in place, nothing else


def test_a_stray_header_only_packet_of_another_ssrc_changes_nothing() -> None:
    """The attacker's 12-byte datagram: another SSRC, payload type 72 (RTCP-looking, unknown)."""
    timeline, out = attacked(rtp(7, 123456, pt=72, ssrc=OTHER, payload=b""))
    check(timeline, out, ALL_250)
    stats = timeline.stats
    assert (stats.lost, stats.stale_ssrc, stats.ssrc_probation_dropped) == (0, 0, 1)
    assert stats.ssrcs == [SSRC] and 72 not in stats.payload_types
    assert out.events == []


def test_a_stray_one_byte_audio_packet_of_another_ssrc_changes_nothing() -> None:
    timeline, out = attacked(rtp(7, 123456, ssrc=OTHER, payload=b"\x55"))
    check(timeline, out, ALL_250)  # and the stray's one sample is nowhere
    stats = timeline.stats
    assert (stats.lost, stats.stale_ssrc, stats.ssrc_probation_dropped) == (0, 0, 1)
    assert stats.ssrcs == [SSRC]
    assert out.events == []


def test_strays_of_many_ssrcs_never_take_over() -> None:
    """Audio of other SSRCs, never two in sequence from one: every one is a failed probation."""
    timeline, out = make()
    for n in range(250):
        timeline.push(rtp(n, 160 * n), 0.02 * n)
        stray_ssrc = OTHER + n % 3  # B, C, D, B, ...: each candidate is replaced by the next
        timeline.push(rtp(1000 + 2 * n, 999, ssrc=stray_ssrc, payload=b"\x55"), 0.02 * n + 0.01)
    timeline.flush()
    check(timeline, out, ALL_250)
    assert (timeline.stats.ssrc_probation_dropped, timeline.stats.lost) == (250, 0)


def test_non_audio_packets_of_another_ssrc_never_take_over() -> None:
    """In sequence, but DTMF, comfort noise or an unknown payload type: no probation at all."""
    timeline, out = make()
    for n in range(250):
        timeline.push(rtp(n, 160 * n), 0.02 * n)
        pt = (DTMF, CN, 96)[n % 3]
        timeline.push(
            rtp(1000 + n, 160 * n, pt=pt, ssrc=OTHER, payload=b"\x0a\x0a\x00\xa0"), 0.02 * n + 0.01
        )
    timeline.flush()
    check(timeline, out, ALL_250)
    stats = timeline.stats
    assert (stats.ssrc_probation_dropped, stats.dtmf, stats.comfort_noise) == (250, [], 0)


def test_a_real_ssrc_change_keeps_the_packets_held_in_probation() -> None:
    """The sender really switches (e.g. a re-INVITE): its first packet waits for the second, then
    both are placed, right after the old SSRC's last sample."""
    timeline, out = make()
    for n in range(100):
        timeline.push(rtp(n, 160 * n), 0.02 * n)
    timeline.push(rtp(5000, 777777, ssrc=OTHER), 2.00)
    check(timeline, out, [(f"U{n}", 160) for n in range(100)])  # on probation: held
    for k in range(1, 150):
        timeline.push(rtp(5000 + k, 777777 + 160 * k, ssrc=OTHER), 2.00 + 0.02 * k)
    timeline.flush()
    expected = [(f"U{n}", 160) for n in range(100)]
    expected += [(f"U{(5000 + k) % 256}", 160) for k in range(150)]
    check(timeline, out, expected)
    assert out.events == [
        {"type": "ssrc_change", "from": "0x0000000a", "to": "0x0000000b", "at": 2.0, "pause": 0.0}
    ]
    stats = timeline.stats
    assert (stats.lost, stats.stale_ssrc, stats.ssrc_probation_dropped) == (0, 0, 0)
    assert stats.ssrcs == [SSRC, OTHER]


def test_audio_of_a_stale_ssrc_is_counted_lost() -> None:
    timeline, out = make()
    feed(timeline, (rtp(1, 0), 0.00), (rtp(2, 160), 0.02))
    feed(timeline, (rtp(70, 5000, ssrc=OTHER), 0.04), (rtp(71, 5160, ssrc=OTHER), 0.06))
    feed(timeline, (rtp(3, 320), 0.07))  # the old SSRC, while the new one is alive: stale
    feed(timeline, (rtp(4, 480, pt=DTMF, payload=b"\x01\x00\x00\xa0"), 0.08))  # not audio
    timeline.flush()
    check(timeline, out, [("U1", 160), ("U2", 160), ("U70", 160), ("U71", 160)])
    assert (timeline.stats.stale_ssrc, timeline.stats.lost) == (2, 1)


def test_a_candidate_that_breaks_its_sequence_starts_probation_again() -> None:
    timeline, out = make()
    feed(timeline, (rtp(1, 0), 0.00), (rtp(2, 160), 0.02))
    feed(timeline, (rtp(50, 9000, ssrc=OTHER), 0.03), (rtp(60, 9160, ssrc=OTHER), 0.04))
    check(timeline, out, [("U1", 160), ("U2", 160)])  # 50 then 60: not in sequence
    feed(timeline, (rtp(61, 9320, ssrc=OTHER), 0.05))  # 60, 61: passed
    timeline.flush()
    check(timeline, out, [("U1", 160), ("U2", 160), ("U60", 160), ("U61", 160)])
    assert timeline.stats.ssrc_probation_dropped == 1  # 50


def test_sequence_reset_on_the_same_ssrc() -> None:
    timeline, out = make()
    feed(timeline, (rtp(100, 0), 0.00), (rtp(101, 160), 0.02), (rtp(102, 320), 0.04))
    timeline.push(rtp(40000, 777777), 0.06)  # far out of range: probation
    check(timeline, out, [("U100", 160), ("U101", 160), ("U102", 160)])
    timeline.push(rtp(40001, 777937), 0.08)  # confirmed: resync
    timeline.push(rtp(40002, 778097), 0.10)
    check(
        timeline,
        out,
        [("U100", 160), ("U101", 160), ("U102", 160), ("U64", 160), ("U65", 160), ("U66", 160)],
    )
    assert out.events == [
        {
            "type": "sequence_reset",
            "ssrc": "0x0000000a",
            "sequence": 40000,
            "at": 0.06,
            "pause": 0.0,
        }
    ]
    stats = timeline.stats
    assert (stats.sequence_resets, stats.out_of_range, stats.lost, stats.late) == (1, 0, 0, 0)


def test_sequence_reset_flushes_held_packets_and_keeps_a_long_pause() -> None:
    timeline, out = make()
    feed(timeline, (rtp(100, 0), 0.00), (rtp(102, 320), 0.02))
    feed(timeline, (rtp(20000, 50), 2.02), (rtp(20001, 210), 2.04))
    # 102 expired at the first push of the new run; its audio ended at 0.04 s: 1.98 s of pause.
    check(
        timeline,
        out,
        [("U100", 160), ("-", 160), ("U102", 160), ("-", 15840), ("U32", 160), ("U33", 160)],
    )
    assert out.events[0]["pause"] == 15840 / 8000


def test_a_single_stray_sequence_number_is_dropped() -> None:
    timeline, out = make()
    feed(timeline, (rtp(100, 0), 0.00), (rtp(30000, 160), 0.01), (rtp(101, 160), 0.02))
    feed(timeline, (rtp(102, 320), 0.04))
    timeline.flush()
    check(timeline, out, [("U100", 160), ("U101", 160), ("U102", 160)])
    assert (timeline.stats.out_of_range, timeline.stats.sequence_resets) == (1, 0)
    assert out.events == []


# Payloads


def test_ptime_change_from_10_to_30_ms() -> None:
    timeline, out = make()
    feed(
        timeline,
        (rtp(1, 0, 80), 0.00),
        (rtp(2, 80, 80), 0.01),
        (rtp(3, 160, 240), 0.04),
        # 4 (ts 400, 240 samples) is lost
        (rtp(5, 640, 240), 0.10),
    )
    timeline.flush()
    expected = [("U1", 80), ("U2", 80), ("U3", 240), ("-", 240), ("U5", 240)]
    check(timeline, out, expected)
    assert timeline.stats.lost == 1


def test_codec_switch_between_pcmu_and_pcma() -> None:
    timeline, out = make()
    feed(
        timeline,
        (rtp(1, 0, pt=PCMU), 0.00),
        (rtp(2, 160, pt=PCMA), 0.02),
        (rtp(3, 320, pt=PCMU), 0.04),
    )
    check(timeline, out, [("U1", 160), ("A2", 160), ("U3", 160)])
    assert timeline.stats.to_dict()["payload_types"] == [0, 8]


def test_comfort_noise_is_silence_from_timestamps() -> None:
    timeline, out = make()
    feed(
        timeline,
        (rtp(1, 0), 0.00),
        (rtp(2, 160, pt=CN, payload=b"\x40"), 0.02),
        (rtp(3, 4160, pt=CN, payload=b"\x40"), 0.52),
        (rtp(4, 8160, marker=True), 1.02),
    )
    check(timeline, out, [("U1", 160), ("-", 8000), ("U4", 160)])
    assert (timeline.stats.comfort_noise, timeline.stats.lost) == (2, 0)


def test_stream_starting_with_comfort_noise_is_anchored_by_it() -> None:
    timeline, out = make()
    feed(timeline, (rtp(1, 1000, pt=CN, payload=b"\x40"), 0.0), (rtp(2, 1800), 0.1))
    check(timeline, out, [("-", 800), ("U2", 160)])


def test_unknown_payload_type_takes_part_in_sequencing_only() -> None:
    timeline, out = make()
    feed(
        timeline,
        (rtp(1, 0), 0.00),
        (rtp(2, 99999999, pt=96), 0.01),
        (rtp(3, 160), 0.02),
    )
    assert not timeline.waiting  # 2 was not treated as missing
    check(timeline, out, [("U1", 160), ("U3", 160)])
    assert (timeline.stats.unknown_payload_type, timeline.stats.lost) == (1, 0)


def test_unknown_payload_type_does_not_anchor_the_timeline() -> None:
    timeline, out = make()
    feed(timeline, (rtp(1, 123456, pt=96), 0.00), (rtp(2, 500), 0.02))
    check(timeline, out, [("U2", 160)])


# DTMF


def test_dtmf_with_retransmitted_end_packets_and_interleaved_audio() -> None:
    timeline, out = make()
    feed(
        timeline,
        (rtp(1, 0), 0.00),
        (dtmf(2, 160, 160), 0.02),
        (rtp(3, 160), 0.02),
        (dtmf(4, 160, 320), 0.04),
        (rtp(5, 320), 0.04),
        (dtmf(6, 160, 480, end=True), 0.06),
    )
    expected_event = {
        "type": "dtmf",
        "digit": "5",
        "start": 160 / 8000,
        "duration": 480 / 8000,
        "volume": 10,
        "ssrc": "0x0000000a",
        "ended": True,
    }
    assert out.events == [expected_event]  # emitted as soon as the end bit is seen
    feed(
        timeline,
        (dtmf(7, 160, 480, end=True), 0.061),
        (dtmf(8, 160, 480, end=True), 0.062),
        (rtp(9, 480), 0.06),
    )
    timeline.flush()
    check(timeline, out, [("U1", 160), ("U3", 160), ("U5", 160), ("U9", 160)])
    assert out.events == [expected_event]
    stats = timeline.stats
    assert stats.dtmf == [expected_event]
    assert (stats.lost, stats.duplicate, stats.unknown_payload_type) == (0, 0, 0)


def test_dtmf_end_packets_lost_except_a_retransmission() -> None:
    timeline, out = make()
    feed(timeline, (rtp(1, 0), 0.00), (dtmf(2, 160, 160, digit=11), 0.02))
    feed(timeline, (dtmf(4, 160, 400, end=True, digit=11), 0.05))  # 3 lost
    timeline.flush()
    assert [(e["digit"], e["duration"], e["ended"]) for e in out.of_type("dtmf")] == [
        ("#", 0.05, True)
    ]
    assert timeline.stats.lost == 1
    assert timeline.position == 160  # DTMF never moves the timeline


def test_dtmf_without_end_is_emitted_at_flush() -> None:
    timeline, out = make()
    feed(timeline, (rtp(1, 0), 0.00), (dtmf(2, 160, 160, digit=0), 0.02))
    feed(timeline, (dtmf(3, 160, 320, digit=0), 0.04))
    assert out.events == []
    timeline.flush()
    assert out.events == [
        {
            "type": "dtmf",
            "digit": "0",
            "start": 0.02,
            "duration": 0.04,
            "volume": 10,
            "ssrc": "0x0000000a",
            "ended": False,
        }
    ]


def test_dtmf_without_end_is_emitted_when_the_next_event_starts() -> None:
    timeline, out = make()
    feed(
        timeline,
        (rtp(1, 0), 0.00),
        (dtmf(2, 160, 160, digit=1), 0.02),
        (dtmf(3, 800, 160, digit=2), 0.10),
        (dtmf(4, 800, 320, digit=2, end=True), 0.12),
    )
    assert [(e["digit"], e["start"], e["ended"]) for e in out.events] == [
        ("1", 0.02, False),
        ("2", 0.1, True),
    ]


def test_dtmf_pending_at_ssrc_change_is_emitted_for_the_old_ssrc() -> None:
    timeline, out = make()
    feed(timeline, (rtp(1, 0), 0.00), (dtmf(2, 160, 160, digit=9), 0.02))
    feed(timeline, (rtp(1, 0, ssrc=OTHER), 0.04), (rtp(2, 160, ssrc=OTHER), 0.06))
    assert [(e["type"], e.get("ssrc")) for e in out.events] == [
        ("dtmf", "0x0000000a"),
        ("ssrc_change", None),
    ]


def test_same_digit_twice_is_two_events() -> None:
    timeline, out = make()
    feed(
        timeline,
        (dtmf(1, 0, 400, end=True), 0.00),
        (dtmf(2, 0, 400, end=True), 0.01),
        (dtmf(3, 1600, 400, end=True), 0.20),
        (dtmf(4, 1600, 400, end=True), 0.21),
    )
    assert [e["start"] for e in out.of_type("dtmf")] == [0.0, 0.2]


def test_reordered_dtmf_is_sequenced_with_the_audio() -> None:
    timeline, out = make()
    feed(
        timeline,
        (rtp(1, 0), 0.00),
        (rtp(3, 160), 0.02),  # arrives before the DTMF packet 2
        (dtmf(2, 160, 160, end=True), 0.03),
    )
    check(timeline, out, [("U1", 160), ("U3", 160)])
    assert len(out.of_type("dtmf")) == 1
    assert (timeline.stats.lost, timeline.stats.reordered) == (0, 1)


def test_malformed_telephone_event_is_counted() -> None:
    timeline, out = make()
    feed(timeline, (rtp(1, 0), 0.00), (rtp(2, 160, pt=DTMF, payload=b"\x05"), 0.01))
    assert timeline.stats.bad_telephone_event == 1
    assert out.events == []


def test_configured_telephone_event_payload_type() -> None:
    timeline, out = make(dtmf_payload_type=96)
    event = TelephoneEvent(event=3, end=True, volume=0, duration=160).serialize()
    feed(timeline, (rtp(1, 0, pt=96, payload=event), 0.0), (rtp(2, 0, pt=101, payload=event), 0.0))
    assert [e["digit"] for e in out.of_type("dtmf")] == ["3"]
    assert timeline.stats.unknown_payload_type == 1


# End of stream, bounds, statistics


def test_flush_releases_held_packets_in_order_filling_gaps() -> None:
    timeline, out = make()
    feed(timeline, (rtp(1, 0), 0.00), (rtp(5, 640), 0.01), (rtp(3, 320), 0.02))
    assert timeline.waiting
    timeline.flush()
    assert not timeline.waiting
    expected = [("U1", 160), ("-", 160), ("U3", 160), ("-", 160), ("U5", 160)]
    check(timeline, out, expected)
    assert timeline.stats.lost == 2


def test_held_buffer_is_bounded() -> None:
    timeline, out = make()
    timeline.push(rtp(0, 0, 1), 0.0)
    for sequence in range(2, 514):  # 512 packets held behind the missing 1
        timeline.push(rtp(sequence, sequence, 1), 0.0)
    assert timeline.waiting
    assert timeline.position == 1
    timeline.push(rtp(514, 514, 1), 0.0)  # the 513th forces the oldest gap out
    assert not timeline.waiting
    assert timeline.position == 515
    assert out.samples[:3] == ["U0", "-", "U2"]
    assert timeline.stats.lost == 1


def test_held_buffer_bound_is_configurable() -> None:
    timeline, out = make(max_held=2)
    feed(timeline, (rtp(1, 0), 0.0), (rtp(3, 320), 0.0), (rtp(5, 640), 0.0))
    check(timeline, out, [("U1", 160)])
    timeline.push(rtp(6, 800), 0.0)  # 3 held packets > 2: give up on 2
    check(timeline, out, [("U1", 160), ("-", 160), ("U3", 160)])
    assert timeline.waiting  # 5, 6 still wait for 4


def test_interarrival_jitter_matches_rfc_3550() -> None:
    timeline, _ = make()
    # D = (Rj - Ri) * 8000 - (Sj - Si): 80, -80, 0.
    # J: 0 + (80 - 0)/16 = 5; 5 + (80 - 5)/16 = 9.6875; 9.6875 + (0 - 9.6875)/16 = 9.08203125
    feed(
        timeline,
        (rtp(1, 0), 0.00),
        (rtp(2, 160), 0.03),
        (rtp(3, 320), 0.04),
        (rtp(4, 480), 0.06),
    )
    assert timeline.stats.interarrival_jitter == pytest.approx(9.08203125, abs=1e-9)
    assert timeline.stats.jitter_ms == pytest.approx(9.08203125 / 8, abs=1e-12)
    assert timeline.stats.to_dict()["jitter_ms"] == 1.135


def test_interarrival_jitter_uses_arrival_order_for_reordered_packets() -> None:
    timeline, _ = make()
    # 3 then 2: D = 0.04*8000 - 320 = 0, then 0.01*8000 - (160 - 320) = 240 -> J = 240/16.
    feed(timeline, (rtp(1, 0), 0.00), (rtp(3, 320), 0.04), (rtp(2, 160), 0.05))
    assert timeline.stats.interarrival_jitter == pytest.approx(15.0, abs=1e-9)


def test_stats_to_dict() -> None:
    timeline, _ = make()
    feed(
        timeline,
        (rtp(1, 1000), 0.00),
        (rtp(2, 1160), 0.02),
        (rtp(2, 1160), 0.02),
        (dtmf(3, 1320, 160, end=True), 0.04),
        (rtp(4, 1320, pt=PCMA), 0.04),
        (rtp(6, 1640), 0.08),
    )
    timeline.flush()
    assert timeline.stats.to_dict() == {
        "received": 6,
        "lost": 1,
        "late": 0,
        "duplicate": 1,
        "reordered": 0,
        "comfort_noise": 0,
        "unknown_payload_type": 0,
        "stale_ssrc": 0,
        "ssrc_probation_dropped": 0,
        "out_of_range": 0,
        "bad_telephone_event": 0,
        "overlaps": 0,
        "timestamp_jumps": 0,
        "sequence_resets": 0,
        "jitter_ms": 0.0,
        "ssrcs": ["0x0000000a"],
        "first_timestamp": 1000,
        "last_timestamp": 1640,
        "payload_types": [0, 8, 101],
        "dtmf": [
            {
                "type": "dtmf",
                "digit": "5",
                "start": 320 / 8000,
                "duration": 160 / 8000,
                "volume": 10,
                "ssrc": "0x0000000a",
                "ended": True,
            }
        ],
        "discontinuities": [],
    }


def test_poll_without_held_packets_does_nothing() -> None:
    timeline, out = make()
    timeline.poll(100.0)
    timeline.push(rtp(1, 0), 0.0)
    timeline.poll(100.0)
    timeline.flush()
    check(timeline, out, [("U1", 160)])


def test_silence_never_runs_ahead_of_the_wall_clock() -> None:
    """A sender that jumps its timestamp 20 s ahead on every packet (each jump under max_gap)
    must not make the receiver write 20 s of silence per packet: the timeline may reach no further
    than the time since the first packet plus max_gap; beyond that a jump is a discontinuity."""
    timeline, recorder = make(max_gap=30.0)
    jump = 20 * 8000
    for n in range(50):  # one packet every 20 ms: 1 s of wall clock
        timeline.push(rtp(n, n * jump), n * 0.02)
    timeline.flush()
    assert timeline.position <= round(0.98 * 8000) + 30 * 8000  # elapsed + max_gap
    assert recorder.samples.count("-") == jump - 160  # the first jump was believed; no later
    assert len(recorder.of_type("discontinuity")) == 48
    assert sum(1 for s in recorder.samples if s != "-") == 50 * 160  # every packet's audio kept


def test_a_long_real_pause_is_still_silence() -> None:
    """The budget does not touch honest senders: 25 s of real silence after 10 s of audio."""
    timeline, recorder = make(max_gap=30.0)
    for n in range(500):
        timeline.push(rtp(n, n * 160), n * 0.02)
    resume = 500 * 160 + 25 * 8000
    timeline.push(rtp(500, resume, marker=True), 10.0 + 25.0)
    timeline.flush()
    assert recorder.samples.count("-") == 25 * 8000
    assert not recorder.of_type("discontinuity")


def test_a_new_ssrc_on_every_packet_stays_cheap_and_bounded() -> None:
    """A hostile sender (no token is needed for RTP) switching SSRC every two packets, so that
    each new one passes probation: the timeline keeps 64 SSRCs by name and counts the rest; its
    state does not grow. (With one packet per SSRC, none would ever take over.)"""
    timeline, _ = make()
    for n in range(5000):
        timeline.push(rtp(n, n * 160, ssrc=0x1000 + n // 2), n * 0.02)
    timeline.flush()
    stats = timeline.stats
    assert len(stats.ssrcs) == 64 and stats.ssrcs_not_listed == 2500 - 64
    assert len(timeline._ssrcs.retired) <= 64
    assert timeline.position == 5000 * 160  # every packet's audio is still there
