"""`tap-receiver ls | inspect | repair` on WAVs made by the real server (then damaged the way a
crash or another tool leaves them), checked byte for byte and against numpy."""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np
import soundfile

from receiver.storage.wav_header import repair_wav
from tests.helpers import (
    ROOT,
    ServerProcess,
    assert_header_matches_data,
    missing,
    new_id,
    noise,
    send_tap,
    tap_url,
    wait_for_sidecar,
)

HOUR_AGO = time.time() - 3600


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "receiver", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def recorded_wav(server: ServerProcess, frames: int = 4000) -> tuple[Path, bytes]:
    tap_id = new_id("repair")
    asyncio.run(send_tap(tap_url(server, tap_id), [noise(frames, 11)]))
    wait_for_sidecar(server.recordings, tap_id)
    path = server.recordings / f"{tap_id}.wav"
    return path, path.read_bytes()


def layout(original: bytes) -> tuple[int, int, int]:
    """Offsets of the fact field, the data size field and the audio, found independently."""
    fact = original.index(b"fact") + 8
    data = original.index(b"data", fact)
    return fact, data + 4, data + 8


def patched(header: bytes, **fields: tuple[int, int]) -> bytes:
    out = bytearray(header)
    for offset, value in fields.values():
        out[offset : offset + 4] = struct.pack("<I", value)
    return bytes(out)


def damaged_copy(tmp: Path, name: str, content: bytes) -> Path:
    path = tmp / name
    path.write_bytes(content)
    os.utime(path, (HOUR_AGO, HOUR_AGO))  # not a file a running server is writing
    return path


def test_repair_fixes_zeroed_truncated_and_extended_files(
    server: ServerProcess, tmp_path: Path
) -> None:
    _, original = recorded_wav(server)
    fact, data_size, start = layout(original)
    assert original[:4] == b"RIFF" and original[12:16] == b"JUNK"  # libsndfile's layout
    assert struct.unpack_from("<I", original, data_size)[0] == 8000
    header, audio = original[:start], original[start:]
    damaged = tmp_path / "damaged"
    damaged.mkdir()

    zeroed = damaged_copy(
        damaged, "a-zeroed.wav", patched(header, r=(4, 0), f=(fact, 0), d=(data_size, 0)) + audio
    )
    truncated = damaged_copy(damaged, "b-truncated.wav", original[:-1001])
    extra = (np.arange(1000, dtype="<i2") * 7).tobytes()
    extended = damaged_copy(damaged, "c-extended.wav", original + extra)
    damaged_copy(damaged, "d-healthy.wav", original)

    result = cli("repair", str(damaged), "--dry-run")
    assert result.returncode == 3, result.stderr  # fixes are needed (issue 16.11)
    assert zeroed.read_bytes()[4:8] == b"\0\0\0\0"  # a dry run changes nothing
    assert "would fix a-zeroed.wav (4000 frames):" in result.stdout
    assert result.stdout.endswith("4 WAV file(s) checked: 1 ok, 3 would fix\n")

    result = cli("repair", str(damaged))
    assert result.returncode == 0, result.stderr
    riff = len(original) - 8
    assert result.stdout == (
        "fixed a-zeroed.wav (4000 frames):\n"
        f"  RIFF size: 0 -> {riff}\n"
        "  data size: 0 -> 8000\n"
        "  fact frames: 0 -> 4000\n"
        "fixed b-truncated.wav (3499 frames):\n"
        f"  RIFF size: {riff} -> {riff - 1002}\n"
        "  data size: 8000 -> 6998\n"
        "  fact frames: 4000 -> 3499\n"
        f"  cut 1 byte(s) of a partial last frame (size -> {len(original) - 1002})\n"
        "fixed c-extended.wav (5000 frames):\n"
        f"  RIFF size: {riff} -> {riff + 2000}\n"
        "  data size: 8000 -> 10000\n"
        "  fact frames: 4000 -> 5000\n"
        "4 WAV file(s) checked: 1 ok, 3 fixed\n"
    )
    assert zeroed.read_bytes() == original
    assert truncated.read_bytes() == (
        patched(header, r=(4, riff - 1002), f=(fact, 3499), d=(data_size, 6998)) + audio[:6998]
    )
    assert extended.read_bytes() == (
        patched(header, r=(4, riff + 2000), f=(fact, 5000), d=(data_size, 10000)) + audio + extra
    )
    for path in (zeroed, truncated, extended):
        assert_header_matches_data(path)
    samples, _ = soundfile.read(str(extended), dtype="int16")
    assert np.array_equal(samples[4000:], np.arange(1000) * 7)

    again = cli("repair", str(damaged), "--force")  # just repaired: modified now
    assert again.stdout == "4 WAV file(s) checked: 4 ok\n"


def test_repair_plain_44_byte_header_and_trailing_chunks(tmp_path: Path) -> None:
    samples = np.arange(-500, 500, dtype=np.int16)
    plain = tmp_path / "plain.wav"
    with wave.open(str(plain), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(samples.tobytes())
    good = plain.read_bytes()
    assert len(good) == 44 + 2000
    broken = bytearray(good)
    broken[4:8] = broken[40:44] = b"\xff\xff\xff\xff"  # what a streaming writer leaves
    plain.write_bytes(bytes(broken))
    plan = repair_wav(plain)  # the function a start-up crash recovery can call
    assert [(f.name, f.old, f.new) for f in plan.fixes] == [
        ("RIFF size", 0xFFFFFFFF, 2036),
        ("data size", 0xFFFFFFFF, 2000),
    ]
    assert plan.frames == 500 and plan.truncate_to is None
    assert plain.read_bytes() == good

    # another tool appended a LIST chunk but left the RIFF size stale: the chunk is kept
    info = b"INFOISFT" + struct.pack("<I", 6) + b"tool\0\0"
    listed = tmp_path / "listed.wav"
    listed.write_bytes(good + b"LIST" + struct.pack("<I", len(info)) + info)
    plan = repair_wav(listed)
    assert [(f.name, f.old, f.new) for f in plan.fixes] == [("RIFF size", 2036, 2036 + 26)]
    with wave.open(str(listed)) as w:
        assert (w.getnframes(), w.getnchannels(), w.getframerate()) == (500, 2, 16000)
        assert np.array_equal(np.frombuffer(w.readframes(500), "<i2"), samples)


def test_repair_upgrades_past_4_gib_to_rf64(server: ServerProcess, tmp_path: Path) -> None:
    _, original = recorded_wav(server, frames=1000)
    _, _, start = layout(original)
    big = tmp_path / "big.wav"
    big.write_bytes(original)
    size = start + 2**32 + 1000  # the data passes 4 GiB (a hole: no disk space used)
    os.truncate(big, size)
    if os.stat(big).st_blocks * 512 > 2**30:
        missing("the filesystem of the test's temporary folder has no sparse files")
    plan = repair_wav(big)
    assert plan.problem is None
    with big.open("rb") as fh:
        head = fh.read(start)
    # RF64, ds64 (28), the same fmt chunk, a JUNK filler, data: the audio has not moved
    fmt_at = original.index(b"fmt ")
    fmt = original[fmt_at : fmt_at + 8 + 40]
    frames = (size - start) // 2
    filler = start - (12 + 36 + len(fmt) + 8)
    assert head == (
        b"RF64\xff\xff\xff\xffWAVE"
        + b"ds64" + struct.pack("<IQQQI", 28, size - 8, size - start, frames, 0)
        + fmt
        + b"JUNK" + struct.pack("<I", filler - 8) + bytes(filler - 8)
        + b"data\xff\xff\xff\xff"
    )  # fmt: skip
    with big.open("rb") as fh:
        assert fh.read(start + 2000)[start:] == original[start:]
    info = soundfile.info(str(big))
    assert (info.format, info.frames) == ("RF64", (size - start) // 2)
    big.unlink()


def test_repair_skips_fresh_files_and_reports_unrepairable(
    server: ServerProcess, tmp_path: Path
) -> None:
    _, original = recorded_wav(server, frames=500)
    fresh = tmp_path / "fresh.wav"
    fresh.write_bytes(original[:-100])
    junk = damaged_copy(tmp_path, "junk.wav", b"not a wav file at all")
    result = cli("repair", str(tmp_path))
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        "skipped fresh.wav: modified in the last 5 s (a running server may be writing it; "
        "--force to repair anyway)",
        "cannot repair junk.wav: not a RIFF/RF64 WAVE file",
        "2 WAV file(s) checked: 0 ok, 1 unrepairable, 1 skipped",
    ]
    assert junk.read_bytes() == b"not a wav file at all"
    result = cli("repair", str(fresh), "--force")
    assert result.returncode == 0 and "fixed fresh.wav (450 frames):" in result.stdout
    assert_header_matches_data(fresh)


def test_inspect_figures_match_numpy(server: ServerProcess) -> None:
    rate = 16000
    t = np.arange(rate) / rate
    left = np.concatenate(
        [
            0.5 * 32767 * np.sin(2 * np.pi * 440 * t),  # 1 s of sine at -6 dBFS
            np.zeros(int(0.7 * rate)),  # 0.7 s of silence on both channels
            np.tile([32767.0, -32768.0], int(0.15 * rate)),  # 0.3 s of clipping on the left
        ]
    )
    right = np.concatenate(
        [
            0.1 * 32767 * np.sin(2 * np.pi * 1000 * t),
            np.zeros(int(0.7 * rate)),
            np.full(int(0.3 * rate), 20.0),
        ]
    )
    samples = np.column_stack([left, right]).astype(np.int16)
    tap_id = new_id("inspect")
    raw = samples.astype("<i2").tobytes()
    frames: list[bytes | str] = [f"content-type:audio/l16;rate={rate};channels=2"]
    frames += [raw[i : i + 6400] for i in range(0, len(raw), 6400)]
    asyncio.run(send_tap(tap_url(server, tap_id), frames))
    sidecar = wait_for_sidecar(server.recordings, tap_id)

    result = cli("inspect", "--recordings", str(server.recordings), tap_id, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    x = samples.astype(np.float64)
    for c, channel in enumerate(report["channels"]):
        peak = int(np.abs(x[:, c]).max())
        rms = math.sqrt(np.mean(x[:, c] ** 2))
        assert channel["peak"] == peak
        assert channel["peak_dbfs"] == round(20 * math.log10(peak / 32768), 2)
        assert channel["rms_dbfs"] == round(20 * math.log10(rms / 32768), 2)
        assert channel["clipped_samples"] == int(np.count_nonzero(np.abs(x[:, c]) >= 32767))
    assert report["channels"][0]["clipped_samples"] == int(0.3 * rate)
    assert report["channels"][1]["clipped_samples"] == 0
    # silence on both channels (at or below -60 dBFS = 32.8): the 0.7 s, plus the right
    # channel's level 20 only counts while the left is silent too, which it is not
    assert report["longest_silence"] == {"start_seconds": 1.0, "duration_seconds": 0.7}
    assert report["frames"] == len(samples) and report["header_matches_data"] is True
    assert report["format"] == "RIFF/WAVE 16-bit PCM, extensible, 16000 Hz, 2 ch"
    assert report["sidecar"] == sidecar

    wav = server.recordings / f"{tap_id}.wav"
    text = cli("inspect", str(wav))
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0] == str(wav)
    rms_left = 20 * math.log10(math.sqrt(np.mean(x[:, 0] ** 2)) / 32768)
    assert f"  channel 1  peak 0.00 dBFS (32768), RMS {rms_left:.2f} dBFS, clipped 4800" in lines
    assert "  clipping   4800 samples at full scale" in lines
    assert "  silence    longest 0.700 s at 1.000 s (below -60 dBFS)" in lines
    assert f"  duration   2.000 s (32000 frames, {wav.stat().st_size} bytes)" in lines
    assert "  header     matches the data" in lines
    assert f"sidecar {tap_id}.json" in lines
    assert "  transport  websocket, L16 16000 Hz x2, from 127.0.0.1" in lines

    missing = cli("inspect", "--recordings", str(server.recordings), "no-such-tap")
    assert missing.returncode == 1 and "no WAV file or recording 'no-such-tap'" in missing.stderr


def test_ls_lists_newest_first(server: ServerProcess, tmp_path: Path) -> None:
    directory = tmp_path / "recordings"
    directory.mkdir()
    names = []
    for n, size in enumerate((800, 1600)):
        tap_id = new_id(f"ls{n}")
        asyncio.run(send_tap(tap_url(server, tap_id), [noise(size, n)]))
        wait_for_sidecar(server.recordings, tap_id)
        for ext in ("wav", "json"):
            shutil.copy(server.recordings / f"{tap_id}.{ext}", directory)
        names.append(tap_id)
    result = cli("ls", "--recordings", str(directory))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "NAME",
        "STATE",
        "TRANSPORT",
        "CODEC",
        "RATE",
        "CHANNELS",
        "STARTED",
        "DURATION",
        "LOSS",
    ]
    assert [line.split()[0] for line in lines[1:3]] == [names[1], names[0]]
    assert lines[1].split()[1:6] == ["finished", "websocket", "PCMU", "8000", "1"]
    assert lines[1].split()[-2:] == ["0:00.200", "-"]
    assert lines[2].split()[-2:] == ["0:00.100", "-"]
    assert lines[3] == f"2 recording(s) in {directory}"
    as_json = cli("ls", "--recordings", str(directory), "--json", "--state", "finished")
    rows = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [r["name"] for r in rows] == [names[1], names[0]]
    assert rows[0]["duration_seconds"] == 0.2
