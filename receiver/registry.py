"""The taps being recorded: start, periodic batched flush, finish (runs on the event loop)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path

from receiver.sink import WavSink
from receiver.tap import FAILED, Tap, utc_now_iso
from receiver.writer import DiskWriter

log = logging.getLogger("receiver.taps")


class TapRegistry:
    def __init__(self, recordings: Path, writer: DiskWriter, flush_interval: float) -> None:
        self.recordings = recordings
        self.writer = writer
        self.flush_interval = flush_interval
        self._active: dict[int, Tap] = {}
        self.started = 0
        self.finished = 0

    @property
    def active(self) -> Iterable[Tap]:
        return self._active.values()

    def __len__(self) -> int:
        return len(self._active)

    def start(self, tap: Tap) -> None:
        """Make the tap live; its files are created by the writer thread."""
        tap.sink = WavSink(
            self.recordings, tap.tap_id, tap.sample_rate, tap.channels, tap.track_files
        )
        self._active[tap.serial] = tap
        self.started += 1
        self.writer.open(tap.sink, tap.describe())
        log.info(
            "tap %s started: %s from %s, %s %d Hz x%d",
            tap.tap_id,
            tap.transport,
            tap.remote,
            tap.codec,
            tap.sample_rate,
            tap.channels,
        )

    def finish(self, tap: Tap, reason: str) -> Future[None] | None:
        """End the tap: its last audio, the WAV close and the final sidecar go to the writer."""
        if self._active.pop(tap.serial, None) is None:
            return None
        assert tap.sink is not None
        self.finished += 1
        tap.ended_at = utc_now_iso()
        tap.end_reason = reason
        if tap.sink.error is not None:
            tap.state = FAILED
        sink = tap.sink
        future = self.writer.finish(sink, tap.buffer.take(), tap.describe())

        def done(_: Future[None]) -> None:
            state = "FAILED" if sink.error else "finished"
            log.info(
                "tap %s %s (%s): %s, %d frames, %.3f s",
                tap.tap_id,
                state,
                reason,
                sink.wav_path.name if sink.name else "no file",
                sink.frames_written,
                sink.frames_written / sink.sample_rate,
            )

        future.add_done_callback(done)
        return future

    def flush(self) -> None:
        """Hand every tap's pending audio to the writer as one batch."""
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
