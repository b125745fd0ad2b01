"""Completion webhooks: when a tap is finalized, POST its sidecar JSON to `webhook_url`.

The body is signed: `X-Tap-Receiver-Signature: sha256=<hex HMAC-SHA256 of the raw body, keyed
with webhook_secret>`. Every delivery carries `X-Tap-Receiver-Delivery` (the same id on every
retry, for idempotency) and `X-Tap-Receiver-Event: tap.finished`. A failed delivery (network
error, timeout or a non-2xx answer) is retried with exponential backoff; at most `concurrency`
deliveries run at once. Nothing here ever waits on the recording path: `submit` only schedules.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import uuid
from typing import Any

import aiohttp
import orjson

log = logging.getLogger("receiver.webhooks")

SIGNATURE_HEADER = "X-Tap-Receiver-Signature"
DELIVERY_HEADER = "X-Tap-Receiver-Delivery"
EVENT_HEADER = "X-Tap-Receiver-Event"


def sign(secret: str, body: bytes) -> str:
    """The signature header's value for a body (how a receiver checks it, too)."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class WebhookSender:
    def __init__(
        self,
        url: str,
        secret: str,
        *,
        attempts: int = 6,
        base_delay: float = 1.0,
        max_delay: float = 60.0,
        timeout: float = 10.0,
        concurrency: int = 8,
    ) -> None:
        self.url = url
        self.secret = secret
        self.attempts = attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self.counters = {"delivered": 0, "failed": 0, "retries": 0, "dropped": 0}

    def submit(self, sidecar: dict[str, Any]) -> None:
        """Schedule the delivery of one finalized tap's sidecar (call on the event loop)."""
        try:
            body = orjson.dumps(sidecar)
        except TypeError as exc:  # not JSON-encodable: count it, never lose it silently
            self.counters["failed"] += 1
            log.error("webhook for tap %s: the sidecar cannot be encoded: %s",
                      sidecar.get("tap_id"), exc)  # fmt: skip
            return
        task = asyncio.get_running_loop().create_task(self._deliver(body, sidecar.get("tap_id")))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, body: bytes, tap_id: object) -> None:
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self.secret, body),
            DELIVERY_HEADER: str(uuid.uuid4()),
            EVENT_HEADER: "tap.finished",
        }
        problem = ""
        for attempt in range(self.attempts):
            if attempt:
                self.counters["retries"] += 1
                await asyncio.sleep(min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))
            async with self._slots:
                try:
                    if self._session is None or self._session.closed:
                        self._session = aiohttp.ClientSession(timeout=self.timeout)
                    async with self._session.post(self.url, data=body, headers=headers) as resp:
                        await resp.read()
                        if 200 <= resp.status < 300:
                            self.counters["delivered"] += 1
                            return
                        problem = f"HTTP {resp.status}"
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    problem = f"{type(exc).__name__}: {exc}"
            log.warning("webhook for tap %s: attempt %d failed: %s", tap_id, attempt + 1, problem)
        self.counters["failed"] += 1
        log.error("webhook for tap %s: gave up after %d attempts", tap_id, self.attempts)

    async def close(self, timeout: float) -> None:
        """At shutdown: give pending deliveries `timeout` seconds, then drop (and count) them."""
        if self._tasks:
            _, still_pending = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in still_pending:
                task.cancel()
                self.counters["dropped"] += 1
            if still_pending:
                log.error("%d webhook deliveries dropped at shutdown", len(still_pending))
        if self._session is not None:
            await self._session.close()
