"""An attacker's story (issue 16): hostile requests, files and directories against the real server
and the real command line. Each answer must be a clear status, close code or message; nothing
may cost the server its life, a traceback in its log, or another tap its recording."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

from tests.conftest import TOKEN, ServerProcess

DEADLINE = 10.0  # seconds: bounds a hang, never a speed


def raw_http(server: ServerProcess, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `request` byte for byte (no client library to clean it up); the status, the headers
    (lower-case names) and the body of the answer."""
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=DEADLINE) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def log_lines(server: ServerProcess) -> list[str]:
    return server.log().splitlines()


def wait_until(check: Any, what: str, timeout: float = DEADLINE) -> Any:
    """Poll `check()` until it returns something truthy (bounded by `timeout`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# -- 4: non-UTF-8 bytes in `Authorization: Bearer` ---------------------------------------------


def test_non_utf8_bearer_token_is_a_plain_401_everywhere(make_server: Any) -> None:
    server = make_server("--token", TOKEN)
    for target in (b"/tap/utf8-probe", b"/t/wrong/tap/utf8-probe", b"/api/taps", b"/metrics"):
        before = len(log_lines(server))
        status, headers, body = raw_http(
            server,
            b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer \xff\xfe" + TOKEN.encode() + b"\xff\r\n"
            b"Connection: close\r\n\r\n",
        )
        assert status == 401, (target, status, body)
        assert headers["content-type"].startswith("application/json")
        assert json.loads(body)["status"] == 401
        assert len(log_lines(server)) - before <= 1, log_lines(server)[before:]
    assert server.health() is not None
    assert "Traceback" not in server.log()


# -- 8: malformed control bodies ---------------------------------------------------------------


def post_bytes(server: ServerProcess, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
    status, headers, answer = raw_http(
        server,
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n".encode()
        + body,
    )
    assert headers["content-type"].startswith("application/json"), (path, status, answer)
    return status, json.loads(answer)


def ws_status_event(uri: str) -> bytes:
    device = {"type": "ws", "params": {"uri": uri}}
    params = {"control_id": "ctl-uri", "state": "tapping", "device": device}
    return json.dumps({"event_type": "calling.call.tap", "params": params}).encode()


def test_malformed_control_bodies_get_400_json(make_server: Any) -> None:
    server = make_server("--token", TOKEN)
    hostile = [
        b"[" * 5000 + b"]" * 5000,
        b'{"a":' * 5000 + b"1" + b"}" * 5000,
        b"[" * 100_000,
        b'{"tap_id": "\xff\xfe"}',
        b"",
        b"null",
    ]
    for path in ("/api/taps", "/signalwire/tap-status", f"/t/{TOKEN}/signalwire/tap-status"):
        for body in hostile:
            status, answer = post_bytes(server, path, body)
            assert status == 400 and answer["status"] == 400, (path, body[:20], answer)
    for uri in ("ws://[::1", "wss://[fe80::1/t/x/tap/a", "ws://a\uff03b/tap/x"):
        status, answer = post_bytes(server, "/signalwire/tap-status", ws_status_event(uri))
        assert status == 400 and "uri" in answer["error"], (uri, answer)
    # a URI that parses still works, and so does the server
    status, answer = post_bytes(server, "/signalwire/tap-status", ws_status_event("ws://h/tap/a"))
    assert status == 200 and answer["result"].startswith("linked")
    assert server.health() is not None
    assert "Traceback" not in server.log()
