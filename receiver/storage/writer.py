"""All disk I/O for recordings, on one thread, so the event loop never waits on a disk.

Jobs run in submission order, so a tap's batches, rename and close can never overtake each
other. Creating a tap's files is the dearest step (two file creations, ~0.4 ms of kernel time
each on the machines we measured), so it is taken off the job queue and paced: a new tap's files
are created in the background, in arrival order, in slices that leave the event loop at least
half of the time (`OPEN_DUTY`), and only while no job waits. Until its files exist, a tap's
batches wait on its sink, in order; its close creates them at once if they are still missing. So
a burst of thousands of new taps never delays the batches of the taps already recording, and
`opening_seconds` says how long the backlog of file creations would take (admission refuses new
taps while it is long: receiver.taps.admission).

A failing tap (disk full, I/O error) is marked failed with its error and closed with a header
that matches its data; the thread goes on with every other tap. `shutdown` keeps to a deadline:
what is left then stays as it is on disk (headers true to their data; the next start finalizes
the sidecars) and is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from receiver.codecs.decoders import StreamDecoders
from receiver.codecs.encoding import Encoding
from receiver.codecs.law_check import LawCheck
from receiver.storage.call_file import CallLeg, write_call
from receiver.storage.disk_space import free_bytes
from receiver.storage.sidecar import TapState, write_json_atomic, write_json_new
from receiver.storage.wav_sink import SinkInfo, WavSink

log = logging.getLogger("receiver.writer")
WRITER_SLICE = 0.002  # seconds of batch work (holding the GIL) between pauses
WRITER_PAUSE = 0.001  # seconds the writer sleeps so the event loop can drain its sockets
OPEN_SLICE = 0.005  # seconds of file creation between pauses
OPEN_DUTY = 0.5  # at most this share of the thread's time goes to creating files (in-process)
FIRST_OPEN_ESTIMATE = 0.001  # seconds per tap's files, until measured
FULL_DISK = 64 * 1024  # free bytes below which a failed file creation is put down to space


class Pending(Protocol):
    """A tap's audio taken from its buffer (receiver.taps.audio_buffer.Pending), decoded here."""

    nbytes: int

    def __bool__(self) -> bool: ...

    def encoded(self) -> Iterable[tuple[Encoding, bytes]]:
        """The encoded audio as it came, a run at a time (for the G.711 law check)."""
        ...

    def render(self, decoders: StreamDecoders) -> list[np.ndarray]:
        """One int16 array per channel (the channels may differ in length), decoded by the
        tap's stream decoders (they keep codec state between batches)."""
        ...


@dataclass(frozen=True, slots=True)
class Finished:
    """What a closed tap's files came to: the future of `finish` gives it."""

    info: SinkInfo
    sidecar: dict[str, Any] | None  # the final sidecar (None: the tap never got files)


class Sink(Protocol):
    """A tap's files as the event loop holds them (a WavSink, or its handle in another
    process): `info` is all the loop may read."""

    info: SinkInfo
    tap_id: str


class Writer(Protocol):
    """What the registry asks of a disk writer (this module's, or writer_process's)."""

    on_open_failed: Callable[[Any, str], None] | None

    @property
    def unwritten_bytes(self) -> int: ...

    def new_sink(
        self, directory: Path, tap_id: str, rate: int, channels: int, tracks: list[str] | None
    ) -> Sink: ...

    def open(self, sink: Any, sidecar: dict[str, Any]) -> Future[Any]: ...

    def write(self, batch: list[tuple[Any, Pending]]) -> Future[Any]: ...

    def finish(
        self, sink: Any, pending: Pending, sidecar: dict[str, Any], successor: Any = None
    ) -> Future[Finished]: ...

    def rename(self, sink: Any, new_id: str, sidecar: dict[str, Any]) -> Future[Any]: ...

    def build_call(
        self,
        directory: Path,
        call_id: str,
        rate: int,
        legs: list[CallLeg],
        sidecar: dict[str, Any],
    ) -> Future[str | None]: ...


Job = tuple[Callable[..., Any], tuple[Any, ...], Future[Any], int]


class DiskWriter:
    def __init__(self, open_duty: float = OPEN_DUTY) -> None:
        # In the server's own process the writer pauses as long as it created files, so the
        # event loop gets the GIL; in a process of its own (writer_process.py) it need not: the
        # scheduler gives the server's core to the event loop first.
        self.open_duty = open_duty
        self._jobs: deque[Job] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._deadline = float("inf")
        self._unopened: deque[WavSink] = deque()  # the thread's: files not created yet
        self.batches = 0
        self.bytes_written = 0
        self.errors = 0
        self.last_batch_seconds = 0.0
        self.observe_batch: Callable[[float], None] | None = None  # metrics, on this thread
        self.worker: int | None = None  # under --workers N: written into every sidecar
        # Each written by one side only, so both sides can read them without a lock.
        self.opens_requested = 0  # event loop
        self.opens_done = 0  # writer thread (created or failed)
        self.bytes_queued = 0  # event loop: encoded audio handed over
        self.bytes_done = 0  # writer thread: of it written (or dropped with a failed tap)
        self.open_seconds = FIRST_OPEN_ESTIMATE  # writer thread: a tap's files, on average
        self.abandoned = 0  # jobs left undone at the shutdown deadline
        # Hooks for a writer in its own process (writer_process.py), called on this thread.
        self.on_publish: Callable[[WavSink], None] | None = None
        self.on_job_done: Callable[[], None] | None = None
        self.on_announce: Callable[[WavSink], None] | None = None  # a rename, before the move
        # Called on this thread when a tap's files cannot be created (the sink, and why in a
        # few words): the registry has its transport refuse the tap (close 1011).
        self.on_open_failed: Callable[[WavSink, str], None] | None = None
        # Final sidecars that could not be written (a read-only directory), by path: written
        # by `retry_sidecars` once the directory takes files again.
        self._unwritten_sidecars: dict[Path, dict[str, Any]] = {}
        self._thread = threading.Thread(target=self._run, name="disk-writer", daemon=True)
        self._thread.start()

    # -- called on the event loop -------------------------------------------------------------

    def new_sink(
        self, directory: Path, tap_id: str, rate: int, channels: int, tracks: list[str] | None
    ) -> WavSink:
        return WavSink(directory, tap_id, rate, channels, tracks)

    def open(self, sink: WavSink, sidecar: dict[str, Any]) -> Future[None]:
        """Create the tap's files soon (paced; see the module's docstring)."""
        self.opens_requested += 1
        return self._submit(self._open, sink, sidecar)

    def write(
        self, batch: list[tuple[WavSink, Pending]], nbytes: int | None = None
    ) -> Future[None]:
        if nbytes is None:
            nbytes = sum(p.nbytes for _, p in batch)
        return self._submit(self._write, batch, nbytes=nbytes)

    def finish(
        self,
        sink: WavSink,
        pending: Pending,
        sidecar: dict[str, Any],
        successor: WavSink | None = None,
    ) -> Future[Finished]:
        """Close the tap's files. With a `successor` (a segment split), the channels' uneven
        remainder goes on into it instead of being padded. The future's result (set on the
        writer thread) says what they came to."""
        return self._submit(self._finish, sink, pending, sidecar, successor, nbytes=pending.nbytes)

    def rename(self, sink: WavSink, new_id: str, sidecar: dict[str, Any]) -> Future[None]:
        return self._submit(self._rename, sink, new_id, sidecar)

    def build_call(
        self,
        directory: Path,
        call_id: str,
        rate: int,
        legs: list[CallLeg],
        sidecar: dict[str, Any],
    ) -> Future[str | None]:
        """A call's stereo WAV from its legs' finished WAVs (receiver.storage.call_file); the
        future gives its base name, or None if it could not be written (logged)."""
        return self._submit(self._build_call, directory, call_id, rate, legs, sidecar)

    @property
    def sidecars_pending(self) -> int:
        """Final sidecars waiting for the directory to take files again."""
        return len(self._unwritten_sidecars)

    def retry_sidecars(self) -> Future[None]:
        return self._submit(self._retry_sidecars)

    @property
    def opening(self) -> int:
        """Taps whose files are not created yet."""
        return self.opens_requested - self.opens_done

    @property
    def opening_seconds(self) -> float:
        """About how long creating the files of the taps waiting for them will take."""
        return self.opening * self.open_seconds / self.open_duty

    @property
    def busy(self) -> bool:
        """Jobs wait, or taps wait for their files."""
        return bool(self._jobs or self._unopened)

    async def stop(self, timeout: float) -> bool:
        """`shutdown` without blocking the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.shutdown, timeout)

    @property
    def unwritten_bytes(self) -> int:
        """Encoded audio handed to the writer and not written yet."""
        return self.bytes_queued - self.bytes_done

    def shutdown(self, timeout: float | None = None) -> bool:
        """Run the queued jobs (and create the files they need), then stop the thread; with a
        `timeout`, stop by then whatever is left. Blocking: call it from a thread. Returns
        whether everything was done."""
        with self._wake:
            self._stopping = True
            if timeout is not None:
                self._deadline = time.monotonic() + timeout
            self._wake.notify()
        self._thread.join(None if timeout is None else timeout + 0.5)
        if self.stuck:
            log.error("disk writer still busy %.1f s after shutdown_timeout", 0.5)
        return not self.stuck and not self._jobs and not self.abandoned

    @property
    def stuck(self) -> bool:
        """After `shutdown`: the thread did not stop (a disk that hangs in the kernel)."""
        return self._stopping and self._thread.is_alive()

    def _submit(self, fn: Callable[..., Any], *args: Any, nbytes: int = 0) -> Future[Any]:
        future: Future[Any] = Future()
        self.bytes_queued += nbytes
        with self._wake:
            self._jobs.append((fn, args, future, nbytes))
            self._wake.notify()
        return future

    # -- on the writer thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._jobs and not (self._unopened and not self._stopping):
                    if self._stopping:
                        return
                    self._wake.wait()
                job = self._jobs.popleft() if self._jobs else None
            if time.monotonic() > self._deadline:
                self._give_up(job)
                return
            if job is None:
                self._open_some()
                if self.on_job_done is not None:
                    self.on_job_done()
                continue
            fn, args, future, nbytes = job
            result = None
            try:
                result = fn(*args)
            except Exception:  # a bug: never let it stop the thread (and every other tap)
                self.errors += 1
                log.exception("disk writer job failed")
            self.bytes_done += nbytes
            future.set_result(result)
            if self.on_job_done is not None:
                self.on_job_done()

    def _give_up(self, job: Job | None) -> None:
        with self._wake:
            left = ([job] if job else []) + list(self._jobs)
            self._jobs.clear()
        self.abandoned = len(left)
        unopened = sum(1 for s in self._unopened if s.name is None and s.error is None)
        log.error(
            "shutdown_timeout reached: %d disk jobs not done, %d taps never got their files; the "
            "files on disk stay valid (headers match their data) and the next start finalizes "
            "their sidecars",
            len(left),
            unopened,
        )

    def _open_some(self) -> None:
        """Create files for waiting taps for OPEN_SLICE, then pause for the event loop."""
        started = time.perf_counter()
        opened = 0
        while self._unopened and time.perf_counter() - started < OPEN_SLICE:
            if self._ensure_open(self._unopened.popleft(), now=True):
                opened += 1
        spent = time.perf_counter() - started
        if opened:  # wall time: on a busy machine, waiting for the CPU is part of the cost
            self.open_seconds += (spent / opened - self.open_seconds) * 0.2
        with self._wake:  # a job that comes meanwhile goes first
            if not self._jobs and not self._stopping:
                self._wake.wait(spent * (1 - self.open_duty) / self.open_duty)

    def _ensure_open(self, sink: WavSink, now: bool = False) -> bool:
        """Create the sink's files if they are not there yet (then write what waited for
        them); False if that was not needed (`now`) or failed."""
        if sink.opened:
            return not now and sink.error is None
        sink.opened = True
        try:
            sink.open()
            write_json_new(sink.sidecar_path, self._sidecar(sink, sink.initial_sidecar or {}))
        except Exception as exc:
            self._open_failed(sink, exc)
        self.opens_done += 1
        waiting, sink.waiting = sink.waiting, []
        for pending in waiting:
            self._append(sink, pending)
        self._publish(sink)
        return sink.error is None

    def _announce(self, sink: WavSink, name: str) -> None:
        """The tap's files are about to take `name`: the event loop hears of it first."""
        sink.info = dataclasses.replace(sink.info, name=name)
        if self.on_announce is not None:
            self.on_announce(sink)

    def _publish(self, sink: WavSink) -> None:
        sink.publish()
        if self.on_publish is not None:
            self.on_publish(sink)

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

    def _fail(self, sink: WavSink, exc: BaseException) -> None:
        self.errors += 1
        message = f"{type(exc).__name__}: {exc}"
        log.error("tap %s: recording failed, keeping what was written: %s", sink.tap_id, message)
        try:
            sink.fail(message)
        except Exception as close_exc:
            log.error("tap %s: could not close failed WAV: %s", sink.tap_id, close_exc)

    def _open(self, sink: WavSink, sidecar: dict[str, Any]) -> None:
        sink.initial_sidecar = sidecar
        self._unopened.append(sink)

    def _rename(self, sink: WavSink, new_id: str, sidecar: dict[str, Any]) -> None:
        if not sink.opened:  # its files will be created under the new name
            sink.tap_id = new_id
            sink.initial_sidecar = sidecar
            return
        try:
            sink.rename(new_id, announce=lambda name: self._announce(sink, name))
            self._publish(sink)
            if sink.name is not None:
                write_json_atomic(sink.sidecar_path, self._sidecar(sink, sidecar))
        except Exception as exc:
            self.errors += 1
            log.error("tap %s: could not rename to %s: %s", sink.tap_id, new_id, exc)
        self._publish(sink)

    def _append(self, sink: WavSink, pending: Pending, last: bool = False) -> None:
        if sink.error is not None or not (pending or last):
            return
        if sink.law_check is not None and pending:
            self._check_law(sink, sink.law_check, pending)
        try:
            before = sink.frames_written
            if pending:
                sink.write_channels(pending.render(sink.decoders))
            if last:
                sink.drain_carry()
            self.bytes_written += (sink.frames_written - before) * 2 * sink.channels
        except Exception as exc:
            self._fail(sink, exc)
        self._publish(sink)

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
            if not sink.opened:
                sink.waiting.append(pending)  # written once its files exist
                continue
            self._append(sink, pending)
            now = time.perf_counter()
            if self.open_duty < 1.0 and now - slice_start > WRITER_SLICE:
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
    ) -> Finished:
        self._ensure_open(sink)
        self._append(sink, pending, last=successor is None)
        if successor is not None:
            sink.hand_over_carry(successor)
        if sink.error is None:
            try:
                sink.close()
            except Exception as exc:
                self._fail(sink, exc)
        self._publish(sink)
        if sink.name is None:
            return Finished(sink.info, None)  # never got a file (the open failed and was logged)
        final = self._sidecar(sink, sidecar)
        try:
            # Not fsynced (~5-20 ms each here: thousands of calls ending together would hold up
            # every other tap's batches for seconds). The WAV's data is not fsynced either; if a
            # power cut loses this sidecar, the one before it says `recording` and recovery
            # finalizes the recording from its WAV, as after a crash.
            write_json_atomic(sink.sidecar_path, final, durable=False)
        except Exception as exc:
            self.errors += 1
            # Kept, and written as soon as the directory takes files again (the server's
            # guard calls retry_sidecars): a tap that ended meanwhile is not left `recording`.
            self._unwritten_sidecars[sink.sidecar_path] = final
            log.error("tap %s: could not write its sidecar, will retry: %s", sink.tap_id, exc)
        self._publish(sink)
        return Finished(sink.info, final)

    def _build_call(
        self,
        directory: Path,
        call_id: str,
        rate: int,
        legs: list[CallLeg],
        sidecar: dict[str, Any],
    ) -> str | None:
        try:
            return write_call(directory, call_id, rate, legs, sidecar)
        except Exception as exc:
            self.errors += 1
            log.error("call %s: could not write its stereo WAV: %s: %s", call_id,
                      type(exc).__name__, exc)  # fmt: skip
            return None

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
        if sink.error is not None:
            data["state"] = TapState.FAILED
            data["error"] = sink.error
        elif data.get("state") == TapState.FAILED:
            data.setdefault("error", "failed")
        elif data.get("ended_at"):
            data["state"] = TapState.FINISHED
        if sink.codec_mismatch is not None:
            data["codec_mismatch"] = sink.codec_mismatch
        decoding = sink.decoders.summary()
        if decoding is not None:
            data["decoding"] = decoding
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
