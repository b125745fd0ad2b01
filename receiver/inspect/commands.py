"""`tap-receiver ls | inspect | repair`: look at recordings without a running server."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from receiver import config
from receiver.inspect.analysis import DEFAULT_SILENCE_DBFS, Levels, measure_levels, open_audio
from receiver.inspect.catalog import STATES, Catalog, loss_percent, markers
from receiver.redaction import redact
from receiver.storage.files import regular_stat
from receiver.storage.sidecar import load_sidecar
from receiver.storage.wav_header import RepairPlan, WavError, apply_repair, check_wav
from receiver.taps.tap_id import is_valid_name

COMMANDS = ("ls", "inspect", "repair")
RECENT_SECONDS = 5.0  # a WAV written this recently may belong to a running server
EXIT_NEEDS_REPAIR = 3  # repair --dry-run: some header does not match its data
EXIT_BROKEN_PIPE = 128 + 13  # as a process ended by SIGPIPE


def _recordings_setting() -> Path:
    """The `recordings` setting: RECEIVER_RECORDINGS, the RECEIVER_CONFIG file, ./recordings.
    Raises ConfigError."""
    return Path(config.one_setting("recordings", os.environ))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tap-receiver", description="Inspect recordings.")
    sub = parser.add_subparsers(dest="command", required=True)

    def recordings_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--recordings",
            type=Path,
            default=None,
            metavar="DIR",
            help="the recordings directory (default: the server's recordings setting: "
            "$RECEIVER_RECORDINGS, the $RECEIVER_CONFIG file, else ./recordings)",
        )

    ls = sub.add_parser("ls", help="list recordings, newest first")
    recordings_option(ls)
    ls.add_argument("--state", choices=STATES, help="only recordings in this state")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")

    inspect = sub.add_parser("inspect", help="levels, silence, format and sidecar of one recording")
    recordings_option(inspect)
    inspect.add_argument("target", metavar="FILE.wav|TAP_ID")
    inspect.add_argument(
        "--silence-db",
        type=float,
        default=DEFAULT_SILENCE_DBFS,
        metavar="DBFS",
        help=f"silence is at or below this level (default {DEFAULT_SILENCE_DBFS:g})",
    )
    inspect.add_argument("--json", action="store_true", help="print the figures as JSON")

    repair = sub.add_parser(
        "repair", help="fix WAV headers that do not match their data (e.g. after kill -9)"
    )
    recordings_option(repair)
    repair.add_argument("paths", nargs="*", type=Path, metavar="DIR|FILE.wav")
    repair.add_argument("--dry-run", "-n", action="store_true", help="report, change nothing")
    repair.add_argument(
        "--force",
        action="store_true",
        help=f"also touch WAVs modified in the last {RECENT_SECONDS:g} s (a server may be "
        "writing them)",
    )
    return parser


def main(argv: Sequence[str], out: TextIO | None = None) -> int:
    """Exit status: 0 done (nothing to fix, or fixed); 1 an error (no such directory or file,
    a file that cannot be read or repaired); 2 a usage error; 3 `repair --dry-run` found
    headers to fix; 141 the reader of the output went away (`| head`), as SIGPIPE ends other
    tools, quietly."""
    args = build_parser().parse_args(argv)
    stream = out or sys.stdout
    if args.recordings is None:
        try:
            args.recordings = _recordings_setting()
        except config.ConfigError as exc:
            print(f"tap-receiver: configuration error: {exc}", file=sys.stderr)
            return 2
    try:
        if args.command == "ls":
            code = list_recordings(args.recordings, args.state, args.json, stream)
        elif args.command == "inspect":
            code = inspect(args.recordings, args.target, args.silence_db, args.json, stream)
        else:
            code = repair(args.paths or [args.recordings], args.dry_run, args.force, stream)
        stream.flush()  # here, where a closed pipe can be handled, not at the interpreter's exit
    except BrokenPipeError:
        # Nothing more can be written: point stdout at /dev/null so that the interpreter's
        # final flush does not fail again, and stop.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    return code


# -- ls ---------------------------------------------------------------------------------------


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}:{minutes:02d}:{secs:06.3f}" if hours else f"{minutes}:{secs:06.3f}"


HEADINGS = (
    *("NAME", "STATE", "TRANSPORT", "CODEC", "RATE", "CHANNELS"),
    *("STARTED", "DURATION", "LOSS"),
)


def _channels(count: int | None, names: list[str] | None) -> str:
    """`1`, `2 (inbound, outbound)`."""
    if not count:
        return "-"
    return f"{count} ({', '.join(names)})" if names else str(count)


def list_recordings(directory: Path, state: str | None, as_json: bool, out: TextIO) -> int:
    if not directory.is_dir():
        print(f"tap-receiver: no directory {str(directory)!r}", file=sys.stderr)
        return 1
    rows = [r.summary() for r in Catalog(directory).scan()]
    rows = [r for r in rows if state is None or r["state"] == state]
    for row in rows:  # listed all the same, with what is known
        if row.get("problem"):
            print(f"tap-receiver: {row['name']}: {row['problem']}", file=sys.stderr)
    if as_json:
        for row in rows:
            print(json.dumps(row), file=out)
        return 0
    table = [HEADINGS]
    for r in rows:
        loss = r["loss_percent"]
        table.append(
            (
                r["name"],
                str(r["state"]),
                str(r["transport"] or "-"),
                str(r["codec"] or "-"),
                str(r["sample_rate"] or "-"),
                _channels(r["channels"], r["channel_names"]),
                (r["started_at"] or "-").replace("T", " ").removesuffix("Z"),
                _duration(r["duration_seconds"]),
                "-" if loss is None else f"{loss:.2f}%",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    right = {4, 7, 8}
    for line in table:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        ]
        print("  ".join(cells).rstrip(), file=out)
    print(f"{len(rows)} recording(s) in {directory}", file=out)
    return 0


# -- inspect ----------------------------------------------------------------------------------


def resolve_target(directory: Path, target: str) -> Path | None:
    """A WAV path as given, or `<recordings>/<TAP_ID>.wav` (if it is no regular file, opening
    it says so: a link is not followed, a fifo not waited on)."""
    path = Path(target)
    if path.suffix == ".wav" and os.path.lexists(path):
        return path
    if is_valid_name(target) and os.path.lexists(directory / f"{target}.wav"):
        return directory / f"{target}.wav"
    return None


def _db(value: float) -> str:
    return f"{value:.2f} dBFS" if math.isfinite(value) else "-inf dBFS"


def _levels_lines(levels: Levels) -> list[tuple[str, str]]:
    rate = levels.sample_rate
    lines = []
    for n, c in enumerate(levels.channels, 1):
        label = "level" if len(levels.channels) == 1 else f"channel {n}"
        lines.append(
            (
                label,
                f"peak {_db(c.peak_dbfs)} ({c.peak}), RMS {_db(c.rms_dbfs)}, clipped {c.clipped}",
            )
        )
    clipped = sum(c.clipped for c in levels.channels)
    lines.append(("clipping", f"{clipped} samples at full scale" if clipped else "none"))
    if levels.longest_silence_frames:
        start = levels.longest_silence_start / rate
        length = levels.longest_silence_frames / rate
        lines.append(
            (
                "silence",
                f"longest {length:.3f} s at {start:.3f} s "
                f"(below {levels.silence_threshold_dbfs:g} dBFS)",
            )
        )
    else:
        lines.append(("silence", f"none below {levels.silence_threshold_dbfs:g} dBFS"))
    return lines


def _sidecar_lines(sidecar: dict[str, Any]) -> list[tuple[str, str]]:
    lines = [("tap id", str(sidecar.get("tap_id")))]
    fmt = f"{sidecar.get('codec')} {sidecar.get('sample_rate')} Hz x{sidecar.get('channels')}"
    lines.append(("transport", f"{sidecar.get('transport')}, {fmt}, from {sidecar.get('remote')}"))
    state = str(sidecar.get("state"))
    if sidecar.get("end_reason"):
        state += f" ({sidecar['end_reason']})"
    if sidecar.get("error"):
        state += f": {sidecar['error']}"
    lines.append(("state", state))
    lines.append(("started", str(sidecar.get("started_at"))))
    lines.append(("ended", str(sidecar.get("ended_at") or "-")))
    if "frames_written" in sidecar:
        lines.append(
            ("written", f"{sidecar['frames_written']} frames, {sidecar.get('duration_seconds')} s")
        )
    decoding = sidecar.get("decoding")
    if decoding and isinstance(decoding, dict):
        lines.append(
            (
                "decoding",
                f"concealment {decoding.get('concealment')}: {decoding.get('concealed_frames')} "
                f"frames concealed, {decoding.get('corrupt_packets')} corrupt packets",
            )
        )
    counters = sidecar.get("counters")
    if counters and isinstance(counters, dict):
        lines.append(("counters", " ".join(f"{k}={v}" for k, v in counters.items())))
    rtp = sidecar.get("rtp")
    if rtp and isinstance(rtp, dict):
        received, lost = rtp.get("received", 0), rtp.get("lost", 0)
        share = loss_percent(rtp)
        lines.append(
            (
                "rtp",
                f"received={received} lost={lost} ({'-' if share is None else f'{share:.2f}'}%) "
                f"late={rtp.get('late', 0)} duplicate={rtp.get('duplicate', 0)} "
                f"reordered={rtp.get('reordered', 0)} jitter={rtp.get('jitter_ms', 0)} ms",
            )
        )
        ssrcs = rtp.get("ssrcs")
        listed = ", ".join(str(s) for s in ssrcs) if isinstance(ssrcs, list) else ""
        lines.append(("ssrcs", listed or "-"))
    for m in markers(sidecar):
        extra = f" ({m['duration'] * 1000:.0f} ms)" if m.get("duration") else ""
        lines.append((m["type"], f"{m['label']} at {m['at']:.3f} s{extra}"))
    return lines


def inspect(directory: Path, target: str, silence_db: float, as_json: bool, out: TextIO) -> int:
    path = resolve_target(directory, target)
    if path is None:
        print(
            f"tap-receiver: no WAV file or recording {target!r} (in {directory})", file=sys.stderr
        )
        return 1
    try:
        plan = check_wav(path)
        audio = open_audio(path)
        levels = measure_levels(audio, silence_db)
    except (OSError, WavError) as exc:
        print(f"tap-receiver: {path}: {exc}", file=sys.stderr)
        return 1
    sidecar, problem = load_sidecar(path.with_suffix(".json"))
    sidecar = redact(sidecar) if sidecar is not None else None
    if problem is not None:
        print(f"tap-receiver: {problem}", file=sys.stderr)
    if as_json:
        report = {
            "file": str(path),
            "format": audio.layout.format_name,
            "header_matches_data": plan.problem is None and not plan.needed,
            "header_problems": plan.describe() + ([plan.problem] if plan.problem else []),
            **levels.to_dict(),
            "sidecar": sidecar,
        }
        print(json.dumps(report, indent=2), file=out)
        return 0
    lines: list[tuple[str, str]] = [
        ("format", audio.layout.format_name),
        (
            "duration",
            f"{audio.duration:.3f} s ({audio.frames} frames, {plan.file_size} bytes)",
        ),
    ]
    if plan.problem:
        lines.append(("header", f"PROBLEM: {plan.problem}"))
    elif plan.needed:
        lines.append(("header", "DOES NOT MATCH THE DATA: " + "; ".join(plan.describe())))
        lines.append(("", "(`tap-receiver repair` fixes it)"))
    else:
        lines.append(("header", "matches the data"))
    lines += _levels_lines(levels)
    print(str(path), file=out)
    _print_block(lines, out)
    if sidecar is not None:
        print(f"sidecar {path.with_suffix('.json').name}", file=out)
        _print_block(_sidecar_lines(sidecar), out)
    else:
        print("no sidecar" if problem is None else "sidecar unreadable", file=out)
    return 0


def _print_block(lines: list[tuple[str, str]], out: TextIO) -> None:
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"  {key:<{width}}  {value}", file=out)


# -- repair -----------------------------------------------------------------------------------


def repair(paths: Sequence[Path], dry_run: bool, force: bool, out: TextIO) -> int:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix == ".wav")
        elif os.path.lexists(path):
            files.append(path)
        else:
            print(f"tap-receiver: no such file or directory: {path}", file=sys.stderr)
            return 1
    verb = "would fix" if dry_run else "fixed"
    counts = {"ok": 0, verb: 0, "unrepairable": 0, "skipped": 0}
    now = time.time()
    for path in files:
        try:
            st = regular_stat(path)
            if st is None:  # a link is not followed out of the directory, a fifo not waited on
                counts["skipped"] += 1
                print(f"skipped {path.name}: not a regular file", file=out)
                continue
            if not force and now - st.st_mtime < RECENT_SECONDS:
                counts["skipped"] += 1
                print(
                    f"skipped {path.name}: modified in the last {RECENT_SECONDS:g} s "
                    "(a running server may be writing it; --force to repair anyway)",
                    file=out,
                )
                continue
            plan: RepairPlan = check_wav(path)
            if plan.problem is not None:
                counts["unrepairable"] += 1
                print(f"cannot repair {path.name}: {plan.problem}", file=out)
                continue
            if not plan.needed:
                counts["ok"] += 1
                continue
            if not dry_run:
                apply_repair(path, plan)
        except (OSError, WavError) as exc:
            counts["unrepairable"] += 1
            print(f"cannot repair {path.name}: {exc}", file=out)
            continue
        counts[verb] += 1
        print(f"{verb} {path.name} ({plan.frames} frames):", file=out)
        for line in plan.describe():
            print(f"  {line}", file=out)
    summary = ", ".join(f"{n} {k}" for k, n in counts.items() if n or k == "ok")
    print(f"{len(files)} WAV file(s) checked: {summary}", file=out)
    if counts["unrepairable"]:
        return 1
    return EXIT_NEEDS_REPAIR if dry_run and counts[verb] else 0
