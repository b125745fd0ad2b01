"""TLS served by the receiver itself (--tls-cert/--tls-key): a tap over wss:// recorded bit-exact,
/healthz over https, and one clear line for a missing key or an unusable certificate."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers import (
    ROOT,
    TOKEN,
    Certificates,
    ServerProcess,
    check_recording,
    free_port,
    make_certificates,
    new_id,
    noise,
)


class TlsServerProcess(ServerProcess):
    def __init__(self, recordings: Path, certs: Certificates, *extra: str) -> None:
        tls = ("--tls-cert", str(certs.cert), "--tls-key", str(certs.key))
        super().__init__(recordings, *tls, *extra)
        self.context = certs.client_context()

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.http_port}"

    @property
    def ws_url(self) -> str:
        return f"wss://127.0.0.1:{self.http_port}"

    def health(self, timeout: float = 10.0) -> dict[str, Any] | None:
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=self.context)
        )
        try:
            with opener.open(f"{self.base_url}/healthz", timeout=timeout) as response:
                result: dict[str, Any] = json.load(response)
                return result
        except (OSError, ValueError):
            return None


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_server(
    tmp_path_factory: pytest.TempPathFactory, certs: Certificates
) -> Iterator[TlsServerProcess]:
    recordings = tmp_path_factory.mktemp("tls-server") / "recordings"
    server = TlsServerProcess(recordings, certs, "--token", TOKEN).start()
    yield server
    assert server.stop() == 0, server.log()


async def send_over_wss(url: str, context: ssl.SSLContext, frames: list[bytes]) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, ssl=context) as ws,
    ):
        for frame in frames:
            await ws.send_bytes(frame)


def test_wss_tap_is_bit_exact(tls_server: TlsServerProcess) -> None:
    tap_id = new_id("wss")
    sent = noise(160 * 100, seed=70)
    frames = [sent[i : i + 160] for i in range(0, len(sent), 160)]
    url = f"{tls_server.ws_url}/t/{TOKEN}/tap/{tap_id}"
    asyncio.run(send_over_wss(url, tls_server.context, frames))
    sidecar = check_recording(tls_server, tap_id, "PCMU", sent)
    assert sidecar["state"] == "finished" and sidecar["transport"] == "websocket"


def test_wss_pcma_by_query(tls_server: TlsServerProcess) -> None:
    tap_id = new_id("wss")
    sent = noise(4321, seed=71)
    url = f"{tls_server.ws_url}/tap/{tap_id}?codec=pcma&token={TOKEN}"
    asyncio.run(send_over_wss(url, tls_server.context, [sent[:2000], sent[2000:]]))
    check_recording(tls_server, tap_id, "PCMA", sent)


def test_healthz_over_https_only(tls_server: TlsServerProcess) -> None:
    health = tls_server.health()
    assert health is not None and health["status"] == "ok"
    assert health["http_port"] == tls_server.http_port
    # plain http on the TLS port gets no answer
    assert ServerProcess.health(tls_server) is None
    log = tls_server.log()
    assert f"ready on https://127.0.0.1:{tls_server.http_port}" in log
    assert "TLS terminated by your proxy" not in log


def test_client_without_the_ca_is_refused(tls_server: TlsServerProcess) -> None:
    """It is really the configured certificate: a client trusting only the system CAs fails."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises(urllib.error.URLError) as caught:
        opener.open(f"{tls_server.base_url}/healthz", timeout=5)
    assert isinstance(caught.value.reason, ssl.SSLCertVerificationError)


# -- misconfiguration: exit codes and one clear line ----------------------------------------------


def run_receiver(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RECEIVER_")}
    command = [
        sys.executable, "-m", "receiver",
        "--host", "127.0.0.1",
        "--http-port", str(free_port()),
        "--rtp-port", str(free_port()),
        "--recordings", str(tmp_path / "recordings"),
        "--no-auth",
        *args,
    ]  # fmt: skip
    result = subprocess.run(
        command,
        cwd=ROOT,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
    )
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize("given", ["cert flag", "cert env", "key flag", "key env"])
def test_cert_without_key_is_a_config_error(
    tmp_path: Path, certs: Certificates, given: str
) -> None:
    what, where = given.split()
    path = str(certs.cert if what == "cert" else certs.key)
    if where == "flag":
        code, output = run_receiver(tmp_path, f"--tls-{what}", path)
    else:
        code, output = run_receiver(tmp_path, env={f"RECEIVER_TLS_{what.upper()}": path})
    assert code == 2, output
    assert output.splitlines() == [
        "tap-receiver: configuration error: tls_cert, tls_key: give both (certificate and "
        "private key) or neither"
    ]


@pytest.mark.parametrize("problem", ["garbage cert", "missing cert", "key of another cert"])
def test_unusable_certificate_exits_1_with_one_line(
    tmp_path: Path, certs: Certificates, problem: str
) -> None:
    cert, key = certs.cert, certs.key
    if problem == "garbage cert":
        cert = tmp_path / "garbage.pem"
        cert.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    elif problem == "missing cert":
        cert = tmp_path / "missing.pem"
    else:
        key = make_certificates(tmp_path / "other").key
    code, output = run_receiver(tmp_path, "--tls-cert", str(cert), "--tls-key", str(key))
    assert code == 1, output
    assert "Traceback" not in output
    final = [line for line in output.splitlines() if line.startswith("tap-receiver:")]
    assert len(final) == 1, output
    assert final[0].startswith(
        f"tap-receiver: tls_cert/tls_key: cannot load the certificate {str(cert)!r} with the key "
    )
    # the rest is the log (timestamped lines), no multi-line error
    others = [line for line in output.splitlines() if not line.startswith("tap-receiver:")]
    assert all(line[:4].isdigit() for line in others), output
