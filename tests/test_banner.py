"""The start-up banner says what to paste, and what it says works: for a plain server (`ws://`),
one serving TLS itself (`wss://`), and one behind a TLS-terminating reverse proxy (`public_url`).
Each printed tap URI records a tap through it, the printed page URL opens the page, and
`GET /api/connect` (what the page shows) agrees with the banner."""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from receiver import config
from receiver.http.public_urls import PublicUrls, machine_address
from tests.helpers import (
    TOKEN,
    Certificates,
    ServerProcess,
    banner,
    check_recording,
    make_certificates,
    new_id,
    noise,
)
from tests.test_tls import TlsServerProcess


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


def get(url: str, context: ssl.SSLContext | None = None) -> tuple[int, str, bytes]:
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    with opener.open(url, timeout=30) as response:
        return response.status, response.headers["Content-Type"], response.read()


async def tap_through(uri: str, frames: list[bytes], context: ssl.SSLContext | None) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(uri, ssl=context if context is not None else True) as ws,
    ):
        for frame in frames:
            await ws.send_bytes(frame)


def check_printed_uris(
    server: ServerProcess, rows: dict[str, str], context: ssl.SSLContext | None = None
) -> None:
    """The printed tap URI records a tap, bit-exact; the printed page URL is the page; and the
    API the page asks agrees with the banner."""
    tap_id = new_id("banner")
    sent = noise(160 * 25, seed=7)
    uri = rows["WebSocket tap"].replace("{tap_id}", tap_id)
    asyncio.run(tap_through(uri, [sent[i : i + 160] for i in range(0, len(sent), 160)], context))
    check_recording(server, tap_id, "PCMU", sent)
    status, kind, body = get(rows["recordings page"], context)
    assert (status, kind.split(";")[0]) == (200, "text/html") and b"tap-receiver" in body
    _, _, answer = get(rows["recordings page"] + "api/connect", context)
    connect = json.loads(answer)
    assert connect["tap_uri"] == rows["WebSocket tap"]
    assert connect["rtp_uri"] == rows["RTP tap"]
    assert connect["page_url"] == rows["recordings page"]
    assert rows["recordings in"] == str(server.recordings.resolve())


def test_plain_server_prints_ws_uris_that_work(make_server: Any) -> None:
    server = make_server("--token", TOKEN)
    rows = banner(server)
    port, rtp = server.http_port, server.rtp_port
    assert rows["WebSocket tap"] == f"ws://127.0.0.1:{port}/t/{TOKEN}/tap/{{tap_id}}"
    assert rows["RTP tap"] == f"rtp://127.0.0.1:{rtp}"
    assert rows["recordings page"] == f"http://127.0.0.1:{port}/t/{TOKEN}/"
    assert not any("wss://" in value for value in rows.values())
    assert "SignalWire needs a public wss:// address" in server.log()
    check_printed_uris(server, rows)


def test_banner_without_auth_and_under_workers_is_printed_once(make_server: Any) -> None:
    server = make_server("--no-auth", "--workers", "2")
    rows = banner(server)  # exactly one banner, from the parent
    assert rows["WebSocket tap"] == f"ws://127.0.0.1:{server.http_port}/tap/{{tap_id}}"
    assert rows["recordings page"] == f"http://127.0.0.1:{server.http_port}/"


def test_tls_server_prints_wss_uris_that_work(tmp_path: Path, certs: Certificates) -> None:
    server = TlsServerProcess(tmp_path / "recordings", certs, "--token", TOKEN).start()
    try:
        rows = banner(server)
        port = server.http_port
        assert rows["WebSocket tap"] == f"wss://127.0.0.1:{port}/t/{TOKEN}/tap/{{tap_id}}"
        assert rows["recordings page"] == f"https://127.0.0.1:{port}/t/{TOKEN}/"
        assert "SignalWire needs" not in server.log()
        check_printed_uris(server, rows, server.context)
    finally:
        assert server.stop() == 0, server.log()


class TlsProxy:
    """A TLS-terminating reverse proxy in front of the receiver, as Caddy or nginx would be: TLS
    from the client, plain TCP to the receiver, bytes passed both ways (so WebSocket upgrades
    pass unchanged). Runs its own event loop in a thread."""

    def __init__(self, certs: Certificates) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(str(certs.cert), str(certs.key))
        self.target = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.port = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TlsProxy:
        self.thread.start()
        assert self.ready.wait(30)
        return self

    def __exit__(self, *_: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(
            asyncio.start_server(self._connection, "127.0.0.1", 0, ssl=self.context)
        )
        self.port = server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()
        server.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


def test_proxied_server_prints_the_public_url(make_server: Any, certs: Certificates) -> None:
    with TlsProxy(certs) as proxy:
        public = f"https://localhost:{proxy.port}"
        server = make_server("--token", TOKEN, "--public-url", public + "/", start=False)
        proxy.target = server.http_port
        server.start()
        rows = banner(server)
        assert rows["WebSocket tap"] == f"wss://localhost:{proxy.port}/t/{TOKEN}/tap/{{tap_id}}"
        assert rows["recordings page"] == f"https://localhost:{proxy.port}/t/{TOKEN}/"
        # RTP does not pass the proxy: the public host, and the receiver's own RTP port
        assert rows["RTP tap"] == f"rtp://localhost:{server.rtp_port}"
        assert "SignalWire needs" not in server.log()
        check_printed_uris(server, rows, certs.client_context())
        # the registration API's device objects use the public host for RTP too
        request = urllib.request.Request(
            f"{public}/t/{TOKEN}/api/taps",
            data=json.dumps({"tap_id": new_id("reg"), "source": "127.0.0.1:40000"}).encode(),
            method="POST",
        )
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}),
            urllib.request.HTTPSHandler(context=certs.client_context()),
        )
        with opener.open(request, timeout=30) as response:
            answer = json.load(response)
        assert answer["device"]["params"]["addr"] == "localhost"
        assert answer["device"]["params"]["port"] == server.rtp_port


def settings(**values: Any) -> config.ServerSettings:
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in values.items()]
    return config.from_argv(argv, {}).server


@pytest.mark.parametrize(
    ("values", "tap", "page", "rtp"),
    [
        ({"host": "0.0.0.0"}, "ws://{me}:8080/t/T0123456/tap/{{tap_id}}",
         "http://{me}:8080/t/T0123456/", "rtp://{me}:5004"),
        ({"host": "::1", "http_port": 80}, "ws://[::1]/t/T0123456/tap/{{tap_id}}",
         "http://[::1]/t/T0123456/", "rtp://[::1]:5004"),
        ({"public_url": "wss://tap.example.com/rec/", "public_address": "203.0.113.10"},
         "wss://tap.example.com/rec/t/T0123456/tap/{{tap_id}}",
         "https://tap.example.com/rec/t/T0123456/", "rtp://203.0.113.10:5004"),
        ({"public_url": "http://10.0.0.5:9000"}, "ws://10.0.0.5:9000/t/T0123456/tap/{{tap_id}}",
         "http://10.0.0.5:9000/t/T0123456/", "rtp://10.0.0.5:5004"),
    ],
)  # fmt: skip
def test_public_urls_from_settings(values: dict[str, Any], tap: str, page: str, rtp: str) -> None:
    urls = PublicUrls.from_settings(settings(**values), "T0123456", values.get("http_port", 8080),
                                    5004)  # fmt: skip
    me = machine_address()
    assert urls.tap_uri() == tap.format(me=me)
    assert urls.page_url == page.format(me=me)
    assert urls.rtp_uri == rtp.format(me=me)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("ftp://tap.example.com", "must start with https://"),
        ("https://", "must name a host"),
        ("https://tap.example.com/?token=x", "must not have a query string"),
        ("https://user:pw@tap.example.com", "must not carry a user name"),
        ("https://tap.example.com:99999", "bad port"),
    ],
)
def test_bad_public_url_names_the_problem(value: str, problem: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.from_argv(["--public-url", value], {})
    assert f"public_url (from --public-url): {value!r}" in str(info.value)
    assert problem in str(info.value)
