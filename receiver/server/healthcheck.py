"""`python -m receiver.server.healthcheck`: exit 0 when this machine's server answers /healthz
and can create files in its recordings directory.

Reads the same settings as the server (flags, RECEIVER_* variables, the RECEIVER_CONFIG file), so
the container's HEALTHCHECK follows whatever port and TLS the server was given. The certificate
names the public host, not loopback, so it is not verified here; proxy variables are ignored.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import urllib.request
from collections.abc import Sequence

from receiver import config


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m receiver.server.healthcheck")
    config.add_arguments(parser)
    try:
        cfg, _ = config.load(parser.parse_args(argv), os.environ)
    except config.ConfigError as exc:
        print(f"healthcheck: {exc}", file=sys.stderr)
        return 1
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(
        cfg.server.host, cfg.server.host
    )
    host = f"[{host}]" if ":" in host else host
    scheme = "https" if cfg.server.tls_cert else "http"
    url = f"{scheme}://{host}:{cfg.server.http_port}/healthz"
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}),
        urllib.request.HTTPSHandler(context=ssl._create_unverified_context()),
    )
    try:
        with opener.open(url, timeout=4) as response:
            if response.status != 200:
                return 1
            recordings = json.loads(response.read()).get("recordings") or {}
    except Exception as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1
    if recordings.get("writable") is False:  # it answers, but cannot record a tap
        print(f"healthcheck: the recordings directory is not writable: {recordings.get('problem')}",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
