"""Tap ids become file names, so only a safe alphabet gets through."""

from __future__ import annotations

import re

TAP_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
TAP_ID_RULE = "tap id must match [A-Za-z0-9][A-Za-z0-9._-]{0,127}"
# The file base names the server writes: a tap id, `.N` when the id was taken (reserve_name),
# and `.inbound`/`.outbound` for per-track WAVs (themselves `.N` when taken). The API and the
# command line take names by this rule, so every file written can be listed, fetched and
# deleted, also when a 128-character id was used twice.
_SUFFIX = r"(?:\.[0-9]{1,4})?"
NAME_RE = re.compile(TAP_ID_RE.pattern + _SUFFIX + r"(?:\.(?:inbound|outbound)" + _SUFFIX + ")?")
NAME_RULE = TAP_ID_RULE + " (a file name may add .N, .inbound or .outbound)"


def is_valid_tap_id(tap_id: str) -> bool:
    """True for ids that are safe as a file name in the recordings directory.

    The pattern admits no separator and cannot start with a dot, so '..', hidden files and
    paths are impossible; `fullmatch` rejects a trailing newline that `$` would let through.
    """
    return TAP_ID_RE.fullmatch(tap_id) is not None


def is_valid_name(name: str) -> bool:
    """True for a recording's file base name (`call-42`, `call-42.1`, `call-42.1.inbound`):
    the same safe alphabet as tap ids, room for the suffixes."""
    return NAME_RE.fullmatch(name) is not None


def file_safe_id(text: str) -> str:
    """Turn arbitrary text (e.g. 'rtp-::1-5004') into a valid tap id."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip("._-")[:128]
    return cleaned or "tap"
