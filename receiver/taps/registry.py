"""The taps being recorded: start, periodic batched flush, finish (runs on the event loop)."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from receiver.storage.sidecar import TapState
from receiver.storage.wav_sink import WavSink
from receiver.storage.writer import DiskWriter
from receiver.taps.tap import Tap, utc_now_iso

log = logging.getLogger("receiver.taps")


class TapRegistry:
    def __init__(self, recordings: Path, writer: DiskWriter, flush_interval: float) -> None:
        self.recordings = recordings
        self.writer = writer
        self.flush_interval = flush_interval
        self._active: dict[int, Tap] = {}
        self.started = 0
        self.finished = 0
        self.counts: dict[str, Counter[str]] = {
            "started": Counter(),
            "finished": Counter(),
            "failed": Counter(),
        }
        # Called on the event loop with each final sidecar, once its files are complete.
        self.on_finalized: Callable[[dict[str, Any]], None] | None = None
        # The transports' `gather`: they may hold audio outside the taps' buffers.
        self.audio_holders: list[Callable[[], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        # Called on the event loop with a tap whose files could not be created, and why: the
        # server has its transport refuse it. Counted here, by transport.
        self.on_open_failed: Callable[[Tap, str], None] | None = None
        self.open_failures: Counter[str] = Counter()
        writer.on_open_failed = self._open_failed

    @property
    def active(self) -> Iterable[Tap]:
        return self._active.values()

    def __len__(self) -> int:
        return len(self._active)

    def active_by_transport(self) -> Counter[str]:
        return Counter(tap.transport for tap in self._active.values())

    def find(self, key: Hashable) -> Tap | None:
        """The newest active tap known by this key (see receiver.taps.naming)."""
        found = None
        for tap in self._active.values():
            if tap.key == key:
                found = tap
        return found

    def find_by_id(self, tap_id: str, transport: str) -> Tap | None:
        """The newest active tap of `transport` that has this id now."""
        found = None
        for tap in self._active.values():
            if tap.tap_id == tap_id and tap.transport == transport:
                found = tap
        return found

    def rename(self, tap: Tap, new_id: str, extra: dict[str, Any] | None = None) -> None:
        """Give an active tap a new id (and sidecar fields): its files are renamed atomically by
        the writer thread (never over an existing recording) and the sidecar says what it was
        called before."""
        tap.extra.update(extra or {})
        if new_id == tap.tap_id:
            return
        tap.extra.setdefault("provisional_id", tap.tap_id)
        log.info("tap %s is now called %s", tap.tap_id, new_id)
        tap.tap_id = new_id
        assert tap.sink is not None
        self.writer.rename(tap.sink, new_id, tap.describe())

    def start(self, tap: Tap) -> None:
        """Make the tap live; its files are created by the writer thread."""
        tap.sink = WavSink(
            self.recordings, tap.tap_id, tap.sample_rate, tap.channels, tap.track_files
        )
        self._active[tap.serial] = tap
        self.started += 1
        self.counts["started"][tap.transport] += 1
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self.writer.open(tap.sink, tap.describe())
        log.info(
            "tap %s started: %s from %s, %s %d Hz x%d",
            tap.tap_id,
            tap.transport,
            tap.remote,
            tap.codec,
            tap.sample_rate,
            tap.channels,
            extra={"fields": {
                "event": "tap_started",
                "tap_id": tap.tap_id,
                "transport": tap.transport,
                "remote": tap.remote,
                "codec": tap.codec,
                "sample_rate": tap.sample_rate,
                "channels": tap.channels,
            }},
        )  # fmt: skip

    def finish(self, tap: Tap, reason: str) -> Future[None] | None:
        """End the tap: its last audio, the WAV close and the final sidecar go to the writer."""
        if self._active.pop(tap.serial, None) is None:
            return None
        assert tap.sink is not None
        self.finished += 1
        self.counts["finished"][tap.transport] += 1
        tap.ended_at = utc_now_iso()
        tap.end_reason = reason
        if tap.sink.info.error is not None:
            tap.state = TapState.FAILED
        sink = tap.sink
        future = self.writer.finish(sink, tap.buffer.take(), tap.describe())
        future.add_done_callback(lambda _: self._finalized(tap, sink, reason))
        return future

    def split(self, tap: Tap) -> None:
        """max_tap_duration reached: finalize this segment's files and go on recording the same
        tap into new ones (the never-overwrite rule names them `<tap_id>.N`)."""
        if tap.serial not in self._active or tap.sink is None:
            return
        old = tap.sink
        reason = "max_tap_duration: continued in the next segment"
        tap.extra["segment"] = tap.extra.get("segment", 1)
        sidecar = {**tap.describe(), "ended_at": utc_now_iso(), "end_reason": reason}
        new = WavSink(self.recordings, tap.tap_id, tap.sample_rate, tap.channels, tap.track_files)
        future = self.writer.finish(old, tap.buffer.take(), sidecar, successor=new)
        future.add_done_callback(lambda _: self._finalized(tap, old, reason))
        tap.extra["segment"] += 1
        tap.extra["previous_segment"] = old.name
        tap.segment_start_frames = tap.buffer.frames
        tap.started_at = utc_now_iso()
        tap.sink = new
        self.writer.open(new, tap.describe())
        log.info("tap %s: segment %d begins (max_tap_duration)", tap.tap_id, tap.extra["segment"])

    def _finalized(self, tap: Tap, sink: WavSink, reason: str) -> None:
        """On the writer thread, once the tap's files are complete."""
        sidecar = sink.final_sidecar or {}
        failed = sidecar.get("state") == TapState.FAILED or sink.error is not None
        log.info(
            "tap %s %s (%s): %s, %d frames, %.3f s",
            tap.tap_id,
            "FAILED" if failed else "finished",
            reason,
            sink.wav_path.name if sink.name else "no file",
            sink.frames_written,
            sink.frames_written / sink.sample_rate,
            extra={"fields": {
                "event": "tap_finished",
                "tap_id": tap.tap_id,
                "file": sink.wav_path.name if sink.name else None,
                "transport": tap.transport,
                "state": sidecar.get("state"),
                "reason": reason,
                "frames": sink.frames_written,
                "duration_seconds": round(sink.frames_written / sink.sample_rate, 3),
                "counters": sidecar.get("counters", {}),
                "rtp": sidecar.get("rtp"),
                "error": sink.error,
            }},
        )  # fmt: skip
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._count_and_notify, tap.transport, failed, sidecar)

    def _open_failed(self, sink: WavSink, why: str) -> None:
        """On the writer thread: a tap's files could not be created."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._refuse_unrecordable, sink, why)

    def _refuse_unrecordable(self, sink: WavSink, why: str) -> None:
        tap = next((t for t in self._active.values() if t.sink is sink), None)
        if tap is None:
            return  # ended meanwhile: it has nothing on disk either
        self.open_failures[tap.transport] += 1
        if self.on_open_failed is not None:
            self.on_open_failed(tap, why)

    def _count_and_notify(self, transport: str, failed: bool, sidecar: dict[str, Any]) -> None:
        if failed:
            self.counts["failed"][transport] += 1
        if self.on_finalized is not None and sidecar:
            self.on_finalized(sidecar)

    def gather(self) -> None:
        """Bring every tap's buffer up to date, before its length is read or it is taken."""
        for hand_over in self.audio_holders:
            hand_over()

    def flush(self) -> None:
        """Hand every tap's pending audio to the writer as one batch."""
        self.gather()
        batch = [
            (tap.sink, tap.buffer.take()) for tap in self._active.values() if tap.buffer.pending
        ]
        if batch:
            self.writer.write(batch)  # type: ignore[arg-type]

    async def run_flusher(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            self.flush()

    def finish_all(self, reason: str) -> list[Future[None]]:
        futures = [self.finish(tap, reason) for tap in list(self._active.values())]
        return [f for f in futures if f is not None]
