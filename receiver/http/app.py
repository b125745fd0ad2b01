"""The aiohttp application: routes for health and the tap endpoint, JSON errors everywhere."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web

from receiver import __version__
from receiver.taps.admission import AddressFilter
from receiver.ws.endpoint import WsTapEndpoint, json_error

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own 404/405 pages are HTML; clients of this server read JSON."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return json_error(exc.status, exc.reason)


class RouteProvider(Protocol):
    def add_routes(self, app: web.Application) -> None: ...


def allow_list(allowed: AddressFilter) -> Any:
    """Refuse clients outside `http_allow` (403); /healthz stays open for health checks."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != "/healthz" and not allowed.allows(request.remote):
            return json_error(403, "this address is not allowed (http_allow)")
        return await handler(request)

    return middleware


def build_app(
    ws_endpoint: WsTapEndpoint,
    health: Callable[[], dict[str, Any]],
    *providers: RouteProvider,
    allowed: AddressFilter | None = None,
) -> web.Application:
    middlewares = [json_errors]
    if allowed is not None and allowed.networks:
        middlewares.insert(0, allow_list(allowed))
    app = web.Application(middlewares=middlewares)
    started = time.monotonic()

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response(
            {
                "status": "ok",
                "version": __version__,
                "uptime_seconds": round(time.monotonic() - started, 3),
                **health(),
            }
        )

    # `{tap_id:.*}` so that bad ids (empty, dots, encoded slashes) reach the handler and get a
    # clear 400 instead of a 404.
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/tap/{tap_id:.*}", ws_endpoint.handle)
    app.router.add_get("/t/{token}/tap/{tap_id:.*}", ws_endpoint.handle)
    app.router.add_get("/stream/{tap_id:.*}", ws_endpoint.handle)
    app.router.add_get("/t/{token}/stream/{tap_id:.*}", ws_endpoint.handle)
    for provider in providers:  # the recordings API and page, the control plane, metrics
        provider.add_routes(app)
    return app
