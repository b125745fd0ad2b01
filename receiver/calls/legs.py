"""Which call a finished tap belongs to, and where each leg begins on the call's timeline.

A tap is a leg of a call when its URI said so (`/call/<call-id>/<leg>`: the sidecar's `call`) or a
SignalWire status callback named its `call_id` with a tap `direction` of `speak` or `listen` (the
sidecar's `signalwire`). When both say something and disagree, it is no leg (a conflict).

Alignment: each leg begins where its first audio arrived (for RTP, its first packet's kernel
receive time), counted in the call's sample clock from the earliest leg; from there its own WAV
(its own sample clock, with the silence its timeline placed for gaps) follows frame by frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LEGS = ("speak", "listen")  # channel 1, channel 2


@dataclass(frozen=True, slots=True)
class Leg:
    call_id: str
    leg: str  # "speak" or "listen"
    how: str  # "uri" or "status_callback"


def leg_of(sidecar: dict[str, Any]) -> Leg | str | None:
    """The call and leg a finished tap's sidecar names; None when none; a string (why) when
    what it names cannot be a leg."""
    uri = sidecar.get("call")
    signalwire = sidecar.get("signalwire")
    from_uri = from_callback = None
    if isinstance(uri, dict) and uri.get("call_id"):
        from_uri = Leg(str(uri["call_id"]), str(uri.get("leg")), "uri")
    if isinstance(signalwire, dict) and signalwire.get("call_id"):
        direction = str(signalwire.get("direction") or "").lower()
        if direction in LEGS:
            from_callback = Leg(str(signalwire["call_id"]), direction, "status_callback")
        elif from_uri is None:
            return None  # a tap of direction "both" (one mixed stream): no leg
    if from_uri and from_callback and (from_uri.call_id, from_uri.leg) != (
        from_callback.call_id, from_callback.leg,
    ):  # fmt: skip
        return "conflicting_call_ids"
    return from_uri or from_callback


def offsets(first_arrivals: dict[str, float], rate: int) -> dict[str, int]:
    """Frames from the call's start to each leg's first audio (the earliest leg at 0)."""
    start = min(first_arrivals.values())
    return {leg: round((t - start) * rate) for leg, t in first_arrivals.items()}
