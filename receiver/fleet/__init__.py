"""One control plane for several receivers (machines, and the workers of `--workers N`), on NATS.

Off unless `nats_url` is set: then the server builds a `Fleet` (nats_fleet.py) and calls it in
three places, and nowhere else:

- `GET /api/taps` asks every other instance for its live taps and merges them into the listing
  (listing.py), each with the `instance` that holds it;
- a SignalWire status callback or a registration by source that no tap here matches is asked of
  the others: the one that holds the tap applies it (rename, `finished`) and says so;
- `/healthz` and `/metrics` show whether NATS is reachable, and which peers are alive.

Everything else (recording, files, the RTP port pool: its ports are bound without SO_REUSEPORT,
so two workers can never hold one) stays local, and keeps working while NATS is down.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

#: What an instance answers a question from another one with (see Server.answer_fleet).
Responder = Callable[[str, dict[str, Any]], dict[str, Any]]


@dataclass
class Answers:
    """What the other instances answered a question."""

    answers: list[dict[str, Any]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # live peers that did not answer in time
    reachable: bool = True  # False: NATS is down, nobody was asked


class Fleet(Protocol):
    """What the server asks of the control plane."""

    instance: str  # this process's name in the fleet
    storage: str  # which recordings directory it writes to (host and path)

    async def start(self) -> None: ...

    async def stop(self, timeout: float) -> None: ...

    async def ask(self, kind: str, body: dict[str, Any]) -> Answers:
        """Every other live instance's answer to `kind` ("taps", "status", "source")."""
        ...

    def health(self) -> dict[str, Any]: ...

    def metrics(self) -> dict[str, Any]: ...


def instance_id(name: str, http_port: int, worker: int | None) -> str:
    """`instance_name`, else the host name and HTTP port; `-w<N>` for worker N."""
    base = name or f"{_hostname()}-{http_port}"
    return base if worker is None else f"{base}-w{worker}"


def storage_id(recordings: Path) -> str:
    """Instances with the same storage id write into the same directory (workers of one
    receiver): their live taps are the same entries of the listing."""
    return f"{socket.gethostname()}:{os.path.realpath(recordings)}"


def _hostname() -> str:
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", socket.gethostname().split(".")[0]).strip("-")
    return name[:48] or "receiver"
