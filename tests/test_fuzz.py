"""Property-based fuzzing of everything that reads hostile input: RTP packets, the RTP and
Media Streams timelines, and every WebSocket dialect, the last both in-process (a real registry
and disk writer) and against the real server over real WebSockets.

Bounded for the default suite (the whole file runs in well under a minute); `bench/fuzz_long.py`
runs the same properties with many more examples.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

from receiver.codecs.formats import AudioFormat, FormatError
from receiver.config import from_argv
from receiver.rtp.datagrams import MAX_DATAGRAM, Batch
from receiver.rtp.fast_lane import STORE_BYTES, FastLane
from receiver.rtp.packet import RtpPacket, RtpParseError, TelephoneEvent, is_rtcp
from receiver.rtp.timeline import MAX_HELD, RtpTimeline
from receiver.storage.writer import DiskWriter
from receiver.taps.audio_buffer import PCM16, PCM16_BE, AudioBuffer, ChannelBuffer
from receiver.taps.registry import TapRegistry
from receiver.ws.dialects import SessionContext, choose_session
from receiver.ws.dialects.media_streams import MediaStreamsSession
from receiver.ws.track_timeline import MAX_GAP_SECONDS, TrackTimeline
from tests.helpers import ServerProcess, assert_header_matches_data, read_wav, wait_for_sidecar

#: Examples per property in the default suite; bench/fuzz_long.py raises it (FUZZ_EXAMPLES) and
#: keeps failures in a database (FUZZ_DATABASE); the default suite writes nothing to the tree.
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
DATABASE = (
    DirectoryBasedExampleDatabase(os.environ["FUZZ_DATABASE"])
    if os.environ.get("FUZZ_DATABASE")
    else None
)
FAST = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=DATABASE,
    suppress_health_check=[HealthCheck.too_slow],
)
SLOW = settings(
    FAST,
    max_examples=max(10, EXAMPLES // 6),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

PARSE_REASONS = {
    "too_short",
    "bad_version",
    "csrc_past_end",
    "extension_past_end",
    "padding_past_end",
    "bad_padding",
    "bad_telephone_event",
}

# -- RtpPacket ------------------------------------------------------------------------------------

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)


@st.composite
def rtp_packets(draw: st.DrawFn, max_payload: int = 1500) -> RtpPacket:
    has_extension = draw(st.booleans())
    return RtpPacket(
        payload_type=draw(st.integers(0, 127)),
        marker=draw(st.booleans()),
        sequence=draw(u16),
        timestamp=draw(u32),
        ssrc=draw(u32),
        payload=draw(st.binary(max_size=max_payload)),
        csrcs=tuple(draw(st.lists(u32, max_size=15))),
        extension_profile=draw(u16) if has_extension else None,
        extension=draw(st.binary(max_size=64).map(lambda b: b[: len(b) // 4 * 4]))
        if has_extension
        else b"",
        padding=draw(st.integers(0, 255)),
    )


def mutated_datagrams() -> st.SearchStrategy[bytes]:
    """Arbitrary bytes, and valid packets with a few bytes changed or cut (closer to the parser's
    edges than pure noise: version 2, the flag bits, lengths that almost fit)."""

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(rtp_packets(max_payload=64)).serialize())
        for _ in range(draw(st.integers(0, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data[: draw(st.integers(0, len(data)))])

    return st.one_of(st.binary(max_size=200), mutate())


@FAST
@given(mutated_datagrams())
@example(b"\x80")
@example(b"\xa0\x00" + bytes(10))  # padding bit, nothing after the header
@example(b"\x9f\x00" + bytes(10))  # 15 CSRCs announced, none there
@example(b"\x90\x00" + bytes(10) + b"\x00\x00\xff\xff")  # a 65535-word extension
def test_rtp_parse_never_raises_anything_else(data: bytes) -> None:
    is_rtcp(data)
    try:
        packet = RtpPacket.parse(data)
    except RtpParseError as exc:
        assert exc.reason in PARSE_REASONS, exc.reason
        return
    assert packet.payload_type < 128 and packet.sequence <= 0xFFFF
    # What parses, re-serializes to something that parses to the same packet.
    assert RtpPacket.parse(packet.serialize()) == packet
    try:
        TelephoneEvent.parse(packet.payload)
    except RtpParseError as exc:
        assert exc.reason == "bad_telephone_event"


@FAST
@given(rtp_packets())
def test_rtp_serialize_then_parse_is_identity(packet: RtpPacket) -> None:
    assert RtpPacket.parse(packet.serialize()) == packet


# -- RtpTimeline ----------------------------------------------------------------------------------

MAX_GAP = 2.0  # seconds: small, so the fuzzer reaches the discontinuity path


class CountingOutput:
    """A TimelineOutput that checks each call and counts what was emitted."""

    def __init__(self, max_gap: int) -> None:
        self.max_gap = max_gap
        self.audio_samples = 0
        self.silence_samples = 0
        self.events: list[dict[str, object]] = []

    def audio(self, codec: str, payload: bytes) -> None:
        assert codec in ("PCMU", "PCMA")
        self.audio_samples += len(payload)

    def silence(self, samples: int) -> None:
        assert 0 < samples <= self.max_gap, samples  # never more than max_gap in one go
        self.silence_samples += samples

    def event(self, event: dict[str, object]) -> None:
        json.dumps(event, allow_nan=False)  # sidecar-safe
        self.events.append(event)


@st.composite
def rtp_streams(draw: st.DrawFn) -> list[tuple[RtpPacket, float]]:
    """A sender's stream gone wrong: mostly in order, with jumps, wraps, reordering, SSRC and
    payload type changes, odd payload sizes, and arrival times that stall, burst or go back."""
    seq = draw(u16)
    ts = draw(u32)
    ssrc = draw(st.sampled_from([1, 2, 0xFFFFFFFF]))
    now = draw(st.floats(0, 1e6, allow_nan=False))
    packets: list[tuple[RtpPacket, float]] = []
    for _ in range(draw(st.integers(1, 120))):
        step = draw(
            st.sampled_from(["next", "next", "next", "seq", "ts", "ssrc", "dup", "back", "pt"])
        )
        size = draw(st.sampled_from([160, 160, 80, 0, 1, 240, 1500]))
        if step == "seq":
            seq = (seq + draw(st.integers(-200, 40000))) & 0xFFFF
        elif step == "ts":
            ts = (ts + draw(st.integers(-(1 << 31), 1 << 31))) & 0xFFFFFFFF
        elif step == "ssrc":
            ssrc = draw(st.sampled_from([1, 2, 3, 0xFFFFFFFF]))
        elif step == "back":
            seq, ts = (seq - draw(st.integers(1, 150))) & 0xFFFF, (ts - 160) & 0xFFFFFFFF
        pt = draw(st.sampled_from([0, 0, 0, 8, 13, 101, 96, 127])) if step == "pt" else 0
        payload = bytes([len(packets) % 256]) * size
        if pt == 101 and draw(st.booleans()):
            payload = TelephoneEvent(
                draw(st.integers(0, 255)), draw(st.booleans()), 10, draw(u16)
            ).serialize()
        packet = RtpPacket(pt, draw(st.booleans()), seq, ts, ssrc, payload)
        now += draw(st.sampled_from([0.02, 0.02, 0.0, 0.001, 0.25, 3.0, -0.5]))
        packets.append((packet, now))
        if step != "dup":
            seq = (seq + 1) & 0xFFFF
            ts = (ts + max(size, 1)) & 0xFFFFFFFF
    return packets


@FAST
@given(rtp_streams(), st.sampled_from([0.0, 0.06, 0.2]), st.sampled_from([4, MAX_HELD]))
def test_rtp_timeline_invariants(
    stream: list[tuple[RtpPacket, float]], jitter: float, max_held: int
) -> None:
    output = CountingOutput(round(MAX_GAP * 8000))
    timeline = RtpTimeline(output, jitter=jitter, max_gap=MAX_GAP, max_held=max_held)
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


class RecordingOutput:
    """A TimelineOutput that records every call, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    def audio(self, codec: str, payload: bytes) -> None:
        self.calls.append(("audio", codec, bytes(payload)))

    def silence(self, samples: int) -> None:
        self.calls.append(("silence", samples))

    def event(self, event: dict[str, object]) -> None:
        self.calls.append(("event", json.dumps(event, sort_keys=True)))


@FAST
@given(rtp_streams(), st.sampled_from([0.0, 0.2]))
def test_rtp_push_inlined_case_is_the_general_path(
    stream: list[tuple[RtpPacket, float]], jitter: float
) -> None:
    """push()'s inlined in-order audio case gives exactly what the general path gives."""
    by_packet, by_fields = RecordingOutput(), RecordingOutput()
    a = RtpTimeline(by_packet, jitter=jitter, max_gap=MAX_GAP)
    b = RtpTimeline(by_fields, jitter=jitter, max_gap=MAX_GAP)
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


# -- TrackTimeline --------------------------------------------------------------------------------


class TrackRecorder:
    def __init__(self) -> None:
        self.frames = 0

    def append(self, kind: str, data: bytes) -> None:
        assert kind in ("PCMU", "PCMA", PCM16, PCM16_BE)
        assert data and (kind not in (PCM16, PCM16_BE) or len(data) % 2 == 0)
        self.frames += len(data) // 2 if kind in (PCM16, PCM16_BE) else len(data)

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
        timeline.add(chunk, timestamp, "PCMU", bytes([n % 256]) * samples)
        total += samples
        # Each chunk may move the track by at most max_gap of silence plus its own length;
        # what waits for a hole is bounded.
        assert timeline.reach <= total + len(chunks) * max_gap
        assert len(timeline._held) <= timeline.max_held
    timeline.flush()
    assert not timeline._held
    assert output.frames == timeline.end <= total + len(chunks) * max_gap
    json.dumps(timeline.stats.to_dict(), allow_nan=False)


# -- WebSocket dialects, in process ---------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
numbers_or_junk = st.one_of(
    st.integers(-5, 400),
    st.integers(-5, 400).map(str),
    st.sampled_from(
        ["NaN", "Infinity", "-inf", "1e999", "1e308", "-1e18", "12abc", "", " 7 ", 10**18]
    ),
    st.floats(allow_nan=False, allow_infinity=False),
    json_values,
)
payloads = st.one_of(
    st.binary(max_size=400).map(b64),
    st.sampled_from(["!!!", "abc", "=", "AAA", "A" * 7, ""]),
    json_values,
)
tracks = st.sampled_from(
    ["inbound", "outbound", "inbound_track", "OUTBOUND", "both_tracks", "x", None, 3]
)


@st.composite
def media_streams_messages(draw: st.DrawFn) -> Any:
    kind = draw(
        st.sampled_from(["media"] * 6 + ["start", "connected", "dtmf", "mark", "stop", "odd"])
    )
    if kind == "media":
        media = {
            "track": draw(tracks),
            "chunk": draw(numbers_or_junk),
            "timestamp": draw(numbers_or_junk),
            "payload": draw(payloads),
        }
        media = {k: v for k, v in media.items() if draw(st.integers(0, 9))}  # sometimes missing
        return {"event": "media", "streamSid": "MZ", "media": draw(st.just(media) | json_values)}
    if kind == "start":
        encoding = draw(
            st.sampled_from(["audio/x-mulaw", "audio/x-alaw", "audio/x-L16", "audio/opus", 7])
        )
        media_format = {"encoding": encoding, "sampleRate": draw(numbers_or_junk), "channels": 1}
        start = {
            "streamSid": draw(json_values),
            "tracks": draw(st.one_of(st.lists(tracks, max_size=3), tracks, json_values)),
            "mediaFormat": draw(st.just(media_format) | json_values),
            "customParameters": draw(json_values),
        }
        return {"event": "start", "start": draw(st.just(start) | json_values)}
    if kind == "dtmf":
        return {"event": "dtmf", "dtmf": draw(json_values | st.just({"digit": "5"}))}
    if kind == "odd":
        return draw(json_values)
    return {"event": kind, kind: draw(json_values), "protocol": draw(json_values)}


def frame_sequences() -> st.SearchStrategy[list[str | bytes]]:
    """What a hostile or broken client sends: dialect openers, then anything."""
    text_frames = st.one_of(
        media_streams_messages().map(json.dumps),
        json_values.map(json.dumps),
        st.text(max_size=60),
        st.sampled_from(
            [
                "{",
                "content-type:audio/l16;rate=16000;channels=2",
                '{"content-type": "audio/alaw;rate=8000"}',
                '{"event": "websocket:connected", "content-type": "audio/l16;rate=16000"}',
                '{"sampleRate": 16000, "mixType": "stereo"}',
                '{"event": "dtmf", "dtmf": {"digit": "7"}}',
                '{"sampleRate": "x"}',
                "[" * 5000,
                '{"content-type": ' + "[" * 5000,
            ]
        ),
    )
    binary_frames = st.binary(max_size=700)
    first = st.one_of(
        media_streams_messages().map(json.dumps),
        st.sampled_from(
            [
                '{"event": "connected", "protocol": "Call", "version": "1.0"}',
                '{"event": "websocket:connected", "content-type": "audio/l16;rate=16000"}',
                '{"sampleRate": 8000, "mixType": "mono"}',
                "content-type:audio/mulaw;rate=8000",
            ]
        ),
        text_frames,
        binary_frames,
    )
    rest = st.lists(st.one_of(text_frames, text_frames, binary_frames), max_size=40)
    return st.tuples(first, rest).map(lambda t: [t[0], *t[1]])


def deep_json(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def media_msg(chunk: object, timestamp: object, payload: bytes, track: object = None) -> str:
    media = {"chunk": chunk, "timestamp": timestamp, "payload": b64(payload)}
    if track is not None:
        media["track"] = track
    return json.dumps({"event": "media", "media": media})


START_INBOUND = json.dumps({"event": "start", "start": {"tracks": ["inbound"]}})

# Hostile inputs that broke a tap before the fixes (each is also replayed against the server).
REGRESSIONS: dict[str, list[str | bytes]] = {
    # 10^12 ms ahead: 8e12 samples of silence, the writer's np.zeros failed the tap (14.6 TiB).
    "absurd-timestamp": [
        START_INBOUND,
        media_msg("1", "0", b"\1" * 160),
        media_msg("2", "1e12", b"\2" * 160),
        media_msg("3", "40", b"\3" * 160),
    ],
    # "NaN" / "Infinity" as numbers: int(nan) raised ValueError and ended the tap mid-call.
    "nan-chunk": [
        media_msg("NaN", "Infinity", b"\1" * 160),
        media_msg("2", "1e308", b"\2" * 160),
    ],
    "nan-rate": [
        json.dumps(
            {
                "event": "start",
                "start": {"mediaFormat": {"encoding": "audio/x-L16", "sampleRate": "NaN"}},
            }
        )
    ],
    # Nested deeper than the sidecar's JSON encoder recurses: no sidecar could be written.
    "deep-custom-parameters": [
        '{"event": "start", "start": {"tracks": ["inbound"], "customParameters": '
        + deep_json(1000)
        + "}}",
        media_msg(1, 0, b"\1" * 160),
    ],
    "deep-fork-metadata": ['{"sampleRate": 8000, "x": ' + deep_json(1000) + "}", b"\1\0" * 80],
    "deep-media-track": [
        START_INBOUND,
        media_msg(1, 0, b"\1" * 160),
        '{"event": "media", "media": {"payload": "AAAA", "track": ' + deep_json(1000) + "}}",
        media_msg(2, 20, b"\2" * 160),
    ],
    # A first text frame nested deeper than the stdlib JSON parser recurses: RecursionError.
    "deep-format-frame": ['{"content-type": ' + "[" * 5000, b"\1" * 160],
}


def run_session(
    frames: list[str | bytes], recordings: Path, seconds_per_frame: float = 0.0
) -> dict[str, Any]:
    """Feed frames to the session `choose_session` picks, as `ws_tap` does, with a real registry
    and disk writer; return the final sidecar. `seconds_per_frame` replays at that pace on the
    Media Streams session's clock (a live stream's frames are spread over real time)."""

    async def scenario() -> dict[str, Any]:
        config = from_argv([f"--recordings={recordings}", "--stream-jitter-ms=200"], {})
        writer = DiskWriter()
        registry = TapRegistry(recordings, writer, 0.2)
        ctx = SessionContext(f"fuzz-{uuid.uuid4().hex[:12]}", "127.0.0.1", registry, config)
        fmt = AudioFormat("PCMU")
        session = None
        reason = "closed"
        replayed = 0.0
        for frame in frames:
            if isinstance(frame, bytes):
                session = session or choose_session(ctx, None, fmt)
                session.binary(frame)
            else:
                session = session or choose_session(ctx, frame, fmt)
                if seconds_per_frame and isinstance(session, MediaStreamsSession):
                    replayed += seconds_per_frame
                    session.clock = lambda r=replayed: time.monotonic() + r  # type: ignore[method-assign]
                try:
                    session.text(frame)
                except FormatError:
                    reason = "unsupported format"
                    break
            registry.flush() if len(frames) % 7 == 0 else None
            buffer = session.tap.buffer if session.tap is not None else None
            if buffer is not None:
                assert_buffer_bounded(buffer, frames)
        session = session or choose_session(ctx, None, fmt)
        if session.tap is None and reason != "closed":
            writer.shutdown()
            return {"state": "refused"}
        tap = session.end()
        future = registry.finish(tap, reason)
        assert future is not None
        await asyncio.wrap_future(future)
        writer.shutdown()
        assert tap.name is not None
        sidecar: dict[str, Any] = json.loads((recordings / f"{tap.name}.json").read_text())
        frames_on_disk = assert_header_matches_data(recordings / f"{tap.name}.wav")
        assert frames_on_disk == sidecar["frames_written"]
        return sidecar

    return asyncio.run(scenario())


def assert_buffer_bounded(buffer: AudioBuffer | ChannelBuffer, frames: list[str | bytes]) -> None:
    """No more audio than the input could justify: every byte a sample, plus max_gap a message."""
    limit = sum(len(f) for f in frames) + len(frames) * round(MAX_GAP_SECONDS * 48000)
    assert buffer.frames <= limit, (buffer.frames, limit)


def check_sidecar(sidecar: dict[str, Any]) -> None:
    if sidecar.get("state") == "refused":
        return
    assert sidecar["state"] == "finished", sidecar.get("error")
    json.dumps(sidecar, allow_nan=False)  # strict JSON: no NaN or Infinity
    assert sidecar["counters"].get("errors", 0) == sum(
        n for name, n in sidecar["counters"].items() if name in BAD_INPUT_COUNTERS
    )


BAD_INPUT_COUNTERS = {
    "malformed_json",
    "unknown_event",
    "duplicate_start",
    "bad_media",
    "bad_base64",
    "bad_dtmf",
    "late_start_format",
    "unexpected_track",
    "bad_payload_length",
    "unexpected_binary",
    "no_metadata",
    "bad_metadata",
}


@pytest.mark.parametrize("name", REGRESSIONS)
def test_dialect_regressions(name: str, tmp_path: Path) -> None:
    check_sidecar(run_session(REGRESSIONS[name], tmp_path))


@SLOW
@given(frames=frame_sequences())
def test_dialect_sessions_survive_anything(frames: list[str | bytes], tmp_path: Path) -> None:
    recordings = tmp_path / uuid.uuid4().hex
    recordings.mkdir()
    check_sidecar(run_session(frames, recordings))


# -- WebSocket dialects, against the real server ---------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    server = ServerProcess(
        tmp_path_factory.mktemp("fuzz") / "rec", "--no-auth", "--stream-jitter-ms", "200"
    ).start()
    yield server
    assert server.stop() == 0, server.log()
    assert "Traceback" not in server.log()


async def send_frames(url: str, frames: list[str | bytes], protocols: tuple[str, ...]) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, protocols=protocols) as ws,
    ):
        for frame in frames:
            if ws.closed:
                break
            try:
                await (ws.send_bytes(frame) if isinstance(frame, bytes) else ws.send_str(frame))
            except ConnectionError:
                break
        await ws.close()


@SLOW
@given(
    frames=frame_sequences(),
    protocols=st.sampled_from([(), (), ("audio.drachtio.org",), ("audio.jambonz.org",)]),
)
def test_real_server_survives_hostile_frames(
    fuzz_server: ServerProcess, frames: list[str | bytes], protocols: tuple[str, ...]
) -> None:
    tap_id = f"fz-{uuid.uuid4().hex[:12]}"
    asyncio.run(send_frames(f"{fuzz_server.ws_url}/tap/{tap_id}", frames, protocols))
    sidecar_path = fuzz_server.recordings / f"{tap_id}.json"
    try:
        sidecar = wait_for_sidecar(fuzz_server.recordings, tap_id, timeout=10)
    except AssertionError:
        # Refused before any recording started (an unsupported format first): no files at all.
        assert not sidecar_path.exists() and not sidecar_path.with_suffix(".wav").exists()
        return
    check_sidecar(sidecar)
    assert sidecar["end_reason"] == "closed" or sidecar["end_reason"].startswith(
        "unsupported format"
    ), sidecar["end_reason"]
    assert (
        assert_header_matches_data(fuzz_server.recordings / f"{tap_id}.wav")
        == sidecar["frames_written"]
    )
    assert fuzz_server.health() is not None


def test_real_server_regressions(fuzz_server: ServerProcess) -> None:
    for frames in REGRESSIONS.values():
        tap_id = f"rg-{uuid.uuid4().hex[:12]}"
        asyncio.run(send_frames(f"{fuzz_server.ws_url}/tap/{tap_id}", frames, ()))
        sidecar = wait_for_sidecar(fuzz_server.recordings, tap_id, timeout=10)
        check_sidecar(sidecar)
        assert sidecar["end_reason"] == "closed", sidecar["end_reason"]
    assert "Traceback" not in fuzz_server.log()


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
        timeline.add(n, ts, "PCMU", bytes([n]) * 160)
    timeline.flush()
    assert rec.samples == layout(1, 2, 3)
    assert timeline.stats.discontinuities == 0 and timeline.stats.timestamp_jumps == 0


def test_a_jump_past_max_gap_is_a_discontinuity_and_later_timestamps_follow_it() -> None:
    rec = SampleRecorder()
    timeline = TrackTimeline(rec, 8000, 1600)
    for n, ts in ((1, 0), (2, 20), (3, 1e12), (4, 1e12 + 20), (5, 1e12 + 60)):
        timeline.add(None, ts, "PCMU", bytes([n]) * 160)
    timeline.flush()
    assert rec.samples == layout(1, 2, 3, 4, None, 5)  # the 20 ms hole after 4 is kept
    assert timeline.stats.discontinuities == 1


def test_a_gap_within_max_gap_is_still_silence_of_its_length() -> None:
    rec = SampleRecorder()
    timeline = TrackTimeline(rec, 8000, 1600)
    timeline.add(None, 0, "PCMU", b"\1" * 160)
    timeline.add(None, 29_000, "PCMU", b"\2" * 160)
    timeline.flush()
    assert rec.samples == layout(1) + [None] * (29 * 8000 - 160) + layout(2)
    assert timeline.stats.discontinuities == 0


def test_chunks_piling_up_at_one_far_place_are_bounded() -> None:
    rec = SampleRecorder()
    timeline = TrackTimeline(rec, 8000, 8000, max_held=16)
    timeline.add(None, 0, "PCMU", b"\1" * 160)
    for _ in range(1000):
        timeline.add(None, 500, "PCMU", b"\2" * 160)  # all wait for the hole before 500 ms
        assert len(timeline._held) <= 16
    timeline.flush()
    assert rec.samples[:4000] == layout(1) + [None] * (4000 - 160)
    assert len(rec.samples) == 4000 + 160  # they overlap each other: one chunk's length


def test_a_track_silent_longer_than_max_gap_stays_aligned(tmp_path: Path) -> None:
    """The cap measures from the track's padded end: a late outbound track is not pulled in."""
    frames: list[str | bytes] = [
        json.dumps({"event": "start", "start": {"tracks": ["inbound", "outbound"]}})
    ]
    for n in range(1, 2501):  # 50 s inbound; outbound starts at 40 s with its own chunk 1
        frames.append(media_msg(n, (n - 1) * 20, b"\x11" * 160, "inbound"))
        if n > 2000:
            frames.append(media_msg(n - 2000, (n - 1) * 20, b"\x22" * 160, "outbound"))
    sidecar = run_session(frames, tmp_path, seconds_per_frame=0.01)  # 4500 frames over 45 s
    check_sidecar(sidecar)
    samples, _ = read_wav(tmp_path / sidecar["file"])
    assert samples.shape == (2500 * 160, 2)
    outbound = samples[:, 1]
    assert not outbound[: 2000 * 160].any()
    assert (outbound[2000 * 160 :] == outbound[-1]).all() and outbound[-1] != 0
    assert sidecar["tracks"]["outbound"]["discontinuities"] == 0


def test_new_track_names_after_the_start_are_not_collected(tmp_path: Path) -> None:
    """Before the fix every media message with a new track name grew a list searched per
    message (quadratic time, unbounded memory) for the whole call."""

    async def scenario() -> int:
        config = from_argv([f"--recordings={tmp_path}"], {})
        writer = DiskWriter()
        registry = TapRegistry(tmp_path, writer, 1.0)
        ctx = SessionContext("tracks", None, registry, config)
        session = choose_session(ctx, START_INBOUND, AudioFormat("PCMU"))
        session.text(START_INBOUND)
        for n in range(5000):
            session.text(media_msg(None, None, b"\1", f"t{n}"))
        registry.finish(session.end(), "closed")
        writer.shutdown()
        assert session.tap is not None
        assert session.tap.counters["unexpected_track"] == 5000
        return len(session._seen_tracks)  # type: ignore[attr-defined]

    assert asyncio.run(scenario()) <= 2
