"""The addresses a user pastes: the WebSocket tap URI, the Media Streams URI, the RTP address and
the recordings page URL.

From `public_url` when it is set (where callers reach this server, e.g. behind a TLS proxy);
otherwise from what this server knows of itself: `wss://` only when it serves TLS, its bind
address (or, when it binds every interface, this machine's address on its default route) and
its ports. The RTP address is `public_address`, else the host of `public_url`, else that same
address: RTP does not pass through an HTTP proxy.

`GET /api/connect` (with the token) answers the same for the page, built from the request when
`public_url` is not set, so a page opened through a proxy shows the proxy's address.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from receiver.config import ServerSettings
from receiver.http.auth import Auth

WILDCARD_HOSTS = ("", "0.0.0.0", "::")
DEFAULT_PORTS = {"http": 80, "https": 443}


def machine_address() -> str:
    """This machine's address on its default route (nothing is sent), else 127.0.0.1."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect(("192.0.2.1", 9))  # TEST-NET-1: only selects the route's source address
            return str(sock.getsockname()[0])
    except OSError:
        return "127.0.0.1"


def url_host(host: str) -> str:
    """A host as it goes into a URL: IPv6 addresses in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class PublicUrls:
    base: str  # http(s)://host[:port][/prefix], no trailing slash
    rtp_host: str
    rtp_port: int
    token: str | None
    configured: bool  # `base` is the public_url setting, not a guess
    public_address: str = ""

    @classmethod
    def from_settings(
        cls, server: ServerSettings, token: str | None, http_port: int, rtp_port: int
    ) -> PublicUrls:
        if server.public_url:
            host = urlsplit(server.public_url).hostname or ""
            return cls(server.public_url, server.public_address or host, rtp_port, token, True,
                       server.public_address)  # fmt: skip
        bound = server.host.strip("[]")
        host = machine_address() if bound in WILDCARD_HOSTS else bound
        scheme = "https" if server.tls_cert else "http"
        port = "" if DEFAULT_PORTS[scheme] == http_port else f":{http_port}"
        base = f"{scheme}://{url_host(host)}{port}"
        rtp_host = server.public_address or host
        return cls(base, rtp_host, rtp_port, token, False, server.public_address)

    def for_request(self, request: web.Request) -> PublicUrls:
        """As a client of this request reaches the server (unless public_url says otherwise)."""
        if self.configured:
            return self
        secure = request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"
        host = request.host or urlsplit(self.base).netloc
        rtp_host = self.public_address or request.url.host or self.rtp_host
        return replace(self, base=f"{'https' if secure else 'http'}://{host}", rtp_host=rtp_host)

    @property
    def secure(self) -> bool:
        return self.base.startswith("https:")

    @property
    def ws_base(self) -> str:
        return ("wss" if self.secure else "ws") + self.base.removeprefix(
            "https" if self.secure else "http"
        )

    @property
    def prefix(self) -> str:
        """The path that carries the token (a tap URI cannot set headers)."""
        return f"/t/{self.token}" if self.token is not None else ""

    def tap_uri(self, tap_id: str = "{tap_id}") -> str:
        return f"{self.ws_base}{self.prefix}/tap/{tap_id}"

    def stream_uri(self, tap_id: str = "{tap_id}") -> str:
        return f"{self.ws_base}{self.prefix}/stream/{tap_id}"

    @property
    def page_url(self) -> str:
        return f"{self.base}{self.prefix}/"

    @property
    def rtp_uri(self) -> str:
        return f"rtp://{url_host(self.rtp_host)}:{self.rtp_port}"

    def describe(self) -> dict[str, Any]:
        return {
            "tap_uri": self.tap_uri(),
            "stream_uri": self.stream_uri(),
            "rtp_uri": self.rtp_uri,
            "page_url": self.page_url,
            "public_url": self.base if self.configured else None,
            "auth": self.token is not None,
        }


class ConnectInfo:
    """`GET /api/connect`: the URIs to paste into a tap, for the page (token required: they carry
    it)."""

    def __init__(self, urls: PublicUrls, auth: Auth) -> None:
        self.urls = urls
        self.auth = auth

    def add_routes(self, app: web.Application) -> None:
        for prefix in ("", "/t/{token}"):
            app.router.add_get(prefix + "/api/connect", self.auth.required(self.connect))

    async def connect(self, request: web.Request) -> web.Response:
        return web.json_response(self.urls.for_request(request).describe())
