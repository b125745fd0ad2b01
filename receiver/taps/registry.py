"""The taps being recorded: start, periodic batched flush, finish (runs on the event loop).

Unwritten audio is bounded: each tap's buffer by its guard (audio ahead of the wall clock is
dropped; audio beyond `max_unwritten_seconds` becomes silence), and all taps together by
`max_unwritten_bytes` handed to the disk writer: past it, buffers are left to fill (up to their
own bound) instead of queueing more for a writer that is behind.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable, Collection, Hashable, Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from receiver.storage.sidecar import TapState
from receiver.storage.writer import Finished, Sink, Writer
from receiver.taps.audio_buffer import BufferGuard
from receiver.taps.tap import Tap, utc_now_iso

log = logging.getLogger("receiver.taps")
BEHIND_LOG_INTERVAL = 10.0  # seconds between log lines about a writer that is behind
FLUSH_SLICE = 0.1  # about this many seconds between flushes, each of a slice of the taps


class TapRegistry:
    def __init__(
        self,
        recordings: Path,
        writer: Writer,
        flush_interval: float,
        max_unwritten_seconds: float = 10.0,
        max_unwritten_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.recordings = recordings
        self.writer = writer
        self.flush_interval = flush_interval
        self.max_unwritten_seconds = max_unwritten_seconds
        self.max_unwritten_bytes = max_unwritten_bytes
        self.dropped: Counter[str] = Counter()  # frames: "ahead", "overflow" (of ended taps)
        self.flushes_deferred = 0
        self._behind_logged = float("-inf")
        self._active: dict[int, Tap] = {}
        self.started = 0
        self.finished = 0
        self.counts: dict[str, Counter[str]] = {
            "started": Counter(),
            "finished": Counter(),
            "failed": Counter(),
        }
        # Called on the event loop with each tap and its final sidecar, once its files are
        # complete.
        self.on_finalized: Callable[[Tap, dict[str, Any]], None] | None = None
        # Called with each tap once it records (live audio on NATS, receiver.live.hub).
        self.on_started: Callable[[Tap], None] | None = None
        # The transports' `gather`: they may hold audio outside the taps' buffers.
        self._finishing: set[Future[Finished]] = set()  # ended taps the writer is finalizing
        self.audio_holders: list[Callable[[Collection[Tap] | None], None]] = []
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
        tap.buffer.guard = BufferGuard(
            tap.sample_rate,
            tap.ahead_allowance,
            self.max_unwritten_seconds,
            # From its first audio: an RTP stream's first packet may have waited in the socket
            # (a burst of new streams), and the audio that came meanwhile is not "ahead".
            tap.first_audio_monotonic,
            on_drop=lambda kind: _warn_drop(tap, kind),
        )
        tap.sink = self.writer.new_sink(
            self.recordings, tap.tap_id, tap.sample_rate, tap.channels, tap.track_files
        )
        self._active[tap.serial] = tap
        self.started += 1
        self.counts["started"][tap.transport] += 1
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self.writer.open(tap.sink, tap.describe())
        if self.on_started is not None:
            self.on_started(tap)
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

    def finish(self, tap: Tap, reason: str) -> Future[Finished] | None:
        """End the tap: its last audio, the WAV close and the final sidecar go to the writer."""
        if self._active.pop(tap.serial, None) is None:
            return None
        assert tap.sink is not None
        self.finished += 1
        self.counts["finished"][tap.transport] += 1
        self.dropped.update(tap.dropped_frames())
        tap.ended_at = utc_now_iso()
        tap.end_reason = reason
        if tap.sink.info.error is not None:
            tap.state = TapState.FAILED
        live = tap.live
        if live is not None:
            live.catch_up()
        future = self.writer.finish(tap.sink, tap.buffer.take(), tap.describe())
        self._finishing.add(future)
        future.add_done_callback(self._finishing.discard)
        future.add_done_callback(lambda done: self._finalized(tap, done.result(), reason))
        if live is not None:
            live.end(reason)
        return future

    def is_active(self, tap: Tap) -> bool:
        return tap.serial in self._active

    def split(self, tap: Tap) -> None:
        """max_tap_duration reached: finalize this segment's files and go on recording the same
        tap into new ones (the never-overwrite rule names them `<tap_id>.N`)."""
        if tap.serial not in self._active or tap.sink is None:
            return
        old = tap.sink
        reason = "max_tap_duration: continued in the next segment"
        tap.extra["segment"] = tap.extra.get("segment", 1)
        sidecar = {**tap.describe(), "ended_at": utc_now_iso(), "end_reason": reason}
        new = self.writer.new_sink(
            self.recordings, tap.tap_id, tap.sample_rate, tap.channels, tap.track_files
        )
        if tap.live is not None:
            tap.live.catch_up()
        future = self.writer.finish(old, tap.buffer.take(), sidecar, successor=new)
        future.add_done_callback(lambda done: self._finalized(tap, done.result(), reason))
        tap.extra["segment"] += 1
        tap.extra["previous_segment"] = old.info.name
        tap.segment_start_frames = tap.buffer.frames
        tap.started_at = utc_now_iso()
        tap.sink = new
        self.writer.open(new, tap.describe())
        log.info("tap %s: segment %d begins (max_tap_duration)", tap.tap_id, tap.extra["segment"])

    def _finalized(self, tap: Tap, done: Finished, reason: str) -> None:
        """Once the tap's files are complete (on the writer's thread, or the event loop)."""
        sidecar = done.sidecar or {}
        info = done.info
        failed = sidecar.get("state") == TapState.FAILED or info.error is not None
        file = f"{info.name}.wav" if info.name else None
        log.info(
            "tap %s %s (%s): %s, %d frames, %.3f s",
            tap.tap_id,
            "FAILED" if failed else "finished",
            reason,
            file or "no file",
            info.frames_written,
            info.frames_written / tap.sample_rate,
            extra={"fields": {
                "event": "tap_finished",
                "tap_id": tap.tap_id,
                "file": file,
                "transport": tap.transport,
                "state": sidecar.get("state"),
                "reason": reason,
                "frames": info.frames_written,
                "duration_seconds": round(info.frames_written / tap.sample_rate, 3),
                "counters": sidecar.get("counters", {}),
                "rtp": sidecar.get("rtp"),
                "error": info.error,
            }},
        )  # fmt: skip
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(self._count_and_notify, tap, failed, sidecar)

    def _open_failed(self, sink: Sink, why: str) -> None:
        """On the writer's thread (or the event loop): a tap's files could not be created."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._refuse_unrecordable, sink, why)

    def _refuse_unrecordable(self, sink: Sink, why: str) -> None:
        tap = next((t for t in self._active.values() if t.sink is sink), None)
        if tap is None:
            return  # ended meanwhile: it has nothing on disk either
        self.open_failures[tap.transport] += 1
        if self.on_open_failed is not None:
            self.on_open_failed(tap, why)

    def _count_and_notify(self, tap: Tap, failed: bool, sidecar: dict[str, Any]) -> None:
        if failed:
            self.counts["failed"][tap.transport] += 1
        if self.on_finalized is not None and sidecar:
            self.on_finalized(tap, sidecar)

    def gather(self, taps: Collection[Tap] | None = None) -> None:
        """Bring every tap's buffer (or only `taps`') up to date, before its length is read or
        it is taken."""
        for hand_over in self.audio_holders:
            hand_over(taps)

    def dropped_frames(self) -> Counter[str]:
        """Frames dropped by the buffers' guards, ended and active taps together."""
        total = Counter(self.dropped)
        for tap in self._active.values():
            total.update(tap.dropped_frames())
        return total

    def flush(self, part: int = 0, parts: int = 1) -> bool:
        """Hand pending audio to the writer as one batch: every tap's, or, of the taps split into
        `parts` slices by serial number, those of slice `part`. False if deferred: the writer
        is behind (`max_unwritten_bytes`), and the taps keep their audio."""
        taps = None
        if parts > 1:
            taps = [tap for tap in self._active.values() if tap.serial % parts == part]
        self.gather(taps)
        unwritten = self.writer.unwritten_bytes
        if unwritten > self.max_unwritten_bytes:
            self.flushes_deferred += 1
            now = time.monotonic()
            if now - self._behind_logged >= BEHIND_LOG_INTERVAL:
                self._behind_logged = now
                log.warning(
                    "the disk writer is behind (%d bytes of audio not written, max_unwritten_bytes "
                    "%d): taps keep their audio, up to max_unwritten_seconds each",
                    unwritten,
                    self.max_unwritten_bytes,
                )
            return False
        batch = []
        for tap in self._active.values() if taps is None else taps:
            if tap.buffer.pending:
                if tap.live is not None:
                    tap.live.catch_up()  # live listeners read the buffer: before it is taken
                batch.append((tap.sink, tap.buffer.take()))
        if batch:
            self.writer.write(batch)  # type: ignore[arg-type]
        return True

    async def run_flusher(self) -> None:
        """The taps in slices (by serial number), one slice about every FLUSH_SLICE seconds, so
        each tap's audio goes to the writer every flush_interval and the event loop never spends
        one long stretch on all of them: with thousands of taps that stretch (~15 µs a tap)
        outlasted what a socket buffer capped by the host's rmem_max holds, and packets were
        lost every second. The times are fixed (no drift from the flushes' own cost). A slice
        deferred because the writer is behind is the next one tried, so while the writer
        catches up every slice waits its turn (none is passed over again and again)."""
        parts = max(1, round(self.flush_interval / FLUSH_SLICE))
        step = self.flush_interval / parts
        loop = asyncio.get_running_loop()
        due, part = loop.time(), 0
        while True:
            # Fixed times; a slice that is late (the loop was busy) goes now, and the next one
            # a step later: late slices never run back to back while the receiver catches up.
            due = max(due + step, loop.time())
            await asyncio.sleep(due - loop.time())
            if self.flush(part, parts):
                part = (part + 1) % parts

    def finish_all(self, reason: str) -> list[Future[Finished]]:
        futures = [self.finish(tap, reason) for tap in list(self._active.values())]
        return [f for f in futures if f is not None]

    async def wait_finalized(self, timeout: float) -> None:
        """Shutdown: until every ended tap's files are complete (and `on_finalized` has run for
        it), at most `timeout` seconds."""
        if self._finishing and timeout > 0:
            await asyncio.wait([asyncio.wrap_future(f) for f in self._finishing], timeout=timeout)


def _warn_drop(tap: Tap, kind: str) -> None:
    if kind == "ahead":
        log.warning("tap %s: audio is arriving faster than real time; what runs ahead of the wall "
                    "clock is dropped (counted in the sidecar as dropped_ahead_frames)",
                    tap.tap_id)  # fmt: skip
    else:
        log.warning("tap %s: more than max_unwritten_seconds of audio waits for the disk; the "
                    "excess becomes silence (counted as dropped_overflow_frames)",
                    tap.tap_id)  # fmt: skip
