"""The fleet's listing: this instance's recordings plus the live taps the others answered with.

A peer that writes into the same directory (another worker of this receiver) has its live taps
among our recordings already, as sidecars that say `recording`: those entries get its live
figures and its name. Taps of other machines are added as entries of their own. Pure: no I/O.
"""

from __future__ import annotations

from typing import Any

from receiver.fleet import Answers

MAX_TAPS_PER_ANSWER = 5000  # live taps one instance lists for the others (and NATS's max_payload)
LIVE_FIELDS = ("state", "duration_seconds", "loss_percent", "instance")


def merge(local: list[dict[str, Any]], answers: Answers, storage: str) -> list[dict[str, Any]]:
    """`local` (newest first) with the peers' live taps, newest first."""
    by_name = {summary["name"]: summary for summary in local}
    merged = list(local)
    for answer in answers.answers:
        same_directory = answer.get("storage") == storage
        taps = answer.get("taps")
        for tap in taps[:MAX_TAPS_PER_ANSWER] if isinstance(taps, list) else []:
            if not isinstance(tap, dict) or not isinstance(tap.get("name"), str):
                continue
            tap["instance"] = answer.get("instance")
            mine = by_name.get(tap["name"]) if same_directory else None
            if mine is not None:
                mine.update({key: tap.get(key) for key in LIVE_FIELDS})
            else:
                merged.append(tap)
    merged.sort(key=lambda s: (str(s.get("started_at") or ""), str(s.get("name"))), reverse=True)
    return merged
