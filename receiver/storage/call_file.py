"""A call's stereo WAV from its legs' finished WAVs: each leg's audio at its offset, silence
elsewhere (before a late leg, after the shorter one). Runs in the disk writer (off the event
loop), a block at a time, so memory stays bounded whatever the call's length."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import soundfile

from receiver.storage.sidecar import write_json_atomic
from receiver.storage.wav_sink import WavSink

BLOCK = 1 << 20  # frames per block

# A leg: its WAV, where it begins on the call (frames), and the file's (st_dev, st_ino) when the
# leg ended: a file deleted and replaced by another recording of that name is not the leg.
CallLeg = tuple[Path, int, tuple[int, int]]


def file_identity(path: Path) -> tuple[int, int]:
    status = os.stat(path)
    return status.st_dev, status.st_ino


def write_call(
    directory: Path,
    call_id: str,
    rate: int,
    legs: list[CallLeg],
    sidecar: dict[str, Any],
) -> str:
    """`<call_id>.wav` (or `.N`, never over another recording) with one channel per leg, leg
    `c` from frame `legs[c][1]` on, and its sidecar. Returns the file's base name. Raises
    OSError or soundfile.LibsndfileError (then nothing of the call's files is left)."""
    for path, _, identity in legs:
        try:
            same = file_identity(path) == identity
        except FileNotFoundError:
            same = False
        if not same:
            raise OSError(f"{path.name}: the leg's WAV was deleted or replaced since it ended")
    sources = [soundfile.SoundFile(str(path)) for path, _, _ in legs]
    sink = WavSink(directory, call_id, rate, len(legs))
    try:
        for source in sources:
            if source.channels != 1 or source.samplerate != rate:
                raise ValueError(f"{source.name}: not mono at {rate} Hz")
        total = max(off + src.frames for src, (_, off, _) in zip(sources, legs, strict=True))
        sink.open()
        for start in range(0, total, BLOCK):
            end = min(total, start + BLOCK)
            block = np.zeros((end - start, len(legs)), np.int16)
            for channel, (source, (_, offset, _)) in enumerate(zip(sources, legs, strict=True)):
                low, high = max(start, offset), min(end, offset + source.frames)
                if high > low:
                    source.seek(low - offset)
                    block[low - start : high - start, channel] = source.read(high - low, "int16")
            sink.write(block)
        sink.close()
        final = {**sidecar, "file": sink.wav_path.name, "frames_written": sink.frames_written,
                 "duration_seconds": round(sink.frames_written / rate, 6)}  # fmt: skip
        write_json_atomic(sink.sidecar_path, final)
    except BaseException:
        sink.abandon()
        raise
    finally:
        for source in sources:
            source.close()
    assert sink.name is not None
    return sink.name
