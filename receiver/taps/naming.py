"""Names given to taps before they start, for both transports.

A tap is named by its transport (a WebSocket tap by the id in its URI, an RTP stream after its
source: `rtp-<ip>-<port>`) unless the control plane said otherwise first: a registration
(`POST /api/taps`: an RTP pool port, or an expected source on the shared port) or a SignalWire
status callback that arrived before the audio (a WebSocket URI's tap id, a registered port).
Such a name waits here under the key the tap will be known by (`Expected`), until that tap
starts and claims it, or until it expires. A name can hold a release hook (a pool port goes
back to the pool when its name expires unused or is cancelled).

Bounded: at most `max_pending` names wait; past that the oldest is dropped (and counted), so
status callbacks for taps that never come cannot hold memory without end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from receiver.codecs.encoding import Encoding

log = logging.getLogger("receiver.taps")

NAME_LIFETIME = 600.0  # seconds a name waits for its tap, unless the caller says otherwise
MAX_PENDING = 10_000


def websocket_key(tap_id: str) -> tuple[str, str]:
    """The key a WebSocket tap is known by: the tap id in its URI."""
    return ("websocket", tap_id)


def rtp_port_key(port: int) -> tuple[str, int]:
    """The key of an RTP stream on a pool port (every packet to it belongs to one tap)."""
    return ("rtp-port", port)


def rtp_source_key(host: str, port: int) -> tuple[str, tuple[str, int]]:
    """The key of an RTP stream on the shared port: its source address."""
    return ("rtp-source", (host, port))


@dataclass
class Expected:
    """A name waiting for its tap."""

    tap_id: str
    extra: dict[str, Any] = field(default_factory=dict)  # sidecar fields (e.g. `signalwire`)
    codec: Encoding | None = None  # an RTP registration's codec, for packets that do not say
    expires: float = 0.0
    release: Callable[[], None] | None = None  # called when the name goes unused


class Naming:
    def __init__(self, max_pending: int = MAX_PENDING) -> None:
        self.max_pending = max_pending
        self._pending: dict[Hashable, Expected] = {}  # insertion order = age
        self.counters = {"expected": 0, "claimed": 0, "expired": 0, "dropped": 0}

    def __len__(self) -> int:
        return len(self._pending)

    def expect(self, key: Hashable, name: Expected, lifetime: float = NAME_LIFETIME) -> None:
        """`name` for the tap that will start under `key` (replacing an earlier one)."""
        name.expires = time.monotonic() + lifetime
        old = self._pending.pop(key, None)
        if old is not None and old.release is not None and old.release is not name.release:
            old.release()
        self._pending[key] = name
        self.counters["expected"] += 1
        while len(self._pending) > self.max_pending:
            oldest = next(iter(self._pending))
            self.counters["dropped"] += 1
            self._discard(oldest)
            if self.counters["dropped"] == 1 or self.counters["dropped"] % 1000 == 0:
                log.warning("%d names wait for taps that have not started: dropping the oldest "
                            "(%d so far)", self.max_pending, self.counters["dropped"])  # fmt: skip

    def get(self, key: Hashable) -> Expected | None:
        return self._pending.get(key)

    def claim(self, key: Hashable) -> Expected | None:
        """The tap under `key` starts: its name, if one waits (and has not expired)."""
        name = self._pending.pop(key, None)
        if name is None:
            return None
        if name.expires <= time.monotonic():
            self.counters["expired"] += 1
            if name.release is not None:
                name.release()
            return None
        self.counters["claimed"] += 1
        return name

    def cancel(self, key: Hashable) -> bool:
        """Forget the name under `key` (its release hook runs); False if none waited."""
        if key not in self._pending:
            return False
        self._discard(key)
        return True

    def expire(self, now: float | None = None) -> list[Expected]:
        """Drop the names whose time is up (their release hooks run); returns them."""
        now = time.monotonic() if now is None else now
        expired = [(k, n) for k, n in self._pending.items() if n.expires <= now]
        for key, _ in expired:
            self._discard(key)
        self.counters["expired"] += len(expired)
        return [name for _, name in expired]

    def _discard(self, key: Hashable) -> None:
        name = self._pending.pop(key)
        if name.release is not None:
            name.release()

    def stats(self) -> dict[str, int]:
        return {"pending": len(self._pending), **self.counters}
