"""Sources refused a stream, remembered until they go idle.

A refused source keeps sending (a call does not stop because its tap was refused), and each of
its packets would otherwise take the dearest path there is: parsed, looked up, refused again. So
a refusal sticks until the source has been silent for the idle timeout (a call is recorded whole
or not at all, never from its middle on), and the packets of refused IPv4 sources are dropped a
batch at a time with numpy, before any per-packet work: shedding load must shed its cost too.
"""

from __future__ import annotations

from collections.abc import Hashable

import numpy as np

from receiver.rtp.datagrams import Batch

MAX_REFUSED = 100_000  # sources remembered; past it the oldest are forgotten


class RefusedSources:
    def __init__(self, max_sources: int = MAX_REFUSED) -> None:
        self.max_sources = max_sources
        # IPv4 sources by their lane key (sorted), with when each last sent; others in a dict.
        self._keys = np.zeros(0, np.uint64)
        self._seen = np.zeros(0, np.float64)
        self._added: dict[int, float] = {}  # not yet merged into the arrays
        self._other: dict[Hashable, float] = {}

    def __len__(self) -> int:
        return int(self._keys.size) + len(self._added) + len(self._other)

    def add(self, key: Hashable, lane_key: int, now: float) -> None:
        if len(self) >= self.max_sources:
            self.expire(float("inf"), keep=self.max_sources // 2)
        if lane_key:
            self._added[lane_key] = now
        else:
            self._other[key] = now

    def seen(self, key: Hashable, lane_key: int, now: float) -> bool:
        """One packet of a source without a stream: True if the source is refused (for the few
        that `drop` did not catch: IPv6, and those refused earlier in the same batch)."""
        if lane_key:
            if lane_key in self._added:
                self._added[lane_key] = now
                return True
            return False
        if key in self._other:
            self._other[key] = now
            return True
        return False

    def drop(self, batch: Batch, done: np.ndarray) -> int:
        """Mark the batch's datagrams from refused IPv4 sources done (in place); how many."""
        if self._added:
            self._merge()
        keys = self._keys
        if not keys.size:
            return 0
        lane_keys = batch.lane_keys
        place = np.minimum(np.searchsorted(keys, lane_keys), keys.size - 1)
        refused = (keys[place] == lane_keys) & (lane_keys != 0) & ~done
        count = int(refused.sum())
        if count:
            self._seen[place[refused]] = batch.arrivals[refused]
            done |= refused
        return count

    def expire(self, before: float, keep: int | None = None) -> None:
        """Forget sources silent since `before` (or all but the `keep` newest)."""
        self._merge()
        if keep is not None:
            order = np.argsort(self._seen)[-keep:] if keep else np.zeros(0, np.int64)
            mask = np.zeros(self._keys.size, dtype=bool)
            mask[order] = True
            self._other = {}
        else:
            mask = self._seen >= before
            self._other = {k: t for k, t in self._other.items() if t >= before}
        self._keys, self._seen = self._keys[mask], self._seen[mask]

    def _merge(self) -> None:
        if not self._added:
            return
        keys = np.fromiter(self._added.keys(), np.uint64, len(self._added))
        seen = np.fromiter(self._added.values(), np.float64, len(self._added))
        self._added = {}
        all_keys = np.concatenate([self._keys, keys])
        all_seen = np.concatenate([self._seen, seen])
        order = np.argsort(all_keys, kind="stable")
        self._keys, self._seen = all_keys[order], all_seen[order]
