"""WAV headers: read the chunk layout, check the sizes against the file, and repair them.

A header can disagree with the data after a crash (`kill -9` between a write and the header
update, or a copy cut short) or when another tool wrote it. `plan_repair` is pure: given a way to
read bytes and the file size it says which fields are wrong and what they should be, and
`apply_repair` writes exactly that. Both layouts are handled: plain RIFF (44-byte headers and
any chunks before `data`), libsndfile's RF64-with-auto-downgrade (a `JUNK` chunk at offset 12
that becomes `ds64` when the file passes 4 GiB) and RF64 itself.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from receiver.storage.files import open_regular

U32_MAX = 0xFFFFFFFF
WAVE_FORMAT_PCM = 0x0001
WAVE_FORMAT_EXTENSIBLE = 0xFFFE
_HEADER_LIMIT = 1 << 20  # chunks before `data` must fit here; real headers are < 200 bytes
_CHUNK_ID = re.compile(rb"[A-Za-z0-9 _]{3}[A-Za-z0-9 _]")
_TRAILING_CHUNKS_MAX = 64
MAX_CHANNELS = 64  # recordings have 1 or 2; a header saying 65 535 is not one to read
_SAMPLE_FORMATS = (WAVE_FORMAT_PCM, 3, 6, 7)  # PCM, IEEE float, A-law, mu-law: fixed-size samples

ReadAt = Callable[[int, int], bytes]


class WavError(ValueError):
    """Not a WAV file we can make sense of (the message says why)."""


@dataclass(frozen=True, slots=True)
class WavLayout:
    """Where things are in a WAV file, as its header declares them."""

    container: str  # "RIFF" or "RF64"
    riff_size: int  # RIFF: the header field; RF64: ds64's riffSize
    format_tag: int  # 1 = PCM; for WAVE_FORMAT_EXTENSIBLE, the sub-format's tag
    channels: int
    sample_rate: int
    bits_per_sample: int
    block_align: int
    data_offset: int  # first byte of audio
    data_size: int  # declared (RF64: ds64's dataSize); U32_MAX may mean "unknown"
    fmt_extensible: bool = False
    fmt_offset: int = 12  # of the fmt chunk's header
    fmt_size: int = 16
    ds64_offset: int | None = None
    fact_offset: int | None = None  # the sample-count field of a `fact` chunk
    fact_frames: int | None = None

    @property
    def is_pcm16(self) -> bool:
        return self.format_tag == WAVE_FORMAT_PCM and self.bits_per_sample == 16

    @property
    def format_name(self) -> str:
        kind = {WAVE_FORMAT_PCM: "PCM", 3: "IEEE float", 6: "A-law", 7: "mu-law"}.get(
            self.format_tag, f"format 0x{self.format_tag:04x}"
        )
        if self.format_tag in (WAVE_FORMAT_PCM, 3):
            kind = f"{self.bits_per_sample}-bit {kind}"
        ext = ", extensible" if self.fmt_extensible else ""
        return f"{self.container}/WAVE {kind}{ext}, {self.sample_rate} Hz, {self.channels} ch"


def _u32(data: bytes, offset: int) -> int:
    return int(struct.unpack_from("<I", data, offset)[0])


def read_layout(read_at: ReadAt) -> WavLayout:
    """Walk the chunks up to `data`. Sizes after `data` are not trusted here (see plan_repair)."""
    head = read_at(0, 12)
    if len(head) < 12 or head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
        raise WavError("not a RIFF/RF64 WAVE file")
    container = head[:4].decode()
    riff_size = _u32(head, 4)
    fmt: tuple[int, ...] | None = None
    extensible = False
    ds64_offset = fact_offset = fact_frames = None
    fmt_offset = fmt_size = 0
    ds64: tuple[int, int] | None = None
    pos = 12
    while pos < _HEADER_LIMIT:
        chunk = read_at(pos, 8)
        if len(chunk) < 8:
            raise WavError("no data chunk")
        cid, size = chunk[:4], _u32(chunk, 4)
        if cid == b"data":
            if fmt is None:
                raise WavError("data chunk before fmt chunk")
            data_size = size
            if container == "RF64":
                if ds64 is None:
                    raise WavError("RF64 file without ds64 chunk")
                riff_size, data_size = ds64
            tag, channels, rate, _, block_align, bits = fmt
            _check_format(tag, channels, rate, block_align, bits)
            return WavLayout(
                container, riff_size, tag, channels, rate, bits, block_align, pos + 8, data_size,
                extensible, fmt_offset, fmt_size, ds64_offset, fact_offset, fact_frames,
            )  # fmt: skip
        if size > _HEADER_LIMIT:
            raise WavError(f"implausible {cid!r} chunk size {size} before the data chunk")
        body = read_at(pos + 8, size)
        if len(body) < size:
            raise WavError(f"file ends inside the {cid!r} chunk")
        if cid == b"fmt ":
            if size < 16:
                raise WavError("fmt chunk too short")
            fmt_offset, fmt_size = pos, size
            fmt = struct.unpack_from("<HHIIHH", body)
            if fmt[0] == WAVE_FORMAT_EXTENSIBLE and size >= 40:
                extensible = True
                fmt = (struct.unpack_from("<H", body, 24)[0], *fmt[1:])
        elif cid == b"ds64" and size >= 24:
            ds64_offset = pos + 8
            ds64 = (
                int(struct.unpack_from("<Q", body)[0]),
                int(struct.unpack_from("<Q", body, 8)[0]),
            )
        elif cid == b"fact" and size >= 4:
            fact_offset, fact_frames = pos + 8, _u32(body, 0)
        pos += 8 + size + (size & 1)
    raise WavError("no data chunk in the first MiB")


def _check_format(tag: int, channels: int, rate: int, block_align: int, bits: int) -> None:
    """The fmt fields everything else divides by or sizes memory with: a sample rate above 0,
    1 to MAX_CHANNELS channels, and (for PCM, float and G.711) a block that is one sample of
    each channel."""
    if not 1 <= channels <= MAX_CHANNELS:
        raise WavError(f"bad fmt chunk: {channels} channels (1 to {MAX_CHANNELS} are read)")
    if rate < 1:
        raise WavError(f"bad fmt chunk: sample rate {rate}")
    if block_align < 1:
        raise WavError(f"bad fmt chunk: block align {block_align}")
    if tag in _SAMPLE_FORMATS and block_align != channels * ((bits + 7) // 8):
        raise WavError(
            f"bad fmt chunk: block align {block_align} is not {channels} channel(s) of "
            f"{bits}-bit samples"
        )


def _trailing_chunks_fit(read_at: ReadAt, start: int, end: int) -> bool:
    """True if [start, end) is a chain of well-formed chunks ending exactly at `end` (e.g. a
    LIST chunk another tool appended after the audio) rather than audio the header missed."""
    pos = start
    for _ in range(_TRAILING_CHUNKS_MAX):
        if pos == end:
            return pos > start
        chunk = read_at(pos, 8)
        if len(chunk) < 8 or not _CHUNK_ID.fullmatch(chunk[:4]):
            return False
        size = _u32(chunk, 4)
        pos += 8 + size + (size & 1)
        if pos > end + (size & 1):
            return False
        pos = min(pos, end)
    return False


@dataclass(frozen=True, slots=True)
class FieldFix:
    name: str  # e.g. "RIFF size", "data size", "ds64 dataSize", "fact frames"
    offset: int
    width: int  # 4 or 8 bytes, little-endian
    old: int
    new: int


@dataclass(slots=True)
class RepairPlan:
    """What is wrong with one WAV's header and how to fix it; empty `fixes` means it is fine."""

    file_size: int
    layout: WavLayout | None = None
    fixes: list[FieldFix] = field(default_factory=list)
    header: bytes | None = None  # a whole new header (RIFF -> RF64), same length as the old
    truncate_to: int | None = None  # cut a partial last frame
    frames: int = 0  # audio frames once repaired
    problem: str | None = None  # cannot be repaired: why

    @property
    def needed(self) -> bool:
        return bool(self.fixes or self.header is not None or self.truncate_to is not None)

    def describe(self) -> list[str]:
        lines = [f"{f.name}: {f.old} -> {f.new}" for f in self.fixes]
        if self.header is not None:
            lines.append(f"header rewritten as RF64 (over 4 GiB): {len(self.header)} bytes")
        if self.truncate_to is not None:
            cut = self.file_size - self.truncate_to
            lines.append(f"cut {cut} byte(s) of a partial last frame (size -> {self.truncate_to})")
        return lines


def plan_repair(read_at: ReadAt, file_size: int) -> RepairPlan:
    """Compare the header with the file and plan the smallest change that makes them agree.

    The audio is taken to run from the data chunk to the end of the file (cut to whole frames),
    unless what follows the declared data is a clean chain of chunks, which is then kept.
    """
    plan = RepairPlan(file_size)
    try:
        layout = read_layout(read_at)
    except WavError as exc:
        plan.problem = str(exc)
        return plan
    plan.layout = layout
    start, block = layout.data_offset, layout.block_align
    available = file_size - start
    declared = layout.data_size
    whole = available - available % block
    if (
        0 < declared < available
        and declared != U32_MAX
        and declared % block == 0
        and _trailing_chunks_fit(read_at, start + declared + (declared & 1), file_size)
    ):
        data_bytes, new_size = declared, file_size
    else:
        data_bytes, new_size = whole, start + whole
        if new_size != file_size:
            plan.truncate_to = new_size
    frames = data_bytes // block
    plan.frames = frames

    def fix(name: str, offset: int, width: int, old: int, new: int) -> None:
        if old != new:
            plan.fixes.append(FieldFix(name, offset, width, old, new))

    def u64(offset: int) -> int:
        return int.from_bytes(read_at(offset, 8), "little")

    data_size_offset = start - 4
    if layout.container == "RIFF" and new_size - 8 > U32_MAX:
        try:
            plan.header = rf64_header(read_at, layout, new_size, data_bytes, frames)
        except WavError as exc:
            plan.problem = str(exc)
        return plan
    elif layout.container == "RIFF":
        fix("RIFF size", 4, 4, layout.riff_size, new_size - 8)
        fix("data size", data_size_offset, 4, declared, data_bytes)
    else:
        ds64 = layout.ds64_offset
        assert ds64 is not None
        fix("ds64 riffSize", ds64, 8, layout.riff_size, new_size - 8)
        fix("ds64 dataSize", ds64 + 8, 8, declared, data_bytes)
        fix("ds64 sampleCount", ds64 + 16, 8, u64(ds64 + 16), frames)
    if layout.fact_offset is not None and layout.fact_frames is not None:
        fix("fact frames", layout.fact_offset, 4, layout.fact_frames, min(frames, U32_MAX))
    return plan


def rf64_header(
    read_at: ReadAt, layout: WavLayout, file_size: int, data_bytes: int, frames: int
) -> bytes:
    """A RIFF header rebuilt as RF64 in the same number of bytes, so the audio stays where it is:
    RF64, ds64 (28 bytes, as libsndfile and EBU 3306 have it), the original fmt chunk, a JUNK
    filler, then `data` with its size in ds64. libsndfile's downgraded files reserve exactly the
    room for this (their JUNK and fact chunks); a plain 44-byte header does not have it."""
    fmt = read_at(layout.fmt_offset, 8 + layout.fmt_size + (layout.fmt_size & 1))
    head = b"RF64" + struct.pack("<I", U32_MAX) + b"WAVE"
    ds64 = b"ds64" + struct.pack("<IQQQI", 28, file_size - 8, data_bytes, frames, 0)
    used = len(head) + len(ds64) + len(fmt) + 8
    gap = layout.data_offset - used
    if gap < 0 or 0 < gap < 8:
        raise WavError("over 4 GiB: needs RF64, but the header has no room for a ds64 chunk")
    filler = b"JUNK" + struct.pack("<I", gap - 8) + bytes(gap - 8) if gap else b""
    return head + ds64 + fmt + filler + b"data" + struct.pack("<I", U32_MAX)


def file_reader(fh: object) -> ReadAt:
    """A ReadAt over an open binary file (uses pread: no shared file position)."""
    fd = fh.fileno()  # type: ignore[attr-defined]

    def read_at(offset: int, n: int) -> bytes:
        return os.pread(fd, n, offset) if n > 0 else b""

    return read_at


def read_layout_of(path: Path) -> WavLayout:
    with open_regular(path) as fh:
        return read_layout(file_reader(fh))


def frames_on_disk(path: Path) -> tuple[WavLayout, int]:
    """The header and the number of frames really on disk: the declared data size, or less if
    the file is shorter (a file being recorded, or cut short). Raises WavError or OSError."""
    with open_regular(path) as fh:
        return frames_in_file(fh)


def frames_in_file(fh: BinaryIO) -> tuple[WavLayout, int]:
    """`frames_on_disk` of a file already open."""
    layout = read_layout(file_reader(fh))
    available = os.fstat(fh.fileno()).st_size - layout.data_offset
    declared = available if layout.data_size in (0, U32_MAX) else layout.data_size
    return layout, max(0, min(declared, available)) // layout.block_align


def check_wav(path: Path) -> RepairPlan:
    """Only a regular file is read: a link is not followed, a fifo is not waited on."""
    with open_regular(path) as fh:
        return plan_repair(file_reader(fh), os.fstat(fh.fileno()).st_size)


def apply_repair(path: Path, plan: RepairPlan) -> None:
    """Write the planned fields (after checking the file has not changed size since)."""
    if plan.problem is not None or not plan.needed:
        return
    with open_regular(path, write=True) as fh:
        if os.fstat(fh.fileno()).st_size != plan.file_size:
            raise WavError(f"{path.name} changed size since it was checked; not touching it")
        if plan.header is not None:
            os.pwrite(fh.fileno(), plan.header, 0)
        for fix in plan.fixes:
            os.pwrite(fh.fileno(), fix.new.to_bytes(fix.width, "little"), fix.offset)
        if plan.truncate_to is not None:
            os.ftruncate(fh.fileno(), plan.truncate_to)
        os.fsync(fh.fileno())


def repair_wav(path: Path, dry_run: bool = False) -> RepairPlan:
    """Check one WAV and, unless `dry_run`, fix its header. Reusable at start-up (crash
    recovery): call it for WAVs whose sidecar still says `recording`."""
    plan = check_wav(path)
    if not dry_run:
        apply_repair(path, plan)
    return plan
