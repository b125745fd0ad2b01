"""The benchmark runner, small: a few streams for a few seconds, nothing lost, a table and JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT


def test_bench_runner_quick(tmp_path: Path) -> None:
    output = tmp_path / "quick.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--output", str(output)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "| RTP | 1 |" in result.stdout and "| WebSocket | 1 |" in result.stdout
    data = json.loads(output.read_text())
    rows = data["rows"]
    assert {r["series"] for r in rows} == {"sink", "rtp", "burst", "overload", "ws"}
    for row in rows:
        assert row["sent"] > 0 and row["lost"] == 0, row
        assert row["sustainable"], row
        if row["series"] != "sink":
            assert row["wavs_exact"] and row["samples_compared"] > 0, row
            assert row["us_per_packet"] > 0 and row["rss_mib"] > 0, row
    assert data["summary"]["rtp_1_worker"]["max_streams"] == 40
    # The sink's and the receiver's steps at each count ran back to back, and their ratio is
    # reported at each
    steps = [(r["series"], r["streams"]) for r in rows][:4]
    assert steps == [("sink", 20), ("rtp", 20), ("sink", 40), ("rtp", 40)]
    assert set(data["summary"]["ratio_cpu_cost_by_streams"]) == {"20", "40"}
    # 40 streams starting at once, and 80 offered: every one recorded exactly, none refused
    assert data["summary"]["burst_streams_exact"] == 40
    assert data["summary"]["overload"] == {
        "offered": 80,
        "recorded_exactly": 80,
        "refused": 0,
        "damaged": 0,
    }
