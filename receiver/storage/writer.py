"""All disk I/O for recordings, on one worker thread, so the event loop never waits on a disk.

Jobs run in submission order, so a tap's open, batches and close can never overtake each other.
A failing tap (disk full, I/O error) is marked failed with its error and closed with a header
that matches its data; the thread goes on with every other tap.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from receiver.codecs.encoding import Encoding
from receiver.codecs.law_check import LawCheck
from receiver.storage.disk_space import free_bytes
from receiver.storage.sidecar import TapState, write_json_atomic
from receiver.storage.wav_sink import WavSink

log = logging.getLogger("receiver.writer")
WRITER_SLICE = 0.002  # seconds of batch work (holding the GIL) between pauses
WRITER_PAUSE = 0.001  # seconds the writer sleeps so the event loop can drain its sockets
FULL_DISK = 64 * 1024  # free bytes below which a failed file creation is put down to space


class Pending(Protocol):
    """A tap's audio taken from its buffer (receiver.taps.audio_buffer.Pending), decoded here."""

    def __bool__(self) -> bool: ...

    def encoded(self) -> Iterable[tuple[Encoding, bytes]]:
        """The encoded audio as it came, a run at a time (for the G.711 law check)."""
        ...

    def render(self) -> list[np.ndarray]:
        """One int16 array per channel (the channels may differ in length)."""
        ...


class DiskWriter:
    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="disk-writer")
        self.batches = 0
        self.bytes_written = 0
        self.errors = 0
        self.last_batch_seconds = 0.0
        self.observe_batch: Callable[[float], None] | None = None  # metrics, on this thread
        self.worker: int | None = None  # under --workers N: written into every sidecar
        # Called on this thread when a tap's files cannot be created (the sink, and why in a
        # few words): the registry has its transport refuse the tap (close 1011).
        self.on_open_failed: Callable[[WavSink, str], None] | None = None
        # Final sidecars that could not be written (a read-only directory), by path: written
        # by `retry_sidecars` once the directory takes files again.
        self._unwritten_sidecars: dict[Path, dict[str, Any]] = {}

    # -- called on the event loop -------------------------------------------------------------

    def open(self, sink: WavSink, sidecar: dict[str, Any]) -> Future[None]:
        return self._executor.submit(self._open, sink, sidecar)

    def write(self, batch: list[tuple[WavSink, Pending]]) -> Future[None]:
        return self._executor.submit(self._write, batch)

    def finish(
        self,
        sink: WavSink,
        pending: Pending,
        sidecar: dict[str, Any],
        successor: WavSink | None = None,
    ) -> Future[None]:
        """Close the tap's files. With a `successor` (a segment split), the channels' uneven
        remainder goes on into it instead of being padded."""
        return self._executor.submit(self._finish, sink, pending, sidecar, successor)

    def rename(self, sink: WavSink, new_id: str, sidecar: dict[str, Any]) -> Future[None]:
        return self._executor.submit(self._rename, sink, new_id, sidecar)

    @property
    def sidecars_pending(self) -> int:
        """Final sidecars waiting for the directory to take files again."""
        return len(self._unwritten_sidecars)

    def retry_sidecars(self) -> Future[None]:
        return self._executor.submit(self._retry_sidecars)

    def shutdown(self) -> None:
        """Run every queued job, then stop the thread (blocking: call it from a thread)."""
        self._executor.shutdown(wait=True)

    # -- on the writer thread -----------------------------------------------------------------

    def _fail(self, sink: WavSink, exc: BaseException) -> None:
        self.errors += 1
        message = f"{type(exc).__name__}: {exc}"
        log.error("tap %s: recording failed, keeping what was written: %s", sink.tap_id, message)
        try:
            sink.fail(message)
        except Exception as close_exc:
            log.error("tap %s: could not close failed WAV: %s", sink.tap_id, close_exc)

    def _open(self, sink: WavSink, sidecar: dict[str, Any]) -> None:
        try:
            sink.open()
            write_json_atomic(sink.sidecar_path, self._sidecar(sink, sidecar), durable=False)
        except Exception as exc:
            self._open_failed(sink, exc)
        sink.publish()

    def _open_failed(self, sink: WavSink, exc: Exception) -> None:
        """The tap's files cannot be created (a read-only directory, a full disk): nothing of
        them stays, and the tap is refused (`on_open_failed`) rather than recorded into
        nothing."""
        self.errors += 1
        why = _open_failure(sink, exc)
        log.error("tap %s: cannot create its files: %s: %s", sink.tap_id, type(exc).__name__, exc)
        sink.error = f"cannot create the recording's files: {why}"
        sink.abandon()
        if self.on_open_failed is not None:
            self.on_open_failed(sink, why)

    def _rename(self, sink: WavSink, new_id: str, sidecar: dict[str, Any]) -> None:
        try:
            sink.rename(new_id)
            if sink.name is not None:
                write_json_atomic(sink.sidecar_path, self._sidecar(sink, sidecar))
        except Exception as exc:
            self.errors += 1
            log.error("tap %s: could not rename to %s: %s", sink.tap_id, new_id, exc)
        sink.publish()

    def _append(self, sink: WavSink, pending: Pending, last: bool = False) -> None:
        if sink.error is not None or not (pending or last):
            return
        if sink.law_check is not None and pending:
            self._check_law(sink, sink.law_check, pending)
        try:
            before = sink.frames_written
            if pending:
                sink.write_channels(pending.render())
            if last:
                sink.drain_carry()
            self.bytes_written += (sink.frames_written - before) * 2 * sink.channels
        except Exception as exc:
            self._fail(sink, exc)
        sink.publish()

    def _check_law(self, sink: WavSink, check: LawCheck, pending: Pending) -> None:
        """The first seconds of a G.711 tap: A-law declared as µ-law, or the reverse, is
        reported (log once, sidecar, page); the audio is written as declared all the same."""
        for encoding, chunk in pending.encoded():
            check.feed(encoding, chunk)
        mismatch = check.decide()
        if check.done:
            sink.law_check = None
        if mismatch is not None:
            sink.codec_mismatch = mismatch.to_dict()
            log.warning("tap %s: %s", sink.tap_id, mismatch.message)

    def _write(self, batch: list[tuple[WavSink, Pending]]) -> None:
        started = slice_start = time.perf_counter()
        for sink, pending in batch:
            self._append(sink, pending)
            now = time.perf_counter()
            if now - slice_start > WRITER_SLICE:
                # Let the event loop have the GIL: its RTP receive tick (every 5 ms) and each
                # WebSocket read must take it, and against a busy thread each would wait a whole
                # switch interval (5 ms).
                time.sleep(WRITER_PAUSE)
                slice_start = time.perf_counter()
        self.batches += 1
        self.last_batch_seconds = time.perf_counter() - started
        if self.observe_batch is not None:
            self.observe_batch(self.last_batch_seconds)

    def _finish(
        self,
        sink: WavSink,
        pending: Pending,
        sidecar: dict[str, Any],
        successor: WavSink | None = None,
    ) -> None:
        self._append(sink, pending, last=successor is None)
        if successor is not None:
            sink.hand_over_carry(successor)
        if sink.error is None:
            try:
                sink.close()
            except Exception as exc:
                self._fail(sink, exc)
        sink.publish()
        if sink.name is None:
            return  # never got a file (the open failed and was logged)
        final = self._sidecar(sink, sidecar)
        sink.final_sidecar = final
        try:
            write_json_atomic(sink.sidecar_path, final)
        except Exception as exc:
            self.errors += 1
            # Kept, and written as soon as the directory takes files again (the server's
            # guard calls retry_sidecars): a tap that ended meanwhile is not left `recording`.
            self._unwritten_sidecars[sink.sidecar_path] = final
            log.error("tap %s: could not write its sidecar, will retry: %s", sink.tap_id, exc)

    def _retry_sidecars(self) -> None:
        for path, final in list(self._unwritten_sidecars.items()):
            try:
                write_json_atomic(path, final)
            except Exception as exc:
                log.debug("sidecar %s still cannot be written: %s", path.name, exc)
                continue
            del self._unwritten_sidecars[path]
            log.warning("sidecar %s written now (state %s)", path.name, final.get("state"))

    def _sidecar(self, sink: WavSink, sidecar: dict[str, Any]) -> dict[str, Any]:
        data = dict(sidecar)
        if self.worker is not None:
            data["worker"] = self.worker
        data["file"] = sink.wav_path.name
        if sink.track_sinks:
            data["track_files"] = {t: ts.wav_path.name for t, ts in sink.track_sinks.items()}
        data["frames_written"] = sink.frames_written
        data["duration_seconds"] = round(sink.frames_written / sink.sample_rate, 6)
        if sink.codec_mismatch is not None:
            data["codec_mismatch"] = sink.codec_mismatch
        if sink.error is not None:
            data["state"] = TapState.FAILED
            data["error"] = sink.error
        elif data.get("state") == TapState.FAILED:
            data.setdefault("error", "failed")
        elif data.get("ended_at"):
            data["state"] = TapState.FINISHED
        return data


def _open_failure(sink: WavSink, exc: Exception) -> str:
    """Why a tap's files could not be created, in a few words for its peer. libsndfile says
    only "System error." when the disk is full."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    with contextlib.suppress(OSError):
        if free_bytes(sink.directory) < FULL_DISK:
            return os.strerror(errno.ENOSPC)
    return str(getattr(exc, "error_string", "") or type(exc).__name__).rstrip(".")
