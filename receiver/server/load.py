"""How busy the event loop is, and how busy it is about to be.

`load` is the CPU time of the loop's thread over wall time, smoothed over about a second. It lags:
in a second in which a thousand new streams start, it has not yet seen most of them. So the meter
also learns what a stream costs (the loop's CPU per packet, and the packets a stream sends) and
predicts the load with every stream admitted so far and one more. Admission sheds new taps when
either is above `max_load`, before the loop falls behind its sockets.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

SAMPLE_INTERVAL = 0.25  # seconds
SMOOTHING = 0.4  # weight of the newest sample (about a second of memory at 4 samples/s)
MIN_PACKETS = 2000  # packets in a sample before its CPU per packet is believed


class LoadMeter:
    def __init__(
        self,
        max_load: float,
        packets: Callable[[], int] | None = None,
        streams: Callable[[], int] | None = None,
    ) -> None:
        self.max_load = max_load
        self.packets = packets  # RTP datagrams read so far
        self.streams = streams  # RTP streams now
        self.load = 0.0  # share of the wall time the loop's thread was on a CPU, smoothed
        self.peak = 0.0
        self.cost_per_packet = 0.0  # the loop's CPU seconds per datagram, smoothed
        self.packets_per_stream = 0.0  # datagrams per second per stream, smoothed

    def predicted(self, extra_streams: int = 1) -> float:
        """The loop's load once every stream admitted so far (and `extra_streams` more) sends."""
        if self.streams is None:
            return 0.0
        rate = self.packets_per_stream * (self.streams() + extra_streams)
        return self.cost_per_packet * rate

    def check(self, transport: str) -> str | None:
        """An admission check: why a new tap must wait, or None."""
        if self.load > self.max_load:
            return f"event loop {self.load:.0%} busy, max_load {self.max_load:.0%}"
        if transport == "rtp":
            predicted = self.predicted()
            if predicted > self.max_load:
                return f"event loop {predicted:.0%} busy with the streams admitted"
        return None

    async def run(self) -> None:
        """Sample forever (runs on the loop, so thread_time is the loop thread's)."""
        wall, cpu = time.monotonic(), time.thread_time()
        packets = self.packets() if self.packets else 0
        while True:
            await asyncio.sleep(SAMPLE_INTERVAL)
            now_wall, now_cpu = time.monotonic(), time.thread_time()
            now_packets = self.packets() if self.packets else 0
            elapsed, spent, read = now_wall - wall, now_cpu - cpu, now_packets - packets
            if elapsed > 0:
                busy = min(1.0, spent / elapsed)
                self.load += (busy - self.load) * SMOOTHING
                self.peak = max(self.peak, self.load)
                streams = self.streams() if self.streams else 0
                if read >= MIN_PACKETS and streams:
                    cost = spent / read
                    self.cost_per_packet += (cost - self.cost_per_packet) * SMOOTHING
                    rate = read / elapsed / streams
                    self.packets_per_stream += (rate - self.packets_per_stream) * SMOOTHING
            wall, cpu, packets = now_wall, now_cpu, now_packets
