"""The SignalWire control plane: naming taps before (registration) and after (status callbacks)
their audio arrives.

- `POST /api/taps` `{"tap_id", "codec"?, "ptime"?, "source"?}`: without `source`, allocates a
  port from `rtp_port_range` whose packets are recorded as that tap; with `source` ("ip:port", the
  tap reply's `source_device`), names the stream from that sender on the shared RTP port. Answers
  with a ready-made SignalWire `device` object.
- `POST /signalwire/tap-status`: consumes `calling.call.tap` events (values may be strings or
  numbers). `tapping` links the event's `control_id` to the tap at `device.params`
  (a pool port, or the tap id in a WebSocket URI), renaming its files if it started under another
  name; `finished` ends that tap at once. The event's ids go into the sidecar under `signalwire`.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import unquote, urlsplit

import orjson
from aiohttp import web

from receiver.codecs.encoding import Encoding, encoding_named
from receiver.config import Config
from receiver.fleet import Fleet
from receiver.http.auth import Auth
from receiver.http.errors import json_error
from receiver.redaction import redact
from receiver.rtp.receiver import NoFreePort, RtpReceiver
from receiver.storage.sidecar import too_deep
from receiver.taps.naming import Expected, Naming, rtp_port_key, rtp_source_key, websocket_key
from receiver.taps.registry import TapRegistry
from receiver.taps.tap import Tap
from receiver.taps.tap_id import TAP_ID_RULE, is_valid_tap_id
from receiver.taps.transport import Transport

log = logging.getLogger("receiver.control")

# What an RTP tap may be registered with (Opus: its stream's first dynamic payload type is Opus)
RTP_CODECS = (Encoding.PCMU, Encoding.PCMA, Encoding.G722, Encoding.OPUS)
MAX_FIELD = 256  # characters kept of each SignalWire value
DEVICE_PARAMS = ("uri", "addr", "port", "codec", "rate", "ptime")  # of device.params, kept


def _int(value: Any) -> int | None:
    """Event fields come as numbers or numeric strings ("1234")."""
    if isinstance(value, bool):
        return None
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def _field(value: Any) -> str | int | float | None:
    """A SignalWire value as kept: a number, or a string of at most MAX_FIELD characters;
    anything else (objects, lists) is not kept."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return value
    return value[:MAX_FIELD] if isinstance(value, str) else None


def tap_id_from_uri(uri: str) -> str | None:
    """The tap id in a WebSocket URI this server handed out (…/tap/{id} or …/stream/{id}; a
    call's leg …/call/{call_id}/{leg} is the tap `{call_id}.{leg}`)."""
    parts = [unquote(p) for p in urlsplit(uri).path.split("/") if p]
    if len(parts) >= 2 and parts[-2] in ("tap", "stream"):
        return parts[-1]
    if len(parts) >= 3 and parts[-3] == "call":
        return f"{parts[-2]}.{parts[-1]}"
    return None


def _source(text: Any) -> tuple[str, int] | None:
    host, sep, port = str(text or "").strip().rpartition(":")
    number = _int(port)
    if not sep or not host or number is None or not 0 < number < 65536:
        return None
    return host.strip("[]"), number


class ControlApi:
    def __init__(
        self,
        config: Config,
        auth: Auth,
        naming: Naming,
        registry: TapRegistry,
        transports: dict[str, Transport],
        rtp: RtpReceiver,
        rtp_port: int,
    ) -> None:
        # RTP does not pass through an HTTP proxy: public_address, else public_url's host.
        self.public_address = (
            config.server.public_address or urlsplit(config.server.public_url).hostname or ""
        )
        self.registration_timeout = config.rtp.registration_timeout
        self.auth = auth
        self.naming = naming
        self.registry = registry
        self.transports = transports
        self.rtp = rtp  # for its pool of ports
        self.rtp_port = rtp_port
        self.counters: dict[str, int] = {}
        # With nats_url: what no tap here matches is asked of the other instances.
        self.fleet: Fleet | None = None

    def add_routes(self, app: web.Application) -> None:
        for prefix in ("", "/t/{token}"):
            app.router.add_post(prefix + "/api/taps", self.auth.required(self.register))
            app.router.add_post(
                prefix + "/signalwire/tap-status", self.auth.required(self.tap_status)
            )

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    async def _json_body(self, request: web.Request) -> dict[str, Any] | web.Response:
        try:
            # orjson: no recursion (it refuses nesting past 1024 levels), and bytes that are not
            # UTF-8 are a JSON error like any other
            body = orjson.loads(await request.read())
        except (ValueError, RecursionError) as exc:
            return json_error(400, f"the body must be JSON: {exc}")
        if not isinstance(body, dict):
            return json_error(400, "the body must be a JSON object")
        if too_deep(body):  # it goes into the sidecar, the API answers and the webhook
            return json_error(400, "the body nests JSON too deeply")
        return body

    def _public_address(self, request: web.Request) -> str:
        return self.public_address or request.url.host or "localhost"

    # -- registration -------------------------------------------------------------------------

    async def register(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        if isinstance(body, web.Response):
            return body
        tap_id = body.get("tap_id")
        if not isinstance(tap_id, str) or not is_valid_tap_id(tap_id):
            return json_error(400, TAP_ID_RULE)
        codec = encoding_named(str(body.get("codec") or "PCMU"))
        if codec is None or codec not in RTP_CODECS:
            return json_error(400, "codec must be one of PCMU, PCMA, G722, OPUS")
        ptime = _int(body.get("ptime", 20))
        if ptime is None or not 10 <= ptime <= 120 or ptime % 10:
            return json_error(400, "ptime must be a multiple of 10 from 10 to 120")
        source = None
        if body.get("source") is not None:
            source = _source(body["source"])
            if source is None:
                return json_error(400, "source must be ip:port")
            held = self._name_source(source, tap_id, codec)
            if not held and self.fleet is not None:
                wire = {
                    "tap_id": tap_id,
                    "codec": codec.value,
                    "host": source[0],
                    "port": source[1],
                }
                await self.fleet.ask("source", wire)
            port = self.rtp_port
        else:
            try:
                port = self.rtp.reserve_port()
            except NoFreePort as exc:
                return json_error(503 if self.rtp.settings.port_range else 409, str(exc))
            self.naming.expect(
                rtp_port_key(port),
                Expected(tap_id, codec=codec, release=lambda: self.rtp.release_port(port)),
                self.registration_timeout,
            )
        self._count("registrations")
        log.info("registered RTP tap %s on port %d%s", tap_id, port,
                 f" from {body['source']}" if source else "")  # fmt: skip
        address = self._public_address(request)
        answer: dict[str, Any] = {
            "tap_id": tap_id,
            "rtp": {"address": address, "port": port},
            "device": {
                "type": "rtp",
                "params": {"addr": address, "port": port, "codec": codec, "ptime": ptime},
            },
        }
        if source:
            answer["source"] = f"{source[0]}:{source[1]}"
        return web.json_response(answer, status=201)

    def _name_source(self, source: tuple[str, int], tap_id: str, codec: Encoding) -> bool:
        """The stream from `source` on the shared port is `tap_id`: now, if it is streaming
        here already (its files are renamed: True), else when it comes."""
        key = rtp_source_key(*source)
        tap = self.registry.find(key)
        if tap is not None:
            self.registry.rename(tap, tap_id)
            return True
        self.naming.expect(key, Expected(tap_id, codec=codec), self.registration_timeout)
        return False

    def answer_source(self, body: dict[str, Any]) -> dict[str, Any]:
        """Another instance was told a source's name (see `register`): the stream is named here
        too, when it comes here (the kernel, or the sender's address, decides where)."""
        tap_id, codec = body.get("tap_id"), encoding_named(str(body.get("codec") or ""))
        source = _source(f"{body.get('host')}:{body.get('port')}")
        if (
            not isinstance(tap_id, str)
            or not is_valid_tap_id(tap_id)
            or codec is None
            or not source
        ):
            return {"error": "bad source registration"}
        return {"held": self._name_source(source, tap_id, codec)}

    # -- status callbacks ---------------------------------------------------------------------

    async def tap_status(self, request: web.Request) -> web.Response:
        body = await self._json_body(request)
        if isinstance(body, web.Response):
            return body
        params = body.get("params") if isinstance(body.get("params"), dict) else body
        assert isinstance(params, dict)
        control_id = params.get("control_id")
        state = str(params.get("state", "")).lower()
        device = params.get("device") if isinstance(params.get("device"), dict) else {}
        assert isinstance(device, dict)
        device_params = device.get("params") if isinstance(device.get("params"), dict) else {}
        assert isinstance(device_params, dict)
        if not isinstance(control_id, str) or not is_valid_tap_id(control_id):
            self._count("status_bad")
            return json_error(400, "params.control_id must be a valid tap id")
        if state not in ("tapping", "finished"):
            self._count("status_bad")
            return json_error(400, "params.state must be tapping or finished")
        tap_params = (
            params.get("tap", {}).get("params", {}) if isinstance(params.get("tap"), dict) else {}
        )
        # What a name waiting for its tap keeps, and what goes into the sidecar: the fields
        # the sidecar needs, each a short scalar, tokens redacted; never the body as it came
        # (300 callbacks of 0.9 MB for taps not yet connected kept 260 MB for 600 s).
        info = {
            "signalwire": {
                "control_id": control_id,
                "call_id": _field(params.get("call_id")),
                "node_id": _field(params.get("node_id")),
                "segment_id": _field(params.get("segment_id")),
                "direction": _field(tap_params.get("direction"))
                if isinstance(tap_params, dict)
                else None,
                "device": {
                    "type": _field(device.get("type")),
                    "params": {
                        key: _field(device_params[key])
                        for key in DEVICE_PARAMS
                        if key in device_params
                    },
                },
            }
        }
        info = redact(info)
        kind = str(device.get("type", "")).lower()
        uri_id = None
        if kind == "ws":
            try:
                uri_id = tap_id_from_uri(str(device_params.get("uri", "")))
            except ValueError as exc:  # e.g. "ws://[::1": urlsplit refuses it
                self._count("status_bad")
                return json_error(400, f"params.device.params.uri is not a valid URI: {exc}")
        event = {
            "control_id": control_id,
            "state": state,
            "kind": kind,
            "port": _int(device_params.get("port")),
            "addr": _field(device_params.get("addr")),
            "uri_id": uri_id,
            "info": info,
        }
        held, result = self._status(event)
        answer: dict[str, Any] = {"control_id": control_id, "state": state}
        if self.fleet is not None:
            holder = self.fleet.instance if held else None
            if not held:
                answers = await self.fleet.ask("status", event)
                found = next((a for a in answers.answers if a.get("held")), None)
                if found is not None:
                    holder, result = found.get("instance"), str(found.get("result"))
                elif not answers.reachable:
                    answer["fleet"] = "unreachable: only this instance was asked"
            answer["instance"] = holder
        self._count(f"status_{state}")
        log.info("SignalWire tap %s %s: %s", control_id, state, result)
        return web.json_response({**answer, "result": result})

    def _status(self, event: dict[str, Any]) -> tuple[bool, str]:
        """Apply a status callback to the tap it names, if it is here: (held here, result)."""
        control_id, state, info = event["control_id"], event["state"], event["info"]
        if event["kind"] == "rtp":
            return self._rtp_status(control_id, state, event["port"], event["addr"], info)
        if event["kind"] == "ws":
            return self._ws_status(control_id, state, event["uri_id"], info)
        return False, "unknown device type"

    def answer_status(self, body: dict[str, Any]) -> dict[str, Any]:
        """Another instance got a status callback no tap of its own matched."""
        control_id, state = body.get("control_id"), body.get("state")
        info = body.get("info")
        if (
            not isinstance(control_id, str)
            or not is_valid_tap_id(control_id)
            or state not in ("tapping", "finished")
            or not isinstance(info, dict)
        ):
            return {"error": "bad status event"}
        port, uri_id = body.get("port"), body.get("uri_id")
        event = {
            "control_id": control_id,
            "state": state,
            "kind": str(body.get("kind")),
            "port": port if isinstance(port, int) and not isinstance(port, bool) else None,
            "addr": _field(body.get("addr")),
            "uri_id": uri_id if isinstance(uri_id, str) else None,
            "info": info,
        }
        held, result = self._status(event)
        return {"held": held, "result": result}

    def _rtp_status(
        self,
        control_id: str,
        state: str,
        port: int | None,
        addr: Any,
        info: dict[str, Any],
    ) -> tuple[bool, str]:
        if port is None:
            return False, "no registered port matches"
        if (
            self.fleet is not None
            and self.public_address
            and isinstance(addr, str)
            and addr
            and addr != self.public_address
        ):  # machines of a fleet may share rtp_port_range: the address picks the machine
            return False, "no registered port matches"
        # Sockets are read every 20 ms: read what arrived before this event, so a stream that
        # has started is found (and named) now.
        self.rtp.receive()
        key = rtp_port_key(port)
        tap = self.registry.find(key)
        if tap is not None:
            return True, self._apply(tap, control_id, state, info)
        expected = self.naming.get(key)
        if expected is None:
            if port == self.rtp_port:
                return False, "shared port: register the tap's source_device to name its stream"
            return False, "no registered port matches"
        if state == "finished":
            self.naming.cancel(key)  # the port goes back to the pool
            return True, "released: no packet had arrived"
        expected.tap_id = control_id
        expected.extra.update(info)
        return True, "linked; waiting for the first packet"

    def _ws_status(
        self, control_id: str, state: str, uri_id: str | None, info: dict[str, Any]
    ) -> tuple[bool, str]:
        if uri_id is None:
            return False, "the device uri names no tap"
        tap = self.registry.find(websocket_key(uri_id)) or self.registry.find_by_id(
            control_id, "websocket"
        )
        if tap is not None:
            return True, self._apply(tap, control_id, state, info)
        if state == "tapping":
            # With a fleet, every instance keeps the name: the tap may connect to any of them.
            self.naming.expect(websocket_key(uri_id), Expected(control_id, info))
            return False, "linked; waiting for the connection"
        return False, "no active tap matches"

    def _apply(self, tap: Tap, control_id: str, state: str, info: dict[str, Any]) -> str:
        """A status callback for a tap that is recording: name it, and end it if finished."""
        self.registry.rename(tap, control_id, info)
        if state == "finished":
            reason = "signalwire finished" if tap.transport == "rtp" else "tap finished"
            self.transports[tap.transport].stop_tap(tap, reason)
            return "ended"
        return "linked"
