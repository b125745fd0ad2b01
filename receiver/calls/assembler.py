"""The calls whose legs are being recorded: finished legs wait here for their partner; once a
call's `speak` and `listen` legs have both ended, the disk writer builds `<call-id>.wav` from
their WAVs (receiver.storage.call_file). On the event loop; bounded (`MAX_PENDING` calls wait,
each at most `PARTNER_WAIT` seconds).

What cannot be a call is recorded apart (each leg keeps its own files, which nothing here
touches), counted, and logged once: a leg whose URI and status callback name different calls, a
third leg, legs at different rates or not mono, a leg split by max_tap_duration.

A leg's files are the call's input until it is built: `release` hears of each leg (its sidecar)
once nothing here needs its WAV any more (so the archiver, which may delete local audio, takes
it only then), and `built` of each call file made.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from receiver.calls.legs import LEGS, Leg, leg_of, offsets
from receiver.storage.call_file import file_identity
from receiver.storage.writer import Writer
from receiver.taps.tap import Tap

log = logging.getLogger("receiver.calls")
MAX_PENDING = 10_000  # calls with one leg ended, waiting for the other
PARTNER_WAIT = 600.0  # seconds a finished leg waits for its partner
MAX_DONE = 10_000  # call ids remembered as built, to tell a third leg


@dataclass
class FinishedLeg:
    leg: Leg
    tap_id: str
    transport: str
    file: str
    rate: int
    channels: int
    frames: int
    first_arrival: float  # monotonic
    first_arrival_at: str  # UTC, the same instant
    ended_at: str | None
    rtp: dict[str, Any] | None
    finished: float  # monotonic, when it was finalized here
    sidecar: dict[str, Any]
    identity: tuple[int, int]  # its WAV's (st_dev, st_ino)


class CallAssembler:
    def __init__(
        self,
        recordings: Path,
        writer: Writer,
        release: Callable[[dict[str, Any]], None],
        built: Callable[[dict[str, Any]], None],
    ) -> None:
        self.recordings = recordings
        self.writer = writer
        self.release = release
        self.built = built
        self._waiting: OrderedDict[str, dict[str, FinishedLeg]] = OrderedDict()
        self._done: OrderedDict[str, None] = OrderedDict()
        self._held: dict[str, str] = {}  # file base name of each leg kept here -> its call
        self._building: set[asyncio.Future[str | None]] = set()
        self.counters: Counter[str] = Counter()

    def leg_finalized(self, tap: Tap, sidecar: dict[str, Any]) -> bool:
        """A tap's files are complete: if it is a call's leg, the call may be complete too.
        True: the leg is kept here, and `release` hears of it once its call is done with it."""
        leg = leg_of(sidecar)
        if leg is None:
            return False
        if isinstance(leg, str):
            self._apart(sidecar.get("tap_id"), leg, "its URI and its status callback name "
                        "different calls or legs")  # fmt: skip
            return False
        if sidecar.get("segment") is not None or not sidecar.get("file"):
            self._apart(leg.call_id, "leg_without_one_file", "a leg split by max_tap_duration, "
                        "or one without a file, is not put into a call")  # fmt: skip
            self._give_up(leg.call_id)  # its partner waits in vain
            return False
        self.expire()
        if leg.call_id in self._done or leg.leg in self._waiting.get(leg.call_id, {}):
            self._apart(leg.call_id, "third_leg", f"a further {leg.leg} leg ({sidecar['file']}) "
                        "is recorded apart")  # fmt: skip
            return False
        try:
            identity = file_identity(self.recordings / str(sidecar["file"]))
        except OSError:
            self._apart(leg.call_id, "leg_without_one_file", f"the {leg.leg} leg's WAV is gone")
            return False
        now = time.monotonic()
        first_at = datetime.now(UTC).timestamp() - (now - tap.first_audio_monotonic)
        finished = FinishedLeg(
            leg, str(sidecar.get("tap_id")), tap.transport, str(sidecar["file"]),
            tap.sample_rate, tap.channels, int(sidecar.get("frames_written", 0)),
            tap.first_audio_monotonic, _iso(first_at), sidecar.get("ended_at"),
            sidecar.get("rtp") if isinstance(sidecar.get("rtp"), dict) else None, now, sidecar,
            identity,
        )  # fmt: skip
        legs = self._waiting.setdefault(leg.call_id, {})
        legs[leg.leg] = finished
        self._held[finished.file.removesuffix(".wav")] = leg.call_id
        self.counters["legs"] += 1
        if len(legs) < len(LEGS):
            while len(self._waiting) > MAX_PENDING:
                dropped, kept = self._waiting.popitem(last=False)
                self._apart(dropped, "too_many_waiting", "too many calls wait for a leg")
                self._release(kept.values())
            return True
        del self._waiting[leg.call_id]
        self._remember(leg.call_id)
        self._build(leg.call_id, [legs[name] for name in LEGS])
        return True

    def _build(self, call_id: str, legs: list[FinishedLeg]) -> None:
        rates = {leg.rate for leg in legs}
        if len(rates) > 1 or any(leg.channels != 1 for leg in legs):
            formats = ", ".join(f"{x.leg.leg} {x.rate} Hz x{x.channels}" for x in legs)
            self._apart(call_id, "formats_differ", f"legs of different rates or not mono "
                        f"({formats}): each kept in its own file")  # fmt: skip
            self._release(legs)
            return
        rate = legs[0].rate
        starts = offsets({x.leg.leg: x.first_arrival for x in legs}, rate)
        sidecar = {
            "tap_id": call_id,
            "transport": "call",
            "codec": "L16",
            "sample_rate": rate,
            "channels": len(legs),
            "channel_names": list(LEGS),
            "state": "finished",
            "started_at": min(x.first_arrival_at for x in legs),
            "ended_at": max((x.ended_at for x in legs if x.ended_at), default=None),
            "call": {
                "call_id": call_id,
                "legs": {x.leg.leg: _describe(x, starts[x.leg.leg]) for x in legs},
                "relative_drift_ms": _relative_drift(legs, starts),
            },
        }
        files = [(self.recordings / x.file, starts[x.leg.leg], x.identity) for x in legs]
        future = asyncio.wrap_future(
            self.writer.build_call(self.recordings, call_id, rate, files, sidecar)
        )
        self._building.add(future)
        future.add_done_callback(self._building.discard)
        future.add_done_callback(lambda done: self._built(call_id, done.result(), legs, sidecar))

    def _built(
        self, call_id: str, name: str | None, legs: list[FinishedLeg], sidecar: dict[str, Any]
    ) -> None:
        self.counters["built" if name else "failed"] += 1
        self._release(legs)
        if name:
            log.info("call %s: %s.wav (speak, listen)", call_id, name)
            self.built({**sidecar, "file": f"{name}.wav"})

    def _give_up(self, call_id: str) -> None:
        """The call can never be built: its waiting leg goes its own way now."""
        waiting = self._waiting.pop(call_id, None)
        if waiting:
            self._release(waiting.values())

    def _release(self, legs: Any) -> None:
        for leg in legs:
            self._held.pop(leg.file.removesuffix(".wav"), None)
            self.release(leg.sidecar)

    async def wait_built(self, timeout: float) -> None:
        """Shutdown: until the calls being built are written, at most `timeout` seconds."""
        if self._building and timeout > 0:
            await asyncio.wait(list(self._building), timeout=timeout)

    def holds(self, name: str) -> str | None:
        """Why the recording `name` may not be deleted now: it is a leg its call still needs."""
        call_id = self._held.get(name)
        if call_id is None:
            return None
        return f"{name!r} is a leg of call {call_id!r}, whose stereo file is not built yet"

    def _apart(self, call_id: Any, reason: str, why: str) -> None:
        self.counters[f"apart_{reason}"] += 1
        log.warning("call %s: %s", call_id, why)

    def _remember(self, call_id: str) -> None:
        self._done[call_id] = None
        while len(self._done) > MAX_DONE:
            self._done.popitem(last=False)

    def expire(self) -> None:
        deadline = time.monotonic() - PARTNER_WAIT
        while self._waiting:
            call_id, legs = next(iter(self._waiting.items()))
            if min(x.finished for x in legs.values()) > deadline:
                return
            del self._waiting[call_id]
            self._apart(call_id, "partner_never_came", "one leg ended and the other never came")
            self._release(legs.values())

    def stats(self) -> dict[str, Any]:
        return {"waiting": len(self._waiting), "building": len(self._building), **self.counters}


def _describe(leg: FinishedLeg, offset: int) -> dict[str, Any]:
    aligned: dict[str, Any] = {"by": "first_arrival", "first_arrival_at": leg.first_arrival_at}
    if leg.rtp is not None:  # its timestamps place its audio inside the leg (gaps as silence)
        aligned["rtp_ssrcs"] = leg.rtp.get("ssrcs")
    return {
        "file": leg.file,
        "tap_id": leg.tap_id,
        "transport": leg.transport,
        "named_by": leg.leg.how,
        "offset_frames": offset,
        "offset_seconds": round(offset / leg.rate, 6),
        "frames": leg.frames,
        "aligned": aligned,
        "drift_ms": _drift_ms(leg),
    }


def _drift_ms(leg: FinishedLeg) -> float | None:
    """How far the leg's sample clock ran from the wall clock: its audio's length minus the time
    from its first arrival to its end (negative: fewer samples than time)."""
    if not leg.ended_at:
        return None
    try:
        ended = datetime.fromisoformat(leg.ended_at.replace("Z", "+00:00")).timestamp()
        first = datetime.fromisoformat(leg.first_arrival_at.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
    return round((leg.frames / leg.rate - (ended - first)) * 1000, 1)


def _relative_drift(legs: list[FinishedLeg], starts: dict[str, int]) -> float | None:
    drifts = [_drift_ms(x) for x in legs]
    if any(d is None for d in drifts):
        return None
    return round(drifts[0] - drifts[1], 1)  # type: ignore[operator]


def _iso(timestamp: float) -> str:
    moment = datetime.fromtimestamp(timestamp, UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")
