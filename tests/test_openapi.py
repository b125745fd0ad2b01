"""The OpenAPI document against the real routes: every route of the server's application is
described, every described operation reaches a real route (resolved the way aiohttp resolves
it), the document is valid OpenAPI 3.1, and the real server serves it without a token and
answers each described operation with one of the statuses the document lists."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
from pathlib import Path
from typing import Any

import pytest

from receiver import config
from receiver.http.openapi import document
from receiver.server.lifecycle import Server
from tests.helpers import TOKEN, ServerProcess, require_module

METHODS = ("get", "post", "put", "patch", "delete")
#: Values for the path parameters of the described paths.
EXAMPLES = {
    "token": TOKEN,
    "name": "no-such-call",
    "tap_id": "no-such-call",
    "file": "app.js",
    "call_id": "no-such-call",
    "leg": "speak",
}


def concrete(path: str) -> str:
    return re.sub(r"\{(\w+)\}", lambda m: EXAMPLES[m.group(1)], path)


def operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, operation)
        for path, item in doc["paths"].items()
        for method, operation in item.items()
        if method in METHODS
    ]


def app_routes(tmp_path: Path) -> list[tuple[str, Any]]:
    """(method, resource) of every route of the real application, in resolution order, from a
    real Server started in this process on free loopback ports."""
    cfg = config.from_argv(
        ["--host", "127.0.0.1", "--http-port", "0", "--rtp-port", "0", "--recordings",
         str(tmp_path / "recordings"), "--min-free-space", "1M", "--token", TOKEN], {},
    )  # fmt: skip
    (tmp_path / "recordings").mkdir()

    async def collect() -> list[tuple[str, Any]]:
        server = Server(cfg, TOKEN)
        await server.startup()
        try:
            assert server._runner is not None
            router = server._runner.app.router
            return [(r.method, r.resource) for r in router.routes() if r.method != "HEAD"]
        finally:
            await server.shutdown()

    return asyncio.run(collect())


def resolve(routes: list[tuple[str, Any]], method: str, path: str) -> Any:
    """The resource that handles `method path`, as aiohttp's router picks it: the first whose
    path matches and that has a route for the method (one without goes on to the next)."""
    for route_method, resource in routes:
        info = resource.get_info()
        matches = info.get("path") == path or (
            "pattern" in info and info["pattern"].fullmatch(path) is not None
        )
        if matches and route_method == method:
            return resource
    return None


def test_every_route_is_described_and_every_description_is_a_route(tmp_path: Path) -> None:
    routes = app_routes(tmp_path)
    described: set[tuple[str, int]] = set()
    for method, path, _ in operations(document()):
        resource = resolve(routes, method, concrete(path))
        assert resource is not None, f"{method} {path}: no such route"
        described.add((method, id(resource)))
    undescribed = [f"{m} {r.canonical}" for m, r in routes if (m, id(r)) not in described]
    assert undescribed == [], undescribed


def test_document_is_valid_openapi() -> None:
    validator = require_module("openapi_spec_validator")
    doc = document()
    validator.validate(doc)
    ids = [operation["operationId"] for _, _, operation in operations(doc)]
    assert len(ids) == len(set(ids))
    for method, path, operation in operations(doc):
        declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
        assert declared == set(re.findall(r"\{(\w+)\}", path)), (method, path)


def request(server: ServerProcess, method: str, path: str, token: bool) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    headers = {"Authorization": f"Bearer {TOKEN}"} if token else {}
    body = None
    if method == "POST":
        body, headers["Content-Type"] = b"{}", "application/json"
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_server_serves_the_document_and_answers_as_described(server: ServerProcess) -> None:
    status, body = request(server, "GET", "/api/openapi.json", token=False)
    assert status == 200
    served = json.loads(body)
    assert served == json.loads(json.dumps(document()))
    status, body = request(server, "GET", f"/t/{TOKEN}/api/openapi.json", token=False)
    assert status == 200 and json.loads(body) == served
    for method, path, operation in operations(served):
        status, body = request(server, method, concrete(path), token=True)
        assert str(status) in operation["responses"], (method, path, status, body[:200])


@pytest.mark.parametrize("path", ["/api/taps", "/api/connect", "/metrics"])
def test_described_security_is_enforced(server: ServerProcess, path: str) -> None:
    operation = document()["paths"][path]["get"]
    assert operation["security"]  # the document says it needs the token
    assert request(server, "GET", path, token=False)[0] == 401
