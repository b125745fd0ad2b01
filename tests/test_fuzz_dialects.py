"""Property-based fuzzing of every WebSocket dialect in process (the session `choose_session`
picks, a real registry and disk writer): whatever a client sends, the tap ends with a valid WAV and
a strict-JSON sidecar that counts the bad input. Then the regressions and fixes, exactly."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest
from hypothesis import given

from receiver.codecs.encoding import Encoding
from receiver.codecs.formats import AudioFormat
from receiver.config import from_argv
from receiver.storage.writer import DiskWriter
from receiver.taps.registry import TapRegistry
from receiver.ws.dialects import SessionContext, choose_session
from tests.fuzzing import (
    REGRESSIONS,
    SLOW,
    START_INBOUND,
    check_sidecar,
    flush_points,
    frame_sequences,
    media_msg,
    run_session,
)
from tests.helpers import read_wav


@pytest.mark.parametrize("flush", ["at the end", "after every frame"])
@pytest.mark.parametrize("name", REGRESSIONS)
def test_dialect_regressions(name: str, flush: str, tmp_path: Path) -> None:
    frames = REGRESSIONS[name]
    flush_after = range(len(frames)) if flush == "after every frame" else ()
    check_sidecar(run_session(frames, tmp_path, flush_after=flush_after))


@SLOW
@given(frames=frame_sequences(), flush_after=flush_points())
def test_dialect_sessions_survive_anything(
    frames: list[str | bytes], flush_after: frozenset[int], tmp_path: Path
) -> None:
    """Any frames, with the writer taking the pending audio after any of them."""
    recordings = tmp_path / uuid.uuid4().hex
    recordings.mkdir()
    check_sidecar(run_session(frames, recordings, flush_after=flush_after))


def test_a_track_silent_longer_than_max_gap_stays_aligned(tmp_path: Path) -> None:
    """The cap measures from the track's padded end: a late outbound track is not pulled in."""
    frames: list[str | bytes] = [
        json.dumps({"event": "start", "start": {"tracks": ["inbound", "outbound"]}})
    ]
    for n in range(1, 2501):  # 50 s inbound; outbound starts at 40 s with its own chunk 1
        frames.append(media_msg(n, (n - 1) * 20, b"\x11" * 160, "inbound"))
        if n > 2000:
            frames.append(media_msg(n - 2000, (n - 1) * 20, b"\x22" * 160, "outbound"))
    # 4500 frames over 45 s, flushed every 0.2 s (every 20 frames), as the server does
    sidecar = run_session(
        frames, tmp_path, seconds_per_frame=0.01, flush_after=range(0, len(frames), 20)
    )
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
        ctx = SessionContext("tracks", None, config.ws, registry.start)
        session = choose_session(ctx, START_INBOUND, AudioFormat(Encoding.PCMU))
        session.text(START_INBOUND)
        for n in range(5000):
            session.text(media_msg(None, None, b"\1", f"t{n}"))
        registry.finish(session.end(), "closed")
        writer.shutdown()
        assert session.tap is not None
        assert session.tap.counters["unexpected_track"] == 5000
        return len(session._seen_tracks)  # type: ignore[attr-defined]

    assert asyncio.run(scenario()) <= 2
