"""Which SSRCs a stream has had: the ones listed in the sidecar, and the retired ones whose late
packets are dropped as stale.

A previously seen SSRC is stale only while the current SSRC is alive (it sent a packet within
`ssrc_timeout`); after that, the old SSRC coming back is treated as another SSRC change. Both
sets are bounded: a hostile sender may use a new SSRC on every packet.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from receiver.rtp.timeline.hot_state import HotState
from receiver.rtp.timeline.stats import TimelineStats

MAX_SSRCS = 64  # SSRCs kept by name, and retired SSRCs remembered


@dataclass(slots=True, eq=False)
class SsrcHistory:
    # Settings
    ssrc_timeout: float  # seconds of silence after which the current SSRC no longer counts

    # Shared: the current SSRC and when it was last seen in `hot`, the list in `stats`
    hot: HotState
    stats: TimelineStats

    # State
    retired: set[int] = field(default_factory=set, init=False)
    seen: set[int] = field(default_factory=set, init=False)

    def is_stale(self, ssrc: int, arrival: float) -> bool:
        """A retired SSRC, while the current one is alive."""
        return ssrc in self.retired and arrival - self.hot.last_seen < self.ssrc_timeout

    def change(self, new: int) -> None:
        """The current SSRC is retired in favour of `new`."""
        if len(self.retired) >= MAX_SSRCS:
            self.retired.clear()  # a flood of SSRCs: forget the old ones rather than grow
        self.retired.add(self.hot.ssrc)
        self.retired.discard(new)

    def note(self, ssrc: int) -> None:
        """`ssrc` starts a run: list it in the stats (the first MAX_SSRCS of them)."""
        if ssrc not in self.seen:
            if len(self.seen) < MAX_SSRCS:
                self.seen.add(ssrc)
                self.stats.ssrcs.append(ssrc)
            else:
                self.stats.ssrcs_not_listed += 1
