"""One tap's files on disk: `<name>.wav` (16-bit PCM) and its per-track WAVs.

Used only from the writer thread; what the event loop may know of it is `info`, a frozen
snapshot that the writer replaces whole after each change. The WAV is opened as RF64 with
libsndfile's auto-downgrade, so it is a plain RIFF/WAVE file (with a JUNK chunk reserved) unless
it passes 4 GiB, where it becomes RF64 instead of silently corrupting. After every batch the
header is rewritten to describe exactly the data on disk, so a `kill -9` loses at most the batch
that was not yet written.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile

from receiver.codecs.decoders import StreamDecoders
from receiver.codecs.law_check import LawCheck
from receiver.storage.channel_aligner import ChannelAligner

SFC_UPDATE_HEADER_NOW = 0x1060
SFC_RF64_AUTO_DOWNGRADE = 0x1210
MAX_SUFFIX = 10_000


def _command(handle: soundfile.SoundFile, command: int, value: int) -> int:
    # soundfile exposes no API for these libsndfile commands; its low-level handle does.
    return int(soundfile._snd.sf_command(handle._file, command, soundfile._ffi.NULL, value))


def reserve_name(directory: Path, tap_id: str) -> tuple[str, int]:
    """Claim `<tap_id>.wav`, else `<tap_id>.1.wav`, `.2` ...: an existing recording is never
    overwritten, also not by a concurrent tap with the same id (O_EXCL decides). Returns the
    name and the new WAV, open for writing (file creation is dear: it is not opened twice)."""
    for n in range(MAX_SUFFIX):
        name = tap_id if n == 0 else f"{tap_id}.{n}"
        if os.path.lexists(directory / f"{name}.json"):
            continue  # a sidecar whose WAV was removed still names a recording
        try:
            fd = os.open(directory / f"{name}.wav", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            continue
        return name, fd
    raise FileExistsError(f"no free file name for tap {tap_id!r} after {MAX_SUFFIX} tries")


@dataclass(frozen=True, slots=True)
class SinkInfo:
    """What the event loop may read of a sink (the writer thread replaces it whole)."""

    name: str | None = None  # the file base name once reserved (may carry a .N suffix)
    frames_written: int = 0
    track_names: tuple[str, ...] = ()  # base names of the per-track WAVs
    error: str | None = None
    codec_mismatch: dict[str, Any] | None = None  # G.711 of the other law, likely (law_check)


class WavSink:
    """The WAV file of one tap. Every method may raise OSError / soundfile.LibsndfileError."""

    def __init__(
        self,
        directory: Path,
        tap_id: str,
        sample_rate: int,
        channels: int,
        track_names: list[str] | None = None,
    ) -> None:
        self.directory = directory
        self.tap_id = tap_id
        self.sample_rate = sample_rate
        self.channels = channels
        self.name: str | None = None
        self.frames_written = 0
        self.error: str | None = None
        self._file: soundfile.SoundFile | None = None
        self._data_offset = 0
        # Channels that arrive separately are interleaved only as far as all have data; the
        # rest waits there for the next batch (bounded by the caller's alignment of the tracks).
        self._aligner = ChannelAligner(channels)
        self._track_names = track_names or []
        self.track_sinks: dict[str, WavSink] = {}
        # The writer's book-keeping: files created yet, the sidecar to create them with, and
        # batches that came before them.
        self.opened = False
        self.initial_sidecar: dict[str, Any] | None = None
        self.waiting: list[Any] = []
        # The writer's check of its first seconds of G.711 (None once it has said its piece)
        self.law_check: LawCheck | None = LawCheck()
        self.codec_mismatch: dict[str, Any] | None = None
        # The tap's codec state (Opus, G.722), kept from batch to batch and file to file
        self.decoders = StreamDecoders(sample_rate)
        self.info = SinkInfo()  # for the event loop: see `publish`

    def publish(self) -> None:
        """Let the event loop see the current name, frame count and error (one assignment of
        a frozen object: a reader on another thread sees the old snapshot or the new one)."""
        self.info = SinkInfo(
            self.name,
            self.frames_written,
            tuple(s.name for s in self.track_sinks.values() if s.name),
            self.error,
            self.codec_mismatch,
        )

    @property
    def wav_path(self) -> Path:
        return self.directory / f"{self.name}.wav"

    @property
    def sidecar_path(self) -> Path:
        return self.directory / f"{self.name}.json"

    def open(self) -> None:
        self.name, fd = reserve_name(self.directory, self.tap_id)
        try:
            self._file = soundfile.SoundFile(
                fd,
                "w",
                samplerate=self.sample_rate,
                channels=self.channels,
                subtype="PCM_16",
                format="RF64",
                closefd=True,
            )
        except BaseException:
            with contextlib.suppress(OSError):  # libsndfile may have closed it already
                os.close(fd)
            raise
        _command(self._file, SFC_RF64_AUTO_DOWNGRADE, 1)
        _command(self._file, SFC_UPDATE_HEADER_NOW, 0)
        self._data_offset = os.fstat(fd).st_size  # the header, before any audio
        for track in self._track_names:
            track_sink = WavSink(self.directory, f"{self.name}.{track}", self.sample_rate, 1)
            track_sink.open()
            self.track_sinks[track] = track_sink

    def rename(self, new_id: str, announce: Callable[[str], None] | None = None) -> None:
        """Move this tap's files to `new_id` (or `new_id.N`): the open file keeps being written
        under its new name. A name is claimed first (O_EXCL), then each file is renamed over its
        placeholder, so no other recording is ever replaced. `announce` is told the new name
        before the files move (so nobody sees them under a name the tap does not have)."""
        self.tap_id = new_id
        if self.name is None:
            return
        old_wav, old_json = self.wav_path, self.sidecar_path
        new_name, fd = reserve_name(self.directory, new_id)
        os.close(fd)  # a placeholder: the open file is renamed over it
        if announce is not None:
            announce(new_name)
        os.replace(old_wav, self.directory / f"{new_name}.wav")
        if old_json.exists():
            os.replace(old_json, self.directory / f"{new_name}.json")
        self.name = new_name
        for track, track_sink in self.track_sinks.items():
            track_sink.rename(f"{new_name}.{track}")

    def write_channels(self, parts: list[np.ndarray]) -> None:
        """Write one int16 array per channel; channels of unequal length are evened out over
        batches (what one channel has beyond the others waits for the next call)."""
        if self.channels == 1:
            self.write(parts[0].reshape(-1, 1))
            return
        columns = self._aligner.push(parts)
        if len(columns[0]):
            self._write_aligned(columns)

    def _write_aligned(self, columns: list[np.ndarray]) -> None:
        """Equal-length channels: the interleaved WAV, and each per-track WAV its column, so
        the per-track files always match the stereo one sample for sample."""
        self.write(np.column_stack(columns))
        for track_sink, column in zip(self.track_sinks.values(), columns, strict=False):
            track_sink.write(column.reshape(-1, 1))

    def drain_carry(self) -> None:
        """At the end: pad the shorter channels with silence and write what is left."""
        columns = self._aligner.drain()
        if len(columns[0]):
            self._write_aligned(columns)

    def hand_over_carry(self, successor: WavSink) -> None:
        """A segment split (max_tap_duration): what one channel has beyond the others belongs
        at the start of the next file, not padded with silence at the end of this one."""
        self._aligner.hand_over(successor._aligner)
        successor.decoders = self.decoders  # the codec state goes on into the next file

    def write(self, frames: np.ndarray) -> None:
        if self._file is None or len(frames) == 0:
            return
        # libsndfile's own write: soundfile's write() wraps it in five seeks per call (to keep
        # its position and frame count, which nothing here reads).
        data = np.ascontiguousarray(frames, dtype=np.int16)
        handle = self._file._file
        count = len(data)
        written = soundfile._snd.sf_writef_short(
            handle, soundfile._ffi.from_buffer("short[]", data), count
        )
        if written != count:
            # The handle knows why (e.g. ENOSPC).
            detail = soundfile._ffi.string(soundfile._snd.sf_strerror(handle))
            raise OSError(f"wrote {written} of {count} frames: {detail.decode(errors='replace')}")
        self.frames_written += count
        _command(self._file, SFC_UPDATE_HEADER_NOW, 0)

    def close(self) -> None:
        handle, self._file = self._file, None
        if handle is not None:
            handle.close()
        for track_sink in self.track_sinks.values():
            track_sink.close()

    def abandon(self) -> None:
        """Its files could not be created: remove whatever part of them was (a reserved name,
        a header), so that a tap refused for want of files leaves nothing on disk."""
        handle, self._file = self._file, None
        if handle is not None:
            with contextlib.suppress(Exception):
                handle.close()
        for track_sink in self.track_sinks.values():
            track_sink.abandon()
        if self.name is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.wav_path)
            self.name = None

    def fail(self, error: str) -> None:
        """After a write error: keep the header true to what reached the disk, then close."""
        self.error = error
        handle, self._file = self._file, None
        if handle is None:
            return
        try:
            # A failed write may have left part of a frame: cut the file to whole frames, then
            # let libsndfile (which sizes the header from the file length) describe exactly that.
            frame_bytes = 2 * self.channels
            frames = (os.path.getsize(self.wav_path) - self._data_offset) // frame_bytes
            os.truncate(self.wav_path, self._data_offset + frames * frame_bytes)
            self.frames_written = frames
            _command(handle, SFC_UPDATE_HEADER_NOW, 0)
        finally:
            with contextlib.suppress(Exception):  # closing a broken file may fail again
                handle.close()
