"""Tap ids become file names, so only a safe alphabet gets through."""

from __future__ import annotations

import re

TAP_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
TAP_ID_RULE = "tap id must match [A-Za-z0-9][A-Za-z0-9._-]{0,127}"


def is_valid_tap_id(tap_id: str) -> bool:
    """True for ids that are safe as a file name in the recordings directory.

    The pattern admits no separator and cannot start with a dot, so '..', hidden files and
    paths are impossible; `fullmatch` rejects a trailing newline that `$` would let through.
    """
    return TAP_ID_RE.fullmatch(tap_id) is not None


def file_safe_id(text: str) -> str:
    """Turn arbitrary text (e.g. 'rtp-::1-5004') into a valid tap id."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip("._-")[:128]
    return cleaned or "tap"
