"""How busy the event loop is: the CPU time of its thread over wall time, smoothed over about a
second. Admission sheds new taps above `max_load`, before the loop falls behind its sockets."""

from __future__ import annotations

import asyncio
import time

SAMPLE_INTERVAL = 0.25  # seconds
SMOOTHING = 0.4  # weight of the newest sample (about a second of memory at 4 samples/s)


class LoadMeter:
    def __init__(self, max_load: float) -> None:
        self.max_load = max_load
        self.load = 0.0  # share of the wall time the loop's thread was on a CPU, smoothed
        self.peak = 0.0

    def check(self, transport: str) -> str | None:
        """An admission check: why a new tap must wait, or None."""
        if self.load > self.max_load:
            return f"event loop {self.load:.0%} busy, max_load {self.max_load:.0%}"
        return None

    async def run(self) -> None:
        """Sample forever (runs on the loop, so thread_time is the loop thread's)."""
        wall, cpu = time.monotonic(), time.thread_time()
        while True:
            await asyncio.sleep(SAMPLE_INTERVAL)
            now_wall, now_cpu = time.monotonic(), time.thread_time()
            if now_wall > wall:
                busy = min(1.0, (now_cpu - cpu) / (now_wall - wall))
                self.load += (busy - self.load) * SMOOTHING
                self.peak = max(self.peak, self.load)
            wall, cpu = now_wall, now_cpu
