"""The aiohttp application: routes for health and the tap endpoint, JSON errors everywhere."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web

from receiver import __version__
from receiver.ws_tap import WsTapEndpoint, json_error

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


def build_app(
    ws_endpoint: WsTapEndpoint,
    health: Callable[[], dict[str, Any]],
    *providers: RouteProvider,
) -> web.Application:
    app = web.Application(middlewares=[json_errors])
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
