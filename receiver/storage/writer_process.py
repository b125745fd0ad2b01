"""The disk writer in a process of its own, so it never competes with the event loop for the GIL.

A disk writer is all system calls (file creation, writes, renames), each of which releases the
GIL; in the same process as the event loop, every one of them hands the GIL to the other thread
and then waits up to the interpreter's switch interval (5 ms) to get it back, and so does the
loop after each of its own calls: with thousands of taps the loop stalled for hundreds of
milliseconds and new taps' files were created at a few dozen a second (the convoy effect). Here
the server's side (`WriterProcess`, on the event loop) only pickles each job and writes it to the
child's standard input without blocking; the child (`python -m receiver.storage.writer_process`)
runs the same `DiskWriter` and reports back on its standard output: what each tap's files are
(`SinkInfo`), what a closed tap came to (`Finished`), and its counters.

If the server dies (kill -9), the child dies with it (PR_SET_PDEATHSIG) and what it had not
written is lost, as before: at most a flush of each tap. If the child dies, the server logs it
and starts another; the taps whose files the dead one held end `failed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

from receiver.child_process import die_with_parent
from receiver.memory import collect_less, keep_freed_memory
from receiver.storage.call_file import CallLeg
from receiver.storage.wav_sink import SinkInfo, WavSink
from receiver.storage.writer import DiskWriter, Finished, Pending

log = logging.getLogger("receiver.writer")
HEADER = 4  # bytes of big-endian length before each pickled message
STATS_INTERVAL = 0.05  # seconds between the child's reports of its counters
STARTUP_TIMEOUT = 30.0  # seconds the child may take to import and say it is ready
NICENESS = 5  # the child's scheduling priority below the server's (about a quarter of a core)
READ_CHUNK = 1 << 20
PIPE_SIZE = 1 << 20  # a flush of thousands of taps is megabytes: 64 KiB pipes take 16x the calls


def frame(message: Any) -> bytes:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return len(data).to_bytes(HEADER, "big") + data


def unframe(buffer: bytearray) -> list[Any]:
    """Take every whole message off the front of `buffer`."""
    messages = []
    while len(buffer) >= HEADER:
        size = int.from_bytes(buffer[:HEADER], "big")
        if len(buffer) < HEADER + size:
            break
        messages.append(pickle.loads(buffer[HEADER : HEADER + size]))
        del buffer[: HEADER + size]
    return messages


class SinkHandle:
    """A tap's files as the server holds them: an id, and what the child last said of them."""

    __slots__ = ("id", "info", "tap_id")

    def __init__(self, sink_id: int, tap_id: str) -> None:
        self.id = sink_id
        self.tap_id = tap_id
        self.info = SinkInfo()


class WriterProcess:
    """The server's side of the child writer: DiskWriter's interface, on the event loop."""

    def __init__(self, log_level: str = "info", log_format: str = "text") -> None:
        self.log_args = [log_level, log_format]
        self.worker: int | None = None  # under --workers N: written into every sidecar
        self.observe_batch: Any = None  # metrics: called with each batch's seconds
        self._proc: subprocess.Popen[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._out = bytearray()  # framed jobs not yet taken by the child's pipe
        self._in = bytearray()
        self._writing = False  # waiting for the pipe to take more
        self._write_soon = False  # a write of what is queued is scheduled
        self._next_id = 0
        self._handles: dict[int, SinkHandle] = {}
        self._finishes: dict[int, Future[Finished]] = {}
        self._calls: dict[int, Future[str | None]] = {}  # call files being built, by job id
        self._stopped: asyncio.Future[bool] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._stopping = False
        # Counters: the child's as it last reported them; the server's own.
        self.batches = self.bytes_written = self.errors = 0
        self.opens_done = self.bytes_done = 0
        self.open_seconds = 0.001
        self.abandoned = 0
        self.restarts = 0
        self.opens_requested = 0
        self.bytes_queued = 0
        self._base = {"opens_done": 0, "bytes_done": 0}  # counts of children that died
        self.sidecars_pending = 0  # final sidecars the child could not write yet
        self.on_open_failed: Callable[[Any, str], None] | None = None  # (handle, why)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the child and wait until it is ready for jobs."""
        self._loop = asyncio.get_running_loop()
        self._ready = self._loop.create_future()
        self._spawn()
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), STARTUP_TIMEOUT)
        except TimeoutError:
            raise RuntimeError("the disk writer process did not start") from None

    def _spawn(self) -> None:
        assert self._loop is not None
        args = [*self.log_args, "" if self.worker is None else str(self.worker)]
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "receiver.storage.writer_process", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        for pipe in (self._proc.stdin, self._proc.stdout):
            with contextlib.suppress(OSError, AttributeError):  # Linux only; past pipe-max-size
                fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        os.set_blocking(self._proc.stdin.fileno(), False)
        os.set_blocking(self._proc.stdout.fileno(), False)
        self._loop.add_reader(self._proc.stdout.fileno(), self._readable)

    async def stop(self, timeout: float) -> bool:
        """Let the child do what is queued, within `timeout`; True if it did all of it."""
        if self._proc is None:
            return True
        assert self._loop is not None
        self._stopping = True
        self._stopped = self._loop.create_future()
        self._send(("shutdown", timeout))
        try:
            done = await asyncio.wait_for(asyncio.shield(self._stopped), timeout + 1.0)
        except TimeoutError:
            log.error("the disk writer did not stop within shutdown_timeout: killing it")
            done = False
        self._close()
        return done

    @property
    def stuck(self) -> bool:
        return False  # a process never holds up the server's exit

    def _close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if self._loop is not None and proc.stdout is not None:
            self._loop.remove_reader(proc.stdout.fileno())
            if self._writing and proc.stdin is not None:
                self._loop.remove_writer(proc.stdin.fileno())
        if proc.poll() is None:
            proc.kill()
        proc.wait()

    # -- DiskWriter's interface ---------------------------------------------------------------

    def new_sink(
        self, directory: Path, tap_id: str, rate: int, channels: int, tracks: list[str] | None
    ) -> SinkHandle:
        self._next_id += 1
        handle = SinkHandle(self._next_id, tap_id)
        self._handles[handle.id] = handle
        self._send(("sink", handle.id, str(directory), tap_id, rate, channels, tracks))
        return handle

    def open(self, sink: SinkHandle, sidecar: dict[str, Any]) -> Future[None]:
        self.opens_requested += 1
        self._send(("open", sink.id, sidecar))
        return _DONE

    def write(self, batch: list[tuple[SinkHandle, Pending]]) -> Future[None]:
        self.bytes_queued += sum(p.nbytes for _, p in batch)
        self._send(("write", [(sink.id, pending) for sink, pending in batch]))
        return _DONE

    def finish(
        self,
        sink: SinkHandle,
        pending: Pending,
        sidecar: dict[str, Any],
        successor: SinkHandle | None = None,
    ) -> Future[Finished]:
        self.bytes_queued += pending.nbytes
        future: Future[Finished] = Future()
        self._finishes[sink.id] = future
        self._send(("finish", sink.id, pending, sidecar, successor.id if successor else None))
        return future

    def rename(self, sink: SinkHandle, new_id: str, sidecar: dict[str, Any]) -> Future[None]:
        sink.tap_id = new_id
        self._send(("rename", sink.id, new_id, sidecar))
        return _DONE

    def build_call(
        self,
        directory: Path,
        call_id: str,
        rate: int,
        legs: list[CallLeg],
        sidecar: dict[str, Any],
    ) -> Future[str | None]:
        self._next_id += 1
        future: Future[str | None] = Future()
        self._calls[self._next_id] = future
        legs_sent = [(str(path), offset, identity) for path, offset, identity in legs]
        self._send(("call", self._next_id, str(directory), call_id, rate, legs_sent, sidecar))
        return future

    def retry_sidecars(self) -> Future[None]:
        """Final sidecars the directory did not take: try them again (it is writable now)."""
        self._send(("retry_sidecars",))
        return _DONE

    @property
    def opening(self) -> int:
        return max(0, self.opens_requested - self.opens_done)

    @property
    def opening_seconds(self) -> float:
        return self.opening * self.open_seconds  # the child creates files without pauses

    @property
    def unwritten_bytes(self) -> int:
        return max(0, self.bytes_queued - self.bytes_done)

    # -- the pipes ----------------------------------------------------------------------------

    def _send(self, message: Any) -> None:
        """Queue a job; the pipe is written once per turn of the event loop (a burst of new taps
        sends two messages each: one write per message cost a system call each)."""
        if self._proc is None:
            return
        self._out += frame(message)
        if not self._writing and not self._write_soon:
            self._write_soon = True
            assert self._loop is not None
            self._loop.call_soon(self._write_queued)

    def _write_queued(self) -> None:
        self._write_soon = False
        if not self._writing:
            self._write_out()

    def _write_out(self) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None:
            return
        fd = proc.stdin.fileno()
        while self._out:
            try:
                with memoryview(self._out) as view:  # a slice of the bytearray would copy it
                    written = os.write(fd, view[:READ_CHUNK])
            except BlockingIOError:
                break
            except (BrokenPipeError, OSError):
                self._died()
                return
            del self._out[:written]
        assert self._loop is not None
        if self._out and not self._writing:
            self._writing = True
            self._loop.add_writer(fd, self._write_out)
        elif not self._out and self._writing:
            self._writing = False
            self._loop.remove_writer(fd)

    def _readable(self) -> None:
        proc = self._proc
        if proc is None or proc.stdout is None:
            return
        try:
            data = os.read(proc.stdout.fileno(), READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._died()
            return
        self._in += data
        for message in unframe(self._in):
            self._handle(message)

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "infos":
            handles = self._handles
            for sink_id, info in message[1]:
                handle = handles.get(sink_id)
                if handle is not None:
                    handle.info = info
        elif kind == "finished":
            handle = self._handles.pop(message[1], None)
            finished: Finished = message[2]
            if handle is not None:
                handle.info = finished.info
            future = self._finishes.pop(message[1], None)
            if future is not None:
                future.set_result(finished)
        elif kind == "call_built":
            call = self._calls.pop(message[1], None)
            if call is not None:
                call.set_result(message[2])
        elif kind == "open_failed":
            handle = self._handles.get(message[1])
            if handle is not None and self.on_open_failed is not None:
                self.on_open_failed(handle, message[2])
        elif kind == "stats":
            stats = message[1]
            if stats["batches"] > self.batches and self.observe_batch is not None:
                self.observe_batch(stats["last_batch_seconds"])
            names = ("batches", "bytes_written", "errors", "open_seconds", "abandoned")
            for name in (*names, "sidecars_pending"):
                setattr(self, name, stats[name])
            self.opens_done = self._base["opens_done"] + stats["opens_done"]
            self.bytes_done = self._base["bytes_done"] + stats["bytes_done"]
        elif kind == "ready" and self._ready is not None and not self._ready.done():
            self._ready.set_result(None)
        elif kind == "stopped" and self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(bool(message[1]))

    def _died(self) -> None:
        """The child's pipe closed: at the end of a shutdown, or because it died."""
        if self._stopping:
            if self._stopped is not None and not self._stopped.done():
                self._stopped.set_result(False)
            return
        code = self._proc.poll() if self._proc is not None else None
        self._close()
        self.restarts += 1
        self.errors += 1
        # What the dead child held is gone: its taps end failed, its work counts as done.
        self._base = {"opens_done": self.opens_requested, "bytes_done": self.bytes_queued}
        self._out.clear()
        self._in.clear()
        self._writing = False
        for sink_id, future in list(self._finishes.items()):
            handle = self._handles.pop(sink_id, None)
            info = handle.info if handle is not None else SinkInfo()
            failed = SinkInfo(info.name, info.frames_written, info.track_names, "disk writer died")
            future.set_result(Finished(failed, None))
        self._finishes.clear()
        for call in self._calls.values():
            call.set_result(None)
        self._calls.clear()
        for handle in self._handles.values():
            handle.info = SinkInfo(error="disk writer died")
        self._handles.clear()
        log.error("the disk writer process died (exit %s): starting another", code)
        self._spawn()


# What `open`, `write`, `rename` and `retry_sidecars` return: the child reports their outcomes on
# its own. A Future costs ~25 µs to make (its Condition), once per new tap in a burst; this one is
# done and never changes, so it is shared.
_DONE: Future[None] = Future()
_DONE.set_result(None)


# -- the child -----------------------------------------------------------------------------------


class _Child:
    def __init__(self, writer: DiskWriter, out: BinaryIO) -> None:
        self.writer = writer
        self.out = out
        self.lock = threading.Lock()
        self.sinks: dict[int, WavSink] = {}
        self.ids: dict[int, int] = {}  # id(WavSink) -> sink id
        self.infos: dict[int, SinkInfo] = {}  # published since the last message, by sink id
        self.last_stats = 0.0
        writer.on_publish = self.published
        writer.on_job_done = self.job_done
        writer.on_open_failed = self.open_failed
        writer.on_announce = self.announce

    def send(self, message: Any) -> None:
        data = frame(message)
        with self.lock:
            try:
                self.out.write(data)
                self.out.flush()
            except OSError:  # the server is gone
                os._exit(0)

    def published(self, sink: WavSink) -> None:  # on the writer thread
        sink_id = self.ids.get(id(sink))
        if sink_id is not None:
            self.infos[sink_id] = sink.info  # sent with the job's end (one message a batch)

    def announce(self, sink: WavSink) -> None:  # on the writer thread, before a rename
        sink_id = self.ids.get(id(sink))
        if sink_id is not None:
            self.send(("infos", [(sink_id, sink.info)]))  # now, not at the end of the job

    def open_failed(self, sink: WavSink, why: str) -> None:  # on the writer thread
        sink_id = self.ids.get(id(sink))
        if sink_id is not None:
            self.send(("open_failed", sink_id, why))

    def job_done(self) -> None:  # on the writer thread
        if self.infos:
            infos, self.infos = self.infos, {}
            self.send(("infos", list(infos.items())))
        now = time.monotonic()
        if now - self.last_stats >= STATS_INTERVAL or not self.writer.busy:
            self.last_stats = now
            self.send(("stats", self.stats()))

    def stats(self) -> dict[str, Any]:
        w = self.writer
        return {
            "batches": w.batches,
            "bytes_written": w.bytes_written,
            "errors": w.errors,
            "opens_done": w.opens_done,
            "bytes_done": w.bytes_done,
            "open_seconds": w.open_seconds,
            "last_batch_seconds": w.last_batch_seconds,
            "abandoned": w.abandoned,
            "sidecars_pending": w.sidecars_pending,
        }

    def handle(self, message: tuple[Any, ...]) -> bool:
        """One job from the server; False at shutdown."""
        kind = message[0]
        if kind == "sink":
            _, sink_id, directory, tap_id, rate, channels, tracks = message
            sink = self.writer.new_sink(Path(directory), tap_id, rate, channels, tracks)
            self.sinks[sink_id] = sink
            self.ids[id(sink)] = sink_id
        elif kind == "open":
            self.writer.open(self.sinks[message[1]], message[2])
        elif kind == "write":
            batch = [(self.sinks[i], p) for i, p in message[1] if i in self.sinks]
            self.writer.write(batch, nbytes=sum(p.nbytes for _, p in message[1]))
        elif kind == "finish":
            _, sink_id, pending, sidecar, successor = message
            sink = self.sinks.pop(sink_id)
            future = self.writer.finish(sink, pending, sidecar, self.sinks.get(successor))
            future.add_done_callback(partial(self.finished, sink_id, sink))
        elif kind == "rename":
            self.writer.rename(self.sinks[message[1]], message[2], message[3])
        elif kind == "call":
            _, job_id, directory, call_id, rate, legs, sidecar = message
            legs = [(Path(path), offset, tuple(identity)) for path, offset, identity in legs]
            built = self.writer.build_call(Path(directory), call_id, rate, legs, sidecar)
            built.add_done_callback(partial(self.call_built, job_id))
        elif kind == "retry_sidecars":
            self.writer.retry_sidecars()
        elif kind == "shutdown":
            done = self.writer.shutdown(message[1])
            self.send(("stats", self.stats()))
            self.send(("stopped", done))
            return False
        return True

    def call_built(self, job_id: int, future: Future[str | None]) -> None:
        self.send(("call_built", job_id, future.result()))

    def finished(self, sink_id: int, sink: WavSink, future: Future[Finished]) -> None:
        self.ids.pop(id(sink), None)
        self.infos.pop(sink_id, None)
        self.send(("finished", sink_id, future.result()))


def main(argv: list[str]) -> int:
    from receiver.logs import WorkerLogFilter, setup_logging

    die_with_parent()
    keep_freed_memory()  # it unpickles every flush: megabytes
    # Below the event loop: where they compete for a core, receiving packets (which are lost if
    # not read in time) goes before writing them (which may lag, within max_unwritten_*) and
    # before creating new taps' files (admission refuses new taps while those lag).
    os.nice(NICENESS)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when to stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    defaults = ["info", "text", ""]
    level, fmt, worker = [*argv[:3], *defaults[len(argv[:3]) :]]
    setup_logging(level, fmt)
    if worker:
        for handler in logging.getLogger().handlers:
            handler.addFilter(WorkerLogFilter(int(worker)))
    writer = DiskWriter(open_duty=1.0)
    writer.worker = int(worker) if worker else None
    child = _Child(writer, sys.stdout.buffer)
    collect_less()  # every batch unpickles a few small objects per tap (receiver.memory)
    child.send(("ready",))
    source = sys.stdin.fileno()
    buffer = bytearray()
    while True:
        data = os.read(source, READ_CHUNK)
        if not data:  # the server is gone without a shutdown: stop at once (see the docstring)
            os._exit(0)
        buffer += data
        for message in unframe(buffer):
            if not child.handle(message):
                return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
