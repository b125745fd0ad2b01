"""Who may start a tap: one policy for both transports (capacity, allow-lists, the free-space
floor, per-address rate limits, and load: new taps are shed while the receiver is overloaded, so
the taps it has stay exact), and the open-file budget that caps the capacity. Small, synchronous
and testable without sockets."""

from __future__ import annotations

import ipaddress
import logging
import resource
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from receiver.config import IPNetwork, LimitSettings, parse_cidrs

log = logging.getLogger("receiver.limits")


class AddressFilter:
    """A CIDR allow-list; empty allows everyone."""

    def __init__(self, networks: tuple[IPNetwork, ...] | str) -> None:
        self.networks = parse_cidrs(networks) if isinstance(networks, str) else list(networks)
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


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a new tap may not start: `reason` names the counter (`capacity`, `not_allowed`,
    `low_disk`, `unwritable`, `rate_limit`), `status` the HTTP answer a WebSocket client gets."""

    reason: str
    status: int
    message: str


class Admission:
    """The one admission policy. Each transport asks `refusal` before it creates a tap; the
    server sets `low_disk` and `unwritable` (its guards probe the directory every second), fits
    the capacities to the open-file limit at start-up and adds the load checks (`overload`:
    each returns why the receiver cannot take a new tap of a transport now, or None)."""

    def __init__(self, limits: LimitSettings) -> None:
        self.capacity = {"websocket": limits.ws_max_taps, "rtp": limits.rtp_max_streams}
        # HTTP clients outside http_allow are refused (403) before any route, tap or not.
        self.http_clients = AddressFilter(limits.http_allow)
        self._allowed = {"rtp": AddressFilter(limits.rtp_allow)}
        self._rate = {t: RateLimiter(limits.new_tap_rate_limit) for t in self.capacity}
        self.low_disk = False
        self.overload: list[Callable[[str], str | None]] = []
        self.unwritable: str | None = None  # why the recordings directory takes no new file
        self.open_file_limit = 0
        self.refused: Counter[tuple[str, str]] = Counter()  # (transport, reason)

    def fit_open_file_limit(self) -> FileBudget:
        """Raise the open-file limit and lower the capacities to what it can hold."""
        budget = raise_open_file_limit(self.capacity["websocket"], self.capacity["rtp"])
        self.capacity = {"websocket": budget.ws_taps, "rtp": budget.rtp_streams}
        self.open_file_limit = budget.limit
        return budget

    def refusal(
        self, transport: str, address: str | None, active: int, now: float | None = None
    ) -> Refusal | None:
        """None if a new tap of `transport` from `address` may start while `active` run."""
        found = self._check(transport, address, active, now)
        if found is not None:
            self.refused[(transport, found.reason)] += 1
        return found

    def _check(
        self, transport: str, address: str | None, active: int, now: float | None
    ) -> Refusal | None:
        limit = self.capacity[transport]
        if active >= limit:
            return Refusal("capacity", 503, f"too many taps ({limit}); try again later")
        allowed = self._allowed.get(transport)
        if allowed is not None and not allowed.allows(address):
            return Refusal("not_allowed", 403, "the address is not in the allow-list")
        if self.low_disk:
            return Refusal(
                "low_disk", 503, "the recordings disk is below min_free_space; try again later"
            )
        if self.unwritable is not None:
            return Refusal(
                "unwritable",
                503,
                f"the recordings directory is not writable ({self.unwritable}); try again later",
            )
        if not self._rate[transport].allow(address or "", now):
            return Refusal(
                "rate_limit", 429, "too many new taps from this address (new_tap_rate_limit)"
            )
        for check in self.overload:
            why = check(transport)
            if why is not None:
                return Refusal("overload", 503, f"overloaded ({why}); try again later")
        return None

    def describe(self, min_free_space: int) -> dict[str, int]:
        """The `limits` block of /healthz."""
        return {
            "ws_max_taps": self.capacity["websocket"],
            "rtp_max_streams": self.capacity["rtp"],
            "open_files": self.open_file_limit,
            "min_free_space": min_free_space,
        }
