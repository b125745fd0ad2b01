"""One tap's files on disk: `<name>.wav` (16-bit PCM) and its per-track WAVs.

Used only from the writer thread; what the event loop may know of it is `info`, a frozen
snapshot that the writer replaces whole after each change. The WAV is opened as RF64 with
libsndfile's auto-downgrade, so it is a plain RIFF/WAVE file (with a JUNK chunk reserved) unless
it passes 4 GiB, where it becomes RF64 instead of silently corrupting. After every batch the
header is rewritten to describe exactly the data on disk, so a `kill -9` loses at most the batch
that was not yet written.

libsndfile creates and closes the files and writes their headers. The batches in between go
straight to the file descriptor, and the header's size fields are patched with one `pwrite` of
the header as libsndfile laid it out (`_HeaderPatch`; byte for byte what libsndfile writes, a
test checks): with libsndfile's write and header update a batch cost ~34 µs, this way ~21 µs,
most of it the kernel's copy, and with thousands of taps that is much of the writer's time. Past
4 GiB the header changes shape (RIFF -> RF64 with a `ds64` chunk), and libsndfile updates it
itself from then on. Before closing, libsndfile is told to size the header from the file (its
own frame count did not see the batches).
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile

from receiver.codecs.decoders import StreamDecoders
from receiver.codecs.law_check import LawCheck
from receiver.storage.channel_aligner import ChannelAligner
from receiver.storage.wav_header import WavError, read_layout

SFC_UPDATE_HEADER_NOW = 0x1060
SFC_RF64_AUTO_DOWNGRADE = 0x1210
MAX_SUFFIX = 10_000
RIFF_LIMIT = 0xFFFFFFFF  # the largest RIFF size field: past it the file must be RF64


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


class _HeaderPatch:
    """The header libsndfile wrote for an empty RIFF file, and where its size fields are (the
    RIFF size, the `fact` chunk's frame count, the `data` chunk's size, as
    receiver.storage.wav_header reads them): `patch` rewrites them for that much audio, in one
    `pwrite` of the whole header."""

    __slots__ = ("_fact", "_frame_bytes", "_header")

    def __init__(self, header: bytes, fact_offset: int | None, frame_bytes: int) -> None:
        self._header = bytearray(header)
        self._fact = fact_offset
        self._frame_bytes = frame_bytes

    @classmethod
    def read(cls, fd: int, data_offset: int) -> _HeaderPatch | None:
        """None unless the header is plain RIFF 16-bit PCM with the audio right after it."""
        header = os.pread(fd, data_offset, 0)
        try:
            layout = read_layout(lambda offset, size: header[offset : offset + size])
        except WavError:
            return None
        if layout.container != "RIFF" or layout.data_offset != data_offset:
            return None
        if not layout.is_pcm16:
            return None
        return cls(header, layout.fact_offset, layout.block_align)

    def fits(self, data_bytes: int) -> bool:
        return len(self._header) + data_bytes - 8 <= RIFF_LIMIT

    def patch(self, fd: int, data_bytes: int) -> None:
        header = self._header
        struct.pack_into("<I", header, 4, len(header) + data_bytes - 8)
        if self._fact is not None:
            struct.pack_into("<I", header, self._fact, data_bytes // self._frame_bytes)
        struct.pack_into("<I", header, len(header) - 4, data_bytes)
        os.pwrite(fd, header, 0)


@dataclass(frozen=True, slots=True)
class SinkInfo:
    """What the event loop may read of a sink (the writer thread replaces it whole)."""

    name: str | None = None  # the file base name once reserved (may carry a .N suffix)
    frames_written: int = 0
    track_names: tuple[str, ...] = ()  # base names of the per-track WAVs
    error: str | None = None
    codec_mismatch: dict[str, Any] | None = None  # G.711 of the other law, likely (law_check)

    def __reduce__(self) -> tuple[type[SinkInfo], tuple[Any, ...]]:
        # Pickled back from the writer's process for every tap every batch: a plain tuple
        # pickles ~4x faster than a slotted dataclass's default (which walks its fields).
        fields = (self.name, self.frames_written, self.track_names, self.error)
        return SinkInfo, (*fields, self.codec_mismatch)


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
        self._fd = -1  # the WAV's descriptor (libsndfile's, while `_file` is open)
        self._data_offset = 0
        self._header: _HeaderPatch | None = None  # None: libsndfile updates the header
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
        self._fd = fd
        self._data_offset = os.fstat(fd).st_size  # the header, before any audio
        os.lseek(fd, self._data_offset, os.SEEK_SET)
        self._header = _HeaderPatch.read(fd, self._data_offset)
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
        data = np.ascontiguousarray(frames, dtype="<i2")
        view = data.data.cast("B")
        while view:  # a regular file takes it all, unless the disk is full (then OSError)
            view = view[os.write(self._fd, view) :]
        self.frames_written += len(data)
        data_bytes = self.frames_written * 2 * self.channels
        header = self._header
        if header is not None and header.fits(data_bytes):
            header.patch(self._fd, data_bytes)
        else:  # past 4 GiB: libsndfile makes it RF64 (and keeps it so)
            self._header = None
            _command(self._file, SFC_UPDATE_HEADER_NOW, 0)

    def close(self) -> None:
        handle, self._file = self._file, None
        if handle is not None:
            # libsndfile's close rewrites the header from its own frame count, which the
            # batches written past it did not move: first have it take the count from the file.
            _command(handle, SFC_UPDATE_HEADER_NOW, 0)
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
