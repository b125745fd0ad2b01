"""A tap's WAV as the disk writer leaves it after every batch: byte for byte the file libsndfile
itself writes for the same audio (the sink writes batches past it and patches the header), also
for per-track files and past 4 GiB, where the file must turn RF64."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile

from receiver.storage.wav_header import check_wav, read_layout_of
from receiver.storage.wav_sink import SFC_RF64_AUTO_DOWNGRADE, SFC_UPDATE_HEADER_NOW, WavSink
from receiver.storage.wav_sink import _command as sf_command
from tests.helpers import assert_header_matches_data, missing


class LibsndfileWav:
    """The reference: the same file settings, every batch written and the header updated by
    libsndfile's own calls."""

    def __init__(self, path: Path, channels: int) -> None:
        self.file = soundfile.SoundFile(
            path, "w", samplerate=8000, channels=channels, subtype="PCM_16", format="RF64"
        )
        sf_command(self.file, SFC_RF64_AUTO_DOWNGRADE, 1)
        sf_command(self.file, SFC_UPDATE_HEADER_NOW, 0)

    def write(self, frames: np.ndarray) -> None:
        self.file.write(frames)
        sf_command(self.file, SFC_UPDATE_HEADER_NOW, 0)


def batches(channels: int, count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(channels)
    sizes = [160, 8000, 1, 4001, 2][:count]
    return [rng.integers(-32768, 32768, (n, channels), dtype=np.int16) for n in sizes]


def test_every_batch_leaves_the_file_libsndfile_writes(tmp_path: Path) -> None:
    for channels in (1, 2):
        ours, theirs = tmp_path / f"ours{channels}", tmp_path / f"theirs{channels}"
        ours.mkdir()
        theirs.mkdir()
        sink = WavSink(ours, "t", 8000, channels)
        sink.open()
        reference = LibsndfileWav(theirs / "t.wav", channels)
        assert (ours / "t.wav").read_bytes() == (theirs / "t.wav").read_bytes()
        written = []
        for frames in batches(channels, 5):
            sink.write_channels([frames[:, c].copy() for c in range(channels)])
            reference.write(frames)
            written.append(frames)
            assert (ours / "t.wav").read_bytes() == (theirs / "t.wav").read_bytes()
            assert_header_matches_data(ours / "t.wav")
        sink.close()
        reference.file.close()
        assert (ours / "t.wav").read_bytes() == (theirs / "t.wav").read_bytes()
        samples, _ = soundfile.read(ours / "t.wav", dtype="int16", always_2d=True)
        assert np.array_equal(samples, np.concatenate(written))


def test_track_files_match_the_stereo_file_after_every_batch(tmp_path: Path) -> None:
    sink = WavSink(tmp_path, "call", 8000, 2, ["inbound", "outbound"])
    sink.open()
    inbound, outbound = (np.arange(n, dtype=np.int16) for n in (3000, 2000))
    sink.write_channels([inbound, outbound])  # 2000 frames now, 1000 of inbound wait
    for name in ("call", "call.inbound", "call.outbound"):
        assert assert_header_matches_data(tmp_path / f"{name}.wav") == 2000
    sink.drain_carry()
    sink.close()
    stereo, _ = soundfile.read(tmp_path / "call.wav", dtype="int16")
    assert np.array_equal(stereo[:, 0], inbound)
    assert np.array_equal(stereo[:, 1], np.concatenate([outbound, np.zeros(1000, np.int16)]))
    for track, column in (("inbound", 0), ("outbound", 1)):
        mono, _ = soundfile.read(tmp_path / f"call.{track}.wav", dtype="int16")
        assert np.array_equal(mono, stereo[:, column])
        assert assert_header_matches_data(tmp_path / f"call.{track}.wav") == 3000


def test_past_4_gib_the_file_turns_rf64(tmp_path: Path) -> None:
    sink = WavSink(tmp_path, "long", 8000, 1)
    sink.open()
    head = np.arange(1000, dtype=np.int16)
    sink.write_channels([head])
    path = tmp_path / "long.wav"
    start = read_layout_of(path).data_offset
    # 4 GiB of audio written before (a hole: no disk space used), as 74 hours of a tap would
    os.truncate(path, start + 2**32)
    if os.stat(path).st_blocks * 512 > 2**30:
        missing("the filesystem of the test's temporary folder has no sparse files")
    os.lseek(sink._fd, start + 2**32, os.SEEK_SET)
    sink.frames_written = 2**31
    tail = np.arange(500, dtype=np.int16)
    sink.write_channels([tail])
    size = start + 2**32 + 1000
    assert os.path.getsize(path) == size
    for _ in ("recording", "closed"):
        layout = read_layout_of(path)
        assert (layout.container, layout.data_offset) == ("RF64", start)
        assert layout.data_size == size - start
        plan = check_wav(path)
        assert plan.problem is None and not plan.needed, plan.describe()
        info = soundfile.info(str(path))
        assert (info.format, info.frames) == ("RF64", 2**31 + 500)
        sink.close()
    with soundfile.SoundFile(path) as wav:
        assert np.array_equal(wav.read(1000, dtype="int16"), head)
        wav.seek(2**31)
        assert np.array_equal(wav.read(dtype="int16"), tail)
    path.unlink()
