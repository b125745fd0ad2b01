"""Secrets out of everything stored, served, sent or logged.

The taps' token travels in tap URIs (`wss://host/t/<token>/tap/<id>`, `?token=<token>`) and in
`Authorization` headers, and SignalWire echoes the tap URI back in its status callbacks, so a
sidecar, an API answer, a webhook or a log line could carry it (a sidecar is mode 0644, the
token file 0600). Every string on those paths goes through `redact`: the value after `/t/`,
`token=` and `Authorization`/`Bearer` becomes `<redacted>`, and so does any mapping value whose
key names a token or an authorization. Pure functions, no imports from the rest of the package.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "<redacted>"

_HINT = re.compile(r"/t/|token|authorization|bearer", re.IGNORECASE)  # cheap test first
_AUTHORIZATION = r"(authorization[\"']?\s*[:=]\s*[\"']?)(?:(?:bearer|basic)\s+)?[^\s\"',;}]+"
_RULES = (
    (re.compile(r"(/t/)[^/?#\s\"'<>]+"), r"\1" + REDACTED),
    (re.compile(r"(token=)[^&#\s\"'<>]+", re.IGNORECASE), r"\1" + REDACTED),
    (re.compile(_AUTHORIZATION, re.IGNORECASE), r"\1" + REDACTED),
    (re.compile(r"(bearer\s+)[^\s\"',;}]+", re.IGNORECASE), r"\1" + REDACTED),
)
_SECRET_KEY = re.compile(r"token|authorization", re.IGNORECASE)


def redact_text(text: str) -> str:
    """`text` with every token value it carries replaced by `<redacted>`."""
    if not _HINT.search(text):
        return text
    for pattern, replacement in _RULES:
        text = pattern.sub(replacement, text)
    return text


def redact(value: Any) -> Any:
    """A copy of a JSON-like value (dicts, lists, strings, numbers) with its secrets redacted.
    Iterative, so hostile nesting cannot exhaust the stack."""
    stack: list[tuple[dict[Any, Any] | list[Any], dict[Any, Any] | list[Any]]] = []

    def copy_of(item: Any) -> Any:
        if isinstance(item, str):
            return redact_text(item)
        if isinstance(item, dict):
            stack.append((item, {}))
        elif isinstance(item, list):
            stack.append((item, [None] * len(item)))
        else:
            return item
        return stack[-1][1]

    result = copy_of(value)
    while stack:
        original, new = stack.pop()
        if isinstance(original, dict):
            assert isinstance(new, dict)
            for key, child in original.items():
                value = REDACTED if _is_secret(key, child) else copy_of(child)
                new[redact_text(key) if isinstance(key, str) else key] = value
        else:
            assert isinstance(new, list)
            for index, child in enumerate(original):
                new[index] = copy_of(child)
    return result


def _is_secret(key: Any, value: Any) -> bool:
    """A string under a key such as `token`, `authToken` or `Authorization` (a mapping or list
    under it is searched instead; numbers, flags and empty strings say nothing: a counter
    named `tokens` stays)."""
    return (
        isinstance(key, str)
        and isinstance(value, str)
        and value != ""
        and bool(_SECRET_KEY.search(key))
    )
