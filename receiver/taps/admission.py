"""Guards against overload and hostile clients: per-address rate limits, CIDR allow-lists, the
free-space floor and the open-file budget. Small, synchronous and testable without sockets."""

from __future__ import annotations

import ipaddress
import logging
import os
import resource
import time
from dataclasses import dataclass

from receiver.config import parse_cidrs

log = logging.getLogger("receiver.limits")


class AddressFilter:
    """A CIDR allow-list; empty allows everyone."""

    def __init__(self, cidrs: str) -> None:
        self.networks = parse_cidrs(cidrs)
        self._cache: dict[str, bool] = {}

    def allows(self, address: str | None) -> bool:
        if not self.networks:
            return True
        if address is None:
            return False
        verdict = self._cache.get(address)
        if verdict is None:
            try:
                ip = ipaddress.ip_address(address.split("%")[0])
            except ValueError:
                return False
            if ip.version == 6 and ip.ipv4_mapped is not None:  # type: ignore[union-attr]
                ip = ip.ipv4_mapped  # type: ignore[union-attr]
            verdict = any(ip in network for network in self.networks)
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[address] = verdict
        return verdict


class RateLimiter:
    """Token bucket per source address: `rate` new taps per second, bursts up to max(1, rate).
    Memory is bounded: the table is cleared when it holds `max_addresses` entries."""

    def __init__(self, rate: float, max_addresses: int = 100_000) -> None:
        self.rate = rate
        self.burst = max(1.0, rate)
        self.max_addresses = max_addresses
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, last time)

    def allow(self, address: str, now: float | None = None) -> bool:
        if self.rate <= 0:
            return True
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(address, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[address] = (tokens, now)
            return False
        if len(self._buckets) >= self.max_addresses:
            self._buckets.clear()
        self._buckets[address] = (tokens - 1.0, now)
        return True


def free_bytes(directory: os.PathLike[str] | str) -> int:
    stats = os.statvfs(directory)
    return stats.f_bavail * stats.f_frsize


@dataclass
class FileBudget:
    """How many taps the open-file limit leaves room for (each tap keeps files open)."""

    limit: int
    ws_taps: int
    rtp_streams: int


def raise_open_file_limit(ws_max_taps: int, rtp_max_streams: int) -> FileBudget:
    """Raise RLIMIT_NOFILE to its hard limit, then make each tap cap fit into it: a WebSocket tap
    holds up to 4 descriptors (its socket, its WAV, two per-track WAVs), an RTP stream up to 2 (its
    WAV, a pool port); 64 stay for the listeners, logs and clients of the API."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1_048_576)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
    available = max(4, soft - 64)
    budget = FileBudget(
        soft, min(ws_max_taps, available // 4), min(rtp_max_streams, available // 2)
    )
    if (budget.ws_taps, budget.rtp_streams) != (ws_max_taps, rtp_max_streams):
        log.warning(
            "open-file limit %d cannot hold ws_max_taps=%d or rtp_max_streams=%d: using %d and %d "
            "(raise the hard limit, e.g. docker run --ulimit nofile=1048576)",
            soft,
            ws_max_taps,
            rtp_max_streams,
            budget.ws_taps,
            budget.rtp_streams,
        )
    elif 4 * ws_max_taps + 2 * rtp_max_streams > available:
        log.info(
            "open-file limit %d: full WebSocket and RTP capacity at once would need %d; taps that "
            "cannot open their file fail alone",
            soft,
            4 * ws_max_taps + 2 * rtp_max_streams,
        )
    return budget
