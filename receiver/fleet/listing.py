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


# What a listed tap must have for the listing's filters and sorting (a peer may answer anything).
TAP_DEFAULTS = {"state": "recording", "transport": "unknown", "started_at": None}


def clean(answers: Answers) -> Answers:
    """The peers' answers to `taps` as the listing can use them: `taps` a list of entries with
    a string `name` (others dropped) and the fields it filters on, `truncated` a count. A peer
    that answers something else loses its entries, never the listing."""
    cleaned = []
    for answer in answers.answers:
        if not isinstance(answer, dict):
            continue
        taps = answer.get("taps")
        kept = []
        for tap in taps[:MAX_TAPS_PER_ANSWER] if isinstance(taps, list) else []:
            if isinstance(tap, dict) and isinstance(tap.get("name"), str):
                kept.append({**TAP_DEFAULTS, **tap})
                for key in ("state", "transport"):
                    kept[-1][key] = str(kept[-1][key])
        truncated = answer.get("truncated")
        cleaned.append({**answer, "taps": kept, "instance": str(answer.get("instance")),
                        "truncated": truncated if isinstance(truncated, int) else 0})  # fmt: skip
    return Answers(cleaned, answers.missing, answers.reachable)


def merge(local: list[dict[str, Any]], answers: Answers, storage: str) -> list[dict[str, Any]]:
    """`local` (newest first) with the peers' live taps (`clean`ed), newest first."""
    by_name = {summary["name"]: summary for summary in local}
    merged = list(local)
    for answer in answers.answers:
        same_directory = answer.get("storage") == storage
        for tap in answer["taps"]:
            tap["instance"] = answer["instance"]
            mine = by_name.get(tap["name"]) if same_directory else None
            if mine is not None:
                mine.update({key: tap.get(key) for key in LIVE_FIELDS})
            else:
                merged.append(tap)
    merged.sort(key=lambda s: (str(s.get("started_at") or ""), str(s.get("name"))), reverse=True)
    return merged
