"""Long fuzzing runs, outside the default suite.

    python -m bench.fuzz_long                          # the properties of tests/test_fuzz_*.py,
    python -m bench.fuzz_long --examples 50000         #   with many more examples each
    python -m bench.fuzz_long --atheris rtp -- -runs=2000000      # coverage-guided (atheris)
    python -m bench.fuzz_long --atheris dialects -- -max_total_time=600

Hypothesis mode runs `tests/test_fuzz_*.py` with FUZZ_EXAMPLES examples per property (the
real-server properties get a sixth of them) and keeps failing examples in the git-ignored
`bench/results/fuzz-db/` (replayed first next time). Atheris mode feeds libFuzzer's mutated
bytes to:

* `rtp`: the bytes are split into datagrams (1-byte lengths); each is parsed, and whatever parses
  goes through one RtpTimeline with the same invariants as the property test (position is what
  was emitted, held packets bounded, nothing waiting after flush);
* `dialects`: the bytes are split into WebSocket frames (text or binary) and fed to the session
  `choose_session` picks, with a real registry and disk writer that flushes after some of them;
  the sidecar must be `finished` and strict JSON and the WAV header must match its data.

Arguments after `--` go to libFuzzer (e.g. `-runs=`, `-max_total_time=`, a corpus directory).
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_hypothesis(examples: int, pytest_args: list[str]) -> int:
    env = {
        **os.environ,
        "FUZZ_EXAMPLES": str(examples),
        "FUZZ_DATABASE": str(ROOT / "bench" / "results" / "fuzz-db"),  # git-ignored
    }
    command = [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout=0",
        "--hypothesis-show-statistics",
        *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_fuzz_*.py")),
        *pytest_args,
    ]  # fmt: skip
    return subprocess.call(command, cwd=ROOT, env=env)


def split(data: bytes) -> list[bytes]:
    """Length-prefixed pieces: [len][bytes][len][bytes]..."""
    pieces, pos = [], 0
    while pos < len(data):
        length = data[pos]
        pieces.append(data[pos + 1 : pos + 1 + length * 6])  # up to 1530 bytes a piece
        pos += 1 + length * 6
    return pieces


def rtp_target(data: bytes) -> None:
    from receiver.rtp.packet import RtpPacket, RtpParseError
    from receiver.rtp.timeline import RtpTimeline
    from tests.fuzzing import PARSE_REASONS, CountingOutput

    output = CountingOutput(round(2.0 * 8000))
    timeline = RtpTimeline(output, jitter_window=0.06, max_gap=2.0, max_held=8)
    now = 0.0
    for piece in split(data):
        try:
            packet = RtpPacket.parse(piece)
        except RtpParseError as exc:
            assert exc.reason in PARSE_REASONS
            continue
        assert RtpPacket.parse(packet.serialize()) == packet
        now += (piece[-1] if piece else 0) / 1000  # arrival steps from the data: 0..255 ms
        timeline.push(packet, now)
        assert timeline.position == output.audio_samples + output.silence_samples
        assert len(timeline._held) <= 8
        timeline.poll(now)
    timeline.flush()
    assert not timeline.waiting
    assert timeline.position == output.audio_samples + output.silence_samples


def dialects_target(data: bytes, directory: Path) -> None:
    from tests.fuzzing import check_sidecar, run_session

    frames: list[str | bytes] = []
    flush_after: set[int] = set()
    for piece in split(data):
        # The first byte: "t" or "T" a text frame (what follows, as UTF-8, lossy like a real
        # peer), anything else a binary frame; "T" and "B" also flush the registry after it.
        kind = piece[:1]
        if kind in (b"t", b"T"):
            frames.append(piece[1:].decode("utf-8", "replace"))
        else:
            frames.append(piece[1:])
        if kind in (b"T", b"B"):
            flush_after.add(len(frames) - 1)
    if frames:
        check_sidecar(run_session(frames, directory, flush_after=flush_after))


def run_atheris(target: str, libfuzzer_args: list[str]) -> int:
    import atheris  # optional: pip install atheris

    with atheris.instrument_imports():  # coverage feedback from the code under test
        for module in (
            "receiver.rtp.timeline",
            "receiver.ws.track_timeline",
            "receiver.ws.dialects",
        ):
            importlib.import_module(module)
    directory = Path(tempfile.mkdtemp(prefix="fuzz-dialects-"))

    def one_input(data: bytes) -> None:
        if target == "rtp":
            rtp_target(data)
        else:
            dialects_target(data, directory)
            for path in directory.iterdir():  # keep the disk use flat over millions of runs
                path.unlink()

    atheris.Setup([sys.argv[0], *libfuzzer_args], one_input)
    atheris.Fuzz()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20_000, help="per hypothesis property")
    parser.add_argument("--atheris", choices=["rtp", "dialects"], help="coverage-guided instead")
    parser.add_argument("rest", nargs="*", help="after --: pytest or libFuzzer arguments")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.atheris:
        return run_atheris(args.atheris, args.rest)
    return run_hypothesis(args.examples, args.rest)


if __name__ == "__main__":
    sys.exit(main())
