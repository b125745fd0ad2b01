"""The fleet on core NATS (no JetStream, nothing stored in NATS): presence by heartbeat, and
questions answered by every live instance (scatter-gather on request/reply).

Subjects, under `tap-receiver.`:

- `presence`: each instance says it is alive every HEARTBEAT seconds (`hello` when it joins or
  comes back, so the others answer at once; `bye` when it stops). An instance not heard from for
  PEER_TIMEOUT seconds is gone: a worker that dies leaves no trace, and NATS itself holds no
  state, so a NATS restart loses nothing (each instance re-registers with its next heartbeat).
- `ask.<kind>`: a question to every other instance (`taps`: your live taps; `status`: a
  SignalWire status callback; `source`: a registration by source address). Each answers on the
  asker's inbox; the asker waits until every live peer has answered, at most ASK_TIMEOUT.

With `live_nats`, every recording tap's audio goes out under `live.` on this connection too
(receiver.live.nats_publisher).

NATS down: `nats-py` reconnects for ever; meanwhile this instance records as before, answers
for itself only, and says so in `/healthz`, `/metrics` and one log line per outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg

from receiver.fleet import Answers, Responder
from receiver.taps.tap import utc_now_iso

log = logging.getLogger("receiver.fleet")

SUBJECT = "tap-receiver"
HEARTBEAT = 1.0  # seconds between presence messages
PEER_TIMEOUT = 3.5  # seconds without one after which a peer is gone
ASK_TIMEOUT = 1.0  # seconds a question waits for the peers' answers
RECONNECT_WAIT = 1.0  # seconds between connection attempts while NATS is down
ERROR_LOG_INTERVAL = 10.0  # seconds between log lines about NATS errors while connected
PENDING_SIZE = 16 * 1024 * 1024  # bytes the client may hold for the socket (live audio: half)


@dataclass
class Peer:
    instance: str
    storage: str
    pid: int
    seen: float  # monotonic


def redact_url(url: str) -> str:
    """A server URL without its user and password."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return parts._replace(netloc=f"<redacted>@{netloc}").geturl()


def fit(answer: dict[str, Any], limit: int) -> bytes:
    """The answer as JSON within NATS's max_payload (1 MiB by default): a list of live taps
    too long for it is cut, and the answer says how many were left out (`truncated`)."""
    payload = orjson.dumps(answer)
    taps = answer.get("taps")
    while len(payload) > limit and isinstance(taps, list) and taps:
        keep = max(0, int(len(taps) * limit / len(payload) * 0.9))
        answer["truncated"] = answer.get("truncated", 0) + len(taps) - keep
        taps = answer["taps"] = taps[:keep]
        payload = orjson.dumps(answer)
    return payload


class NatsFleet:
    """The `Fleet` the server uses when `nats_url` is set (see receiver.fleet)."""

    def __init__(
        self, servers: list[str], instance: str, storage: str, responder: Responder
    ) -> None:
        self.servers = servers
        self.instance = instance
        self.storage = storage
        self.responder = responder
        self.peers: dict[str, Peer] = {}
        self.connected = False
        self.outages = 0  # times NATS became unreachable (or was at the start)
        self.down_since: float | None = time.monotonic()  # None while connected
        self.down_since_iso: str | None = utc_now_iso()
        self.problem: str | None = "connecting"
        self.unanswered = 0  # answers of live peers that did not come in time
        self.questions = 0  # questions this instance answered
        self._outage_logged = False
        self._twin_logged = False  # another process under this instance's name
        self._question_error_logged = float("-inf")  # questions it could not answer
        self._error_logged = float("-inf")  # when a NATS error was last logged
        self._nc = Client()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect in the background: the server never waits for NATS."""
        self._tasks = [
            asyncio.create_task(self._connect(), name="fleet-connect"),
            asyncio.create_task(self._heartbeats(), name="fleet-heartbeat"),
        ]

    async def stop(self, timeout: float) -> None:
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        if self.connected:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._announce(bye=True), timeout)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._nc.close(), timeout)

    async def _connect(self) -> None:
        try:
            await self._nc.connect(
                servers=self.servers,
                name=f"tap-receiver {self.instance}",
                connect_timeout=2,
                reconnect_time_wait=RECONNECT_WAIT,  # type: ignore[arg-type]
                max_reconnect_attempts=-1,  # for ever, also the first connection
                ping_interval=5,
                max_outstanding_pings=2,
                pending_size=PENDING_SIZE,
                error_cb=self._on_error,
                disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected,
            )
            await self._nc.subscribe(f"{SUBJECT}.presence", cb=self._on_presence)
            await self._nc.subscribe(f"{SUBJECT}.ask.*", cb=self._on_question)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bad credential, a refused TLS handshake: said once
            self._down(f"{type(exc).__name__}: {exc}")
            return
        await self._up()

    # -- connection state ---------------------------------------------------------------------

    def _down(self, why: str) -> None:
        self.problem = why
        if self.connected or not self._outage_logged:
            self.outages += 1
            self.down_since = time.monotonic()
            self.down_since_iso = utc_now_iso()
            log.error(
                "the fleet's NATS (%s) is unreachable (%s): recording goes on here; the fleet's "
                "listing and forwarding wait until it is back",
                ", ".join(redact_url(s) for s in self.servers),
                why,
            )
            self._outage_logged = True
        self.connected = False
        self.peers.clear()  # they are unknown until heard from again

    async def _up(self) -> None:
        was_down = self.down_since
        self.connected = True
        self.down_since = self.down_since_iso = None
        self.problem = None
        if self._outage_logged and was_down is not None:
            log.warning(
                "the fleet's NATS is back after %.1f s: %s registered again",
                time.monotonic() - was_down,
                self.instance,
            )
        else:
            log.info("joined the fleet as %s", self.instance)
        self._outage_logged = False
        await self._announce(hello=True)

    async def _on_error(self, exc: Exception) -> None:
        if self._stopping:
            return
        if not self._nc.is_connected:
            self._down(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        elif time.monotonic() - self._error_logged >= ERROR_LOG_INTERVAL:
            self._error_logged = time.monotonic()
            log.warning("NATS error: %s: %s", type(exc).__name__, exc)

    async def _on_disconnected(self) -> None:
        if not self._stopping:
            self._down("disconnected")

    async def _on_reconnected(self) -> None:
        await self._up()

    # -- presence -----------------------------------------------------------------------------

    async def _announce(self, hello: bool = False, bye: bool = False) -> None:
        message = {
            "instance": self.instance,
            "storage": self.storage,
            "pid": os.getpid(),
            "hello": hello,
            "bye": bye,
        }
        await self._nc.publish(f"{SUBJECT}.presence", orjson.dumps(message))
        if bye:
            await self._nc.flush(timeout=1)

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT)
            try:
                if self.connected:
                    await self._announce()
                self._expire_peers()
            except Exception as exc:  # a publish racing a disconnect: the next one will do
                log.debug("heartbeat failed: %s", exc)

    def _expire_peers(self) -> None:
        now = time.monotonic()
        for name, peer in list(self.peers.items()):
            if now - peer.seen > PEER_TIMEOUT:
                del self.peers[name]
                log.warning("fleet: %s is gone (no heartbeat for %.0f s)", name, PEER_TIMEOUT)

    async def _on_presence(self, msg: Msg) -> None:
        try:
            data = orjson.loads(msg.data)
            name = str(data["instance"])
            pid = int(data.get("pid") or 0)
        except (ValueError, KeyError, TypeError, AttributeError):
            return  # not a receiver's presence message
        if name == self.instance:
            twin = data.get("pid") != os.getpid() or data.get("storage") != self.storage
            if twin and not self._twin_logged:
                self._twin_logged = True
                log.error("fleet: another process (pid %s, %s) is also called %s: give each "
                          "receiver its own instance_name", data.get("pid"), data.get("storage"),
                          name)  # fmt: skip
            return
        if data.get("bye"):
            if self.peers.pop(name, None) is not None:
                log.info("fleet: %s left", name)
            return
        known = name in self.peers
        self.peers[name] = Peer(name, str(data.get("storage")), pid, time.monotonic())
        if not known:
            log.info("fleet: %s is here", name)
        if data.get("hello") and self.connected:
            await self._announce()  # so that it knows this one at once

    # -- questions ----------------------------------------------------------------------------

    async def _on_question(self, msg: Msg) -> None:
        kind = msg.subject.rpartition(".")[2]
        try:
            question = orjson.loads(msg.data)
            if question.get("from") == self.instance or not msg.reply:
                return
            body = question.get("body")
            answer = self.responder(kind, body if isinstance(body, dict) else {})
        except Exception as exc:  # a malformed question (or a bug): logged at most every 10 s
            now = time.monotonic()
            if now - self._question_error_logged >= ERROR_LOG_INTERVAL:
                self._question_error_logged = now
                log.warning("fleet: cannot answer a %s question: %s: %s", kind,
                            type(exc).__name__, exc)  # fmt: skip
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        self.questions += 1
        answer.update(instance=self.instance, storage=self.storage)
        payload = fit(answer, self._nc.max_payload)
        with contextlib.suppress(Exception):
            await msg.respond(payload)

    async def ask(self, kind: str, body: dict[str, Any]) -> Answers:
        if not self.connected:
            return Answers(reachable=False)
        expected = set(self.peers)
        if not expected:
            return Answers()
        got: dict[str, dict[str, Any]] = {}
        done = asyncio.Event()

        async def on_answer(msg: Msg) -> None:
            try:
                answer = orjson.loads(msg.data)
                name = str(answer["instance"])
            except (ValueError, KeyError, TypeError):
                return
            got[name] = answer
            if expected <= got.keys():
                done.set()

        question = orjson.dumps({"from": self.instance, "body": body})
        try:
            inbox = self._nc.new_inbox()
            sub = await self._nc.subscribe(inbox, cb=on_answer)
            try:
                await self._nc.publish(f"{SUBJECT}.ask.{kind}", question, reply=inbox)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), ASK_TIMEOUT)
            finally:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        except Exception as exc:  # NATS went away between the check and the question
            log.debug("fleet: asking %s failed: %s", kind, exc)
            return Answers(list(got.values()), sorted(expected - got.keys()), reachable=False)
        missing = sorted(expected - got.keys())
        self.unanswered += len(missing)
        return Answers(list(got.values()), missing)

    # -- live audio (receiver.live.nats_publisher) ---------------------------------------------

    def can_publish(self, size: int, limit: int) -> bool:
        """Connected, and fewer than `limit` bytes (these `size` too) wait for the socket: a
        publish then only appends to the client's buffer (nats-py waits for the socket only
        past its pending_size)."""
        nc = self._nc
        return self.connected and nc.is_connected and nc.pending_data_size + size <= limit

    async def publish(self, subject: str, payload: bytes, headers: dict[str, str]) -> None:
        await self._nc.publish(subject, payload, headers=headers)

    # -- what it shows ------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return {
            "engine": "nats",
            "servers": [redact_url(s) for s in self.servers],
            "instance": self.instance,
            "connected": self.connected,
            "problem": self.problem,
            "down_since": self.down_since_iso,
            "outages": self.outages,
            "peers": sorted(self.peers),
            "questions_answered": self.questions,
            "answers_missed": self.unanswered,
        }

    def metrics(self) -> dict[str, Any]:
        return {
            "fleet_connected": int(self.connected),
            "fleet_outages": self.outages,
            "fleet_peers": len(self.peers),
            "fleet_answers_missed": self.unanswered,
        }
