"""A 30-second soak in the default suite: WebSocket taps and RTP streams starting and ending
continuously, `kill -9` and a restart half way, and the checker of `bench/soak.py` over every
file (valid, finished or recovered, sample-exact, nothing lost beyond the kill's window)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.soak import soak

FLUSH_INTERVAL = 0.5
IN_FLIGHT = 0.3  # audio a tap may have in socket buffers and the event loop at the kill


def test_soak_smoke_with_kill_9(tmp_path: Path) -> None:
    report = soak(
        tmp_path,
        seconds=30.0,
        ws=6,
        rtp=6,
        tap_seconds=(2.0, 6.0),
        kill_at=0.5,
        flush_interval=FLUSH_INTERVAL,
        in_flight=IN_FLIGHT,
        seed=7,
        extra=[],
    )
    print("\n" + json.dumps(report, indent=2))
    assert report["problems"] == []
    assert report["server_exit_code"] == 0
    kinds = report["taps_by_kind"]
    assert kinds["rtp"] >= 20 and kinds["ws-raw"] >= 10 and kinds["ws-media-streams"] >= 5
    # Only taps around the kill lost audio: per slot, the one it cut and one started while down.
    assert report["taps_exact"] >= report["taps"] - 2 * (6 + 6)
    assert report["recovered"] >= 1  # taps open at the kill were finalized at start-up
    assert report["lost_to_the_kill_seconds"]["max"] <= FLUSH_INTERVAL + IN_FLIGHT
