"""One RTP stream's timeline: sample n of the output is sample n of the sender's timeline.

Audio is placed by RTP timestamp, never by arrival time. Packets are released in sequence order
through a time-based jitter window; anything the sender's timestamps say is missing (loss, silence
suppression, comfort noise) becomes digital silence of exactly that duration, up to `max_gap`.
SSRC changes (after probation) and sequence restarts continue the same timeline. Pure and
synchronous: no I/O, no clock but the arrival times it is given.

The pieces, each with its settings, state and statistics, and the rules it decides:

* `sequencing.py`: RFC 3550 A.1 sequence tracking, the jitter window, late/duplicate/lost.
* `placement.py`: timestamps to output positions, gaps to silence or discontinuities, the pause
  before a new run.
* `dtmf.py`: RFC 4733 telephone events.
* `ssrc.py`: which SSRC the audio comes from: probation before another takes over, the SSRCs
  seen and retired (stale packets).
* `stats.py`: the counters of the sidecar's `rtp` block, the RFC 3550 A.8 interarrival jitter.
* `hot_state.py`: the fields the in-order case reads and changes, in one record (`push`'s inlined
  case and `fast_lane.FastLane` work on it alone).
* `rtp_timeline.py`: `RtpTimeline`, which composes them.
"""

from receiver.rtp.timeline.hot_state import HotState
from receiver.rtp.timeline.placement import TimelineOutput
from receiver.rtp.timeline.rtp_timeline import RtpTimeline
from receiver.rtp.timeline.sequencing import MAX_DROPOUT, MAX_HELD, MAX_MISORDER
from receiver.rtp.timeline.ssrc import MAX_SSRCS, MIN_SEQUENTIAL
from receiver.rtp.timeline.stats import MAX_EVENTS, TimelineStats, ssrc_hex

__all__ = [
    "MAX_DROPOUT",
    "MAX_EVENTS",
    "MAX_HELD",
    "MAX_MISORDER",
    "MAX_SSRCS",
    "MIN_SEQUENTIAL",
    "HotState",
    "RtpTimeline",
    "TimelineOutput",
    "TimelineStats",
    "ssrc_hex",
]
