"""What the fuzzing test modules (tests/test_fuzz_*.py) share: their hypothesis settings, the
strategies that build hostile input (RTP packets and streams, WebSocket frame sequences), the
in-process harness for the WebSocket dialects, and the checks on what comes out. Not a test module:
`bench/fuzz_long.py` uses it too (longer runs, coverage-guided runs)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time
import uuid
from collections.abc import Collection
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

from receiver.codecs.encoding import Encoding
from receiver.codecs.formats import AudioFormat, FormatError
from receiver.config import from_argv
from receiver.rtp.packet import RtpPacket, TelephoneEvent
from receiver.storage.writer import DiskWriter
from receiver.taps.audio_buffer import AudioBuffer, ChannelBuffer
from receiver.taps.registry import TapRegistry
from receiver.ws.dialects import SessionContext, choose_session
from receiver.ws.dialects.media_streams import MediaStreamsSession
from receiver.ws.track_timeline import MAX_GAP_SECONDS
from tests.helpers import assert_header_matches_data

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


# -- RTP ------------------------------------------------------------------------------------------

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


# -- WebSocket dialects ---------------------------------------------------------------------------


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


#: The longest frame sequence `frame_sequences` makes.
MAX_FRAMES = 41


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
    rest = st.lists(st.one_of(text_frames, text_frames, binary_frames), max_size=MAX_FRAMES - 1)
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


def flush_points() -> st.SearchStrategy[frozenset[int]]:
    """After which frames (by index) the registry hands pending audio to the writer, as the
    server's flusher does at any moment of a live tap."""
    return st.frozensets(st.integers(0, MAX_FRAMES - 1))


def run_session(
    frames: list[str | bytes],
    recordings: Path,
    seconds_per_frame: float = 0.0,
    flush_after: Collection[int] = (),
) -> dict[str, Any]:
    """Feed frames to the session `choose_session` picks, as `ws_tap` does, with a real registry
    and disk writer; return the final sidecar. The registry flushes after each frame whose index
    is in `flush_after` (and at the end). `seconds_per_frame` replays at that pace on the Media
    Streams session's clock (a live stream's frames are spread over real time)."""

    async def scenario() -> dict[str, Any]:
        config = from_argv([f"--recordings={recordings}", "--stream-jitter-ms=200"], {})
        writer = DiskWriter()
        registry = TapRegistry(recordings, writer, 0.2)
        tap_id = f"fuzz-{uuid.uuid4().hex[:12]}"
        ctx = SessionContext(tap_id, "127.0.0.1", config.ws, registry.start)
        fmt = AudioFormat(Encoding.PCMU)
        session = None
        reason = "closed"
        replayed = 0.0
        for index, frame in enumerate(frames):
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
            tap = session.tap
            if index in flush_after:
                registry.flush()
                if tap is not None and any(t is tap for t in registry.active):
                    assert not tap.buffer.pending  # all of it went to the writer
            if tap is not None:
                assert_buffer_bounded(tap.buffer, frames)
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
