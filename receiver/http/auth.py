"""Who may start a tap: one shared token, checked in constant time, secure by default."""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import stat
from pathlib import Path

from aiohttp import web

from receiver.http.errors import Handler, json_error

log = logging.getLogger("receiver.auth")
TOKEN_FILE = ".receiver-token"


class Auth:
    """`token` None means auth is off (--no-auth)."""

    def __init__(self, token: str | None) -> None:
        self._token = token.encode() if token is not None else None

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def allows(self, request: web.Request) -> bool:
        """A tap URI cannot set headers and query strings may not survive, so the token is
        accepted from the path (/t/{token}/...), from ?token= or from `Authorization: Bearer`."""
        if self._token is None:
            return True
        offered = [request.match_info.get("token"), request.query.get("token")]
        header = request.headers.get("Authorization", "")
        if header[:7].lower() == "bearer ":
            offered.append(header[7:].strip())
        ok = False
        for candidate in offered:
            if candidate is not None:
                # compare every candidate, so timing tells nothing about which one matched;
                # headers arrive decoded with surrogateescape, so any bytes encode back
                encoded = candidate.encode("utf-8", "surrogateescape")
                ok |= hmac.compare_digest(encoded, self._token)
        return ok

    def refusal(self, request: web.Request) -> web.Response | None:
        """The 401 answer when the request lacks the token, else None."""
        return None if self.allows(request) else json_error(401, "missing or wrong token")

    def required(self, handler: Handler) -> Handler:
        """`handler`, answering 401 JSON to requests without the token."""

        async def checked(request: web.Request) -> web.StreamResponse:
            refused = self.refusal(request)
            return refused if refused is not None else await handler(request)

        return checked


def load_or_create_token(recordings: Path) -> tuple[str, bool]:
    """The token kept in `<recordings>/.receiver-token` (mode 0600); made on first start.
    Returns (token, created)."""
    path = recordings / TOKEN_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning("%s was readable by others (mode %o); setting it to 0600", path, mode)
            path.chmod(0o600)
        token = path.read_text(encoding="utf-8").strip()
        if token:
            return token, False
        log.warning("%s was empty; writing a new token", path)
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    token = secrets.token_urlsafe(24)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(token + "\n")
    return token, True
