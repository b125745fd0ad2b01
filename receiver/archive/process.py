"""The archiver in a process of its own: uploads (HTTP, hashing, encryption) and retention sweeps
never take the GIL or a slot of the server's event loop.

The server's side (`ArchiverProcess`) writes one JSON line per message to the child's standard
input: `{"finished": NAME}` when a recording is finalized, `{"scan": true}` once crash recovery is
done. The child (`python -m receiver.archive.process`) answers with status lines
(`{"status": {...}}`), which /healthz and /metrics show. If the server dies (kill -9) the child
dies with it (PR_SET_PDEATHSIG); what it was uploading is resumed by the next start. If the
child dies, the server logs it and starts another.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from receiver.child_process import die_with_parent
from receiver.config import ArchiveSettings

log = logging.getLogger("receiver.archive")
STATUS_INTERVAL = 0.2  # seconds between the child's status lines, at most
RESTART_DELAY = 5.0
NICENESS = 10


class ArchiverProcess:
    """The server's side: start the child, hand it finished recordings, keep its last status."""

    def __init__(
        self,
        settings: ArchiveSettings,
        recordings: Path,
        primary: bool,
        log_level: str,
        log_format: str,
        worker: int | None,
    ) -> None:
        self.args = {
            "settings": dataclasses.asdict(settings),
            "recordings": str(recordings),
            "primary": primary,
            "log_level": log_level,
            "log_format": log_format,
            "worker": worker,
        }
        self.status: dict[str, Any] = {"enabled": settings.enabled, "state": "starting"}
        self.restarts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._scanned = False  # crash recovery is done: a restarted child scans at once

    async def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name="archiver")

    async def _spawn(self) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "receiver.archive.process",
            json.dumps(self.args),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )

    async def _supervise(self) -> None:
        while not self._stopping:
            self._proc = proc = await self._spawn()
            if self._scanned:
                self.scan()
            assert proc.stdout is not None
            async for line in proc.stdout:
                with contextlib.suppress(ValueError):
                    message = json.loads(line)
                    if isinstance(message, dict) and isinstance(message.get("status"), dict):
                        self.status = message["status"]
            code = await proc.wait()
            if self._stopping:
                return
            self.restarts += 1
            self.status = {**self.status, "state": "restarting"}
            log.error("the archiver process exited with %s; starting another in %.0f s",
                      code, RESTART_DELAY)  # fmt: skip
            await asyncio.sleep(RESTART_DELAY)

    def _send(self, message: dict[str, Any]) -> None:
        proc = self._proc
        if proc is None or proc.stdin is None or proc.returncode is not None:
            return  # a new child scans the directory (finished ones are found there)
        with contextlib.suppress(Exception):
            proc.stdin.write(json.dumps(message).encode() + b"\n")

    def submit(self, sidecar: dict[str, Any]) -> None:
        """A recording was finalized (called on the event loop; only writes a line)."""
        name = str(sidecar.get("file") or "").removesuffix(".wav")
        if name:
            self._send({"finished": name})

    def scan(self) -> None:
        """Crash recovery is done: queue what earlier processes left unarchived."""
        self._scanned = True
        self._send({"scan": True})

    async def stop(self, timeout: float) -> None:
        """Stop at once: an upload cut short here is resumed (or redone) by the next start."""
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


# -- the child ------------------------------------------------------------------------------------


async def _child(args: dict[str, Any]) -> None:
    from receiver.archive.archiver import Archiver

    settings = ArchiveSettings(
        **{**args["settings"], "recipients": tuple(args["settings"]["recipients"])}
    )
    archiver = Archiver(settings, Path(args["recordings"]), args["primary"])
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def commands() -> None:
        async for line in reader:
            with contextlib.suppress(ValueError):
                message = json.loads(line)
                if "finished" in message:
                    archiver.finished(str(message["finished"]))
                elif "scan" in message and archiver.primary and archiver.enabled:
                    await archiver.scan()
        stop.set()  # the server is gone

    async def report() -> None:
        while True:
            sys.stdout.write(json.dumps({"status": archiver.status()}) + "\n")
            sys.stdout.flush()
            archiver.changed.clear()
            await archiver.changed.wait()
            await asyncio.sleep(STATUS_INTERVAL)

    tasks = [asyncio.create_task(t) for t in (archiver.run(), commands(), report())]
    stopped = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([*tasks, stopped], return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        if task is not stopped and task.exception() is not None:
            log.error("archiver failed: %r", task.exception())
    for task in tasks:
        task.cancel()
    with contextlib.suppress(BaseException):
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 2.0)


def main(argv: list[str]) -> int:
    from receiver.logs import WorkerLogFilter, setup_logging

    die_with_parent()
    os.nice(NICENESS)  # below the server and its disk writer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when to stop
    args = json.loads(argv[0])
    setup_logging(args["log_level"], args["log_format"])
    if args.get("worker") is not None:
        for handler in logging.getLogger().handlers:
            handler.addFilter(WorkerLogFilter(int(args["worker"])))
    started = time.monotonic()
    asyncio.run(_child(args))
    log.debug("archiver stopped after %.1f s", time.monotonic() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
