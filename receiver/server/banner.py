"""The start-up banner: once the server listens, one block with what a user pastes (the tap URIs,
the RTP address, the page with its token) and where the recordings go. Logged once per start (by
the parent under `--workers`), as one record: in JSON logs its fields are the URIs."""

from __future__ import annotations

import logging
from pathlib import Path

from receiver.config import Config
from receiver.http.public_urls import WILDCARD_HOSTS, PublicUrls

log = logging.getLogger("receiver")


def banner_lines(urls: PublicUrls, recordings: Path, config: Config) -> list[str]:
    rows = [
        ("WebSocket tap", urls.tap_uri()),
        ("", "(device.params.uri, with your id for {tap_id}; Media Streams and forks too)"),
        ("RTP tap", urls.rtp_uri),
        ("recordings page", urls.page_url),
        ("recordings in", str(recordings.resolve())),
        ("check it", "tap-receiver send '<WebSocket tap>'  (RTP: send <RTP tap> --api <page>)"),
    ]
    pool = config.settings["rtp_port_range"]
    if pool:
        rows.insert(3, ("RTP per tap", f"ports {pool}, handed out by POST /api/taps"))
    width = max(len(label) for label, _ in rows) + 1
    lines = ["tap-receiver is ready. Paste these into your taps:"]
    lines += [f"    {label + ':' if label else '':<{width}}  {value}" for label, value in rows]
    if not urls.configured:
        bound = config.server.host.strip("[]")
        host = "this machine's address" if bound in WILDCARD_HOSTS else "the bind address"
        if urls.secure:
            note = f"the host is {host}: set public_url if callers know it by another name"
        else:
            note = (
                f"the host is {host}; SignalWire needs a public wss:// address: a TLS proxy in "
                "front and public_url, or tls_cert/tls_key"
            )
        lines.append(f"    ({note})")
    return lines


def log_banner(
    config: Config, token: str | None, http_port: int | None = None, rtp_port: int | None = None
) -> None:
    """Log the banner; the ports as bound (default: as configured)."""
    http_port = config.server.http_port if http_port is None else http_port
    rtp_port = config.server.rtp_port if rtp_port is None else rtp_port
    urls = PublicUrls.from_settings(config.server, token, http_port, rtp_port)
    lines = banner_lines(urls, config.storage.recordings, config)
    recordings = str(config.storage.recordings.resolve())
    fields = {**urls.describe(), "event": "ready", "recordings": recordings}
    # the one log line that shows the token, on purpose (every other line is redacted)
    log.info("%s", "\n".join(lines), extra={"fields": fields, "reveals_token": True})
