"""The aiohttp application: `/healthz`, the routes of every part that serves HTTP, their OpenAPI
description, JSON errors everywhere, and the `http_allow` list in front of all but `/healthz`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

from aiohttp import web

from receiver import __version__
from receiver.http.errors import Handler, json_error, json_errors
from receiver.http.openapi import OpenApi
from receiver.taps.admission import AddressFilter


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

    app.router.add_get("/healthz", healthz)
    for provider in providers:  # the tap endpoint, the recordings API and page, control, metrics
        provider.add_routes(app)
    OpenApi().add_routes(app)  # the description of all of it
    return app
