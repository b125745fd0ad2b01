"""The HTTP API as an OpenAPI 3.1 document, written by hand as data and served at
`GET /api/openapi.json` (no token: it describes the API, it reveals nothing recorded).

Every operation that takes the token also exists under the `/t/{token}` path prefix (a tap URI
cannot set headers); those variants are generated from the plain ones, so the document lists
every route the server has. tests/test_openapi.py holds the document to the real routes: each
route described, each described route there.
"""

from __future__ import annotations

import copy
from typing import Any

from aiohttp import web

from receiver import __version__

PATH_TOKEN = "/t/{token}"

# -- shared pieces --------------------------------------------------------------------------------

TOKEN_SECURITY: list[dict[str, list[str]]] = [{"bearer": []}, {"tokenQuery": []}]
NO_SECURITY: list[dict[str, list[str]]] = []


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}  # fmt: skip


def _path(name: str, description: str, pattern: str | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    if pattern:
        schema["pattern"] = pattern
    return {"name": name, "in": "path", "required": True, "schema": schema,
            "description": description}  # fmt: skip


TAP_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
NAME = _path("name", "the recording's file base name (`call-42`, `call-42.1`)", TAP_ID_PATTERN)
TAP_ID = _path("tap_id", "the id the tap's files are named after", TAP_ID_PATTERN)
UNAUTHORIZED = _error("missing or wrong token")
BAD_NAME = _error("a bad recording name or parameter")
NOT_FOUND = _error("no such recording")
FORBIDDEN = _error("the client is not in `http_allow`")

CODEC = _query(
    "codec",
    {"type": "string", "enum": ["pcmu", "pcma", "opus", "g722"]},
    "the codec of raw binary frames (default pcmu); opus: one Opus packet per frame",
)
RATE = _query(
    "rate",
    {"type": "integer", "enum": [8000, 12000, 16000, 24000, 48000]},
    "Opus: the rate it is decoded and recorded at (default 48000)",
)
_TAP_ENDPOINT = {
    "security": TOKEN_SECURITY,
    "parameters": [TAP_ID, CODEC, RATE],
    "responses": {
        "101": {"description": "WebSocket upgrade: binary frames of audio (raw G.711 or G.722, "
                "one Opus packet each, or as the "
                "dialect says); text frames per dialect (format, Media Streams events, fork "
                "metadata). Close codes: 1000 tap finished, 1001 shutting down, 1003 "
                "unsupported format, 1009 message too large, 1013 low disk."},
        "400": _error("a bad tap id or codec"),
        "401": UNAUTHORIZED,
        "403": FORBIDDEN,
        "426": _error("not a WebSocket upgrade"),
        "429": _error("new_tap_rate_limit reached for this address"),
        "503": _error("ws_max_taps reached, low disk, or overloaded"),
    },
}  # fmt: skip

PATHS: dict[str, dict[str, Any]] = {
    "/healthz": {
        "get": {
            "operationId": "health",
            "summary": "Liveness, ports, active taps, per-transport counters, limits",
            "security": NO_SECURITY,
            "responses": {"200": _json(_ref("Health"), "the server is up")},
        }
    },
    "/api/openapi.json": {
        "get": {
            "operationId": "openapi",
            "summary": "This document",
            "security": NO_SECURITY,
            "responses": {"200": _json({"type": "object"}, "the OpenAPI document")},
        }
    },
    "/api/connect": {
        "get": {
            "operationId": "connect",
            "summary": "The URIs to paste into a tap (as the start-up banner prints them)",
            "security": TOKEN_SECURITY,
            "responses": {"200": _json(_ref("Connect"), "the URIs"), "401": UNAUTHORIZED},
        }
    },
    "/api/taps": {
        "get": {
            "operationId": "listTaps",
            "summary": "Recordings, newest first: this disk's, and with archive_url the "
                       "archive's (read from its sidecars) that this disk does not have",
            "security": TOKEN_SECURITY,
            "parameters": [
                _query("state", {"type": "string"}, "comma-separated: recording, finished, "
                       "failed, interrupted, unknown"),
                _query("transport", {"type": "string"}, "comma-separated: websocket, rtp"),
                _query("where", {"type": "string"}, "comma-separated: local, archive "
                       "(with archive_url: recordings only the object store holds)"),
                _query("q", {"type": "string"}, "text in the name, tap id, remote or codec"),
                _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000,
                                 "default": 100}, "page size"),
                _query("offset", {"type": "integer", "minimum": 0, "default": 0}, "page start"),
            ],
            "responses": {"200": _json(_ref("TapList"), "one page of recordings"),
                          "400": BAD_NAME, "401": UNAUTHORIZED},
        },
        "post": {
            "operationId": "registerTap",
            "summary": "Name an RTP tap before its audio comes: a port of rtp_port_range, or the "
            "stream from a source address on the shared port",
            "security": TOKEN_SECURITY,
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": _ref("Registration")}}},
            "responses": {
                "201": _json(_ref("RegistrationAnswer"), "registered; pass `device` to the tap"),
                "400": _error("a bad tap id, codec, ptime or source"),
                "401": UNAUTHORIZED,
                "409": _error("no rtp_port_range is configured"),
                "503": _error("every port of rtp_port_range is in use"),
            },
        },
    },
    "/api/taps/{name}": {
        "get": {
            "operationId": "getTap",
            "summary": "One recording: summary, sidecar (live while recording), live counters, "
            "markers, WAV header check",
            "security": TOKEN_SECURITY,
            "parameters": [NAME],
            "responses": {"200": _json(_ref("TapDetail"), "the recording (one only the "
                                       "archive holds: its archived sidecar, no `wav`)"),
                          "400": BAD_NAME, "401": UNAUTHORIZED, "404": NOT_FOUND,
                          "502": _error("the object store failed")},
        },
        "delete": {
            "operationId": "deleteTap",
            "summary": "Remove a finished recording's WAV(s) and sidecar",
            "security": TOKEN_SECURITY,
            "parameters": [NAME],
            "responses": {
                "200": _json({"type": "object", "properties": {
                    "deleted": {"type": "string"},
                    "files": {"type": "array", "items": {"type": "string"}}}}, "removed"),
                "400": BAD_NAME, "401": UNAUTHORIZED, "404": NOT_FOUND,
                "409": _error("the tap is still recording or being finalized, is a call's leg "
                              "waiting for its call, or is being uploaded to the archive"),
            },
        },
    },
    "/api/taps/{name}/audio": {
        "get": {
            "operationId": "getTapAudio",
            "summary": "The WAV file (Range and ETag supported); once its local copy is "
                       "deleted, the archived one, streamed from the object store",
            "security": TOKEN_SECURITY,
            "parameters": [NAME, _query("download", {"type": "string"},
                                        "any value: served as an attachment")],
            "responses": {
                "200": {"description": "the WAV", "content": {"audio/wav": {
                    "schema": {"type": "string", "format": "binary"}}}},
                "206": {"description": "the requested byte range", "content": {"audio/wav": {
                    "schema": {"type": "string", "format": "binary"}}}},
                "400": BAD_NAME, "401": UNAUTHORIZED, "404": NOT_FOUND,
                "409": _error("only an age-encrypted copy is left (in the archive)"),
                "416": _error("a range that cannot be served"),
                "502": _error("the object store failed"),
            },
        }
    },
    "/api/taps/{name}/waveform": {
        "get": {
            "operationId": "getTapWaveform",
            "summary": "Minimum and maximum sample per pixel column, one list per channel",
            "security": TOKEN_SECURITY,
            "parameters": [NAME, _query("width", {"type": "integer", "minimum": 1,
                                                  "maximum": 10000, "default": 1000}, "columns")],
            "responses": {"200": _json(_ref("Waveform"), "the peaks"), "400": BAD_NAME,
                          "401": UNAUTHORIZED, "404": NOT_FOUND,
                          "422": _error("the WAV cannot be read")},
        }
    },
    "/api/taps/{name}/spectrogram": {
        "get": {
            "operationId": "getTapSpectrogram",
            "summary": "A PNG spectrogram, channels top to bottom, 0 Hz at the bottom",
            "security": TOKEN_SECURITY,
            "parameters": [
                NAME,
                _query("width", {"type": "integer", "minimum": 16, "maximum": 4000,
                                 "default": 800}, "pixels"),
                _query("height", {"type": "integer", "minimum": 16, "maximum": 1024,
                                  "default": 200}, "pixels"),
            ],
            "responses": {
                "200": {"description": "the image", "content": {"image/png": {
                    "schema": {"type": "string", "format": "binary"}}}},
                "400": BAD_NAME, "401": UNAUTHORIZED, "404": NOT_FOUND,
                "422": _error("the WAV cannot be read"),
            },
        }
    },
    "/api/taps/{name}/live": {
        "get": {
            "operationId": "getTapLive",
            "summary": "The audio of a tap being recorded, live, over a WebSocket",
            "description": "First a JSON text frame `{\"type\": \"start\", \"name\", "
            "\"tap_id\", \"sample_rate\", \"channels\", \"sample_format\": \"s16le\", "
            "\"position\"}`; then binary frames of 16-bit little-endian PCM (channels "
            "interleaved): the recording's audio from frame `position` of its WAV on, as the "
            "tap's timeline places it (every `live_interval`). A listener more than "
            "`live_queue_seconds` behind misses audio: a JSON `{\"type\": \"gap\", "
            "\"skipped_frames\", \"position\"}` says how much, and where the audio goes on. "
            "At the tap's end a JSON `{\"type\": \"end\", \"position\", \"reason\", "
            "\"dropped_frames\", \"gaps\"}` and close 1000. The name of a per-track WAV "
            "(`<name>.inbound`) gives that channel alone.",
            "security": TOKEN_SECURITY,
            "parameters": [NAME],
            "responses": {
                "101": {"description": "WebSocket upgrade: the live audio, as described"},
                "400": _error("a bad name, or not a WebSocket upgrade"),
                "401": UNAUTHORIZED,
                "404": NOT_FOUND,
                "409": _error("the recording is not being recorded (its WAV is at .../audio)"),
                "503": _error("live_max_subscribers reached"),
            },
        }
    },
    "/api/taps/{name}/levels": {
        "get": {
            "operationId": "getTapLevels",
            "summary": "Peak and RMS (dBFS) and clipping per channel, the longest silence",
            "security": TOKEN_SECURITY,
            "parameters": [NAME, _query("silence_db", {"type": "integer", "minimum": -120,
                                                       "maximum": 0, "default": -60},
                                        "silence is at or below this level")],
            "responses": {"200": _json(_ref("Levels"), "the levels"), "400": BAD_NAME,
                          "401": UNAUTHORIZED, "404": NOT_FOUND,
                          "422": _error("the WAV cannot be read")},
        }
    },
    "/signalwire/tap-status": {
        "post": {
            "operationId": "tapStatus",
            "summary": "A SignalWire `calling.call.tap` status callback: `tapping` names the tap "
            "after its control_id, `finished` ends it",
            "security": TOKEN_SECURITY,
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": _ref("TapStatusEvent")}}},
            "responses": {
                "200": _json({"type": "object", "properties": {
                    "control_id": {"type": "string"}, "state": {"type": "string"},
                    "result": {"type": "string"},
                    "instance": {"type": ["string", "null"], "description": "with nats_url: "
                                 "the instance that holds the tap (null: none does)"}}},
                    "what was done"),
                "400": _error("not a tap event with a valid control_id and state"),
                "401": UNAUTHORIZED,
            },
        }
    },
    "/metrics": {
        "get": {
            "operationId": "metrics",
            "summary": "Prometheus metrics",
            "security": TOKEN_SECURITY,
            "responses": {"200": {"description": "text exposition format", "content": {
                "text/plain": {"schema": {"type": "string"}}}}, "401": UNAUTHORIZED},
        }
    },
    "/tap/{tap_id}": {
        "get": {"operationId": "tapWebSocket", "summary": "A WebSocket tap (SignalWire tap, "
                "Media Streams, L16 forks): the recording is named after tap_id",
                **_TAP_ENDPOINT}
    },
    "/stream/{tap_id}": {
        "get": {"operationId": "streamWebSocket", "summary": "The same endpoint as /tap/{tap_id}",
                **_TAP_ENDPOINT}
    },
    "/call/{call_id}/{leg}": {
        "get": {"operationId": "callLegWebSocket", "summary": "A WebSocket tap that is one leg "
                "of a call (as /tap/{tap_id}), recorded as `<call_id>.<leg>`; once both legs "
                "have ended, `<call_id>.wav` holds them side by side (speak, listen)",
                **_TAP_ENDPOINT,
                "parameters": [
                    _path("call_id", "the call both legs name", TAP_ID_PATTERN),
                    {**_path("leg", "which party: speak (channel 1) or listen (channel 2)"),
                     "schema": {"type": "string", "enum": ["speak", "listen"]}},
                    CODEC,
                    RATE,
                ]}
    },
    "/": {
        "get": {
            "operationId": "page",
            "summary": "The recordings page (it asks for the token, or takes ?token=)",
            "security": NO_SECURITY,
            "responses": {"200": {"description": "HTML", "content": {"text/html": {}}}},
        }
    },
    "/static/{file}": {
        "get": {
            "operationId": "pageFile",
            "summary": "The page's script, style sheet and icon",
            "security": NO_SECURITY,
            "parameters": [_path("file", "app.js, style.css or favicon.svg")],
            "responses": {"200": {"description": "the file"}, "404": NOT_FOUND},
        }
    },
}  # fmt: skip

#: Plain paths that have no `/t/{token}` variant, and routes that exist only with the prefix.
NOT_UNDER_PREFIX = {"/healthz", "/"}
ONLY_UNDER_PREFIX: dict[str, dict[str, Any]] = {
    PATH_TOKEN + "/": {
        "get": {
            "operationId": "pageWithPathToken",
            "summary": "The recordings page, its API reached relative to it with the token",
            "security": NO_SECURITY,
            "parameters": [_path("token", "the receiver's token")],
            "responses": {"200": {"description": "HTML", "content": {"text/html": {}}}},
        }
    },
    PATH_TOKEN: {
        "get": {
            "operationId": "pageRedirect",
            "summary": "Redirects to /t/{token}/",
            "security": NO_SECURITY,
            "parameters": [_path("token", "the receiver's token")],
            "responses": {"308": {"description": "to the same path with a trailing slash"}},
        }
    },
}

SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error", "status"], "properties": {
        "error": {"type": "string"}, "status": {"type": "integer"}}},
    "Health": {"type": "object", "required": ["status"], "properties": {
        "status": {"const": "ok"}, "version": {"type": "string"},
        "uptime_seconds": {"type": "number"}, "http_port": {"type": "integer"},
        "rtp_port": {"type": "integer"}, "active_taps": {"type": "integer"},
        "auth": {"type": "boolean"}, "low_disk": {"type": "boolean"},
        "limits": {"type": "object"}, "recovery": {"type": "object"},
        "live": {"type": "object", "description": "live listeners: subscribers (now), taps "
                 "(listened to now), subscriptions, dropped_frames, gaps (in all), refused "
                 "(by reason); with live_nats, nats: subject, taps (published now), messages, "
                 "bytes, dropped_frames, dropped_ends (in all)"}},
        "additionalProperties": True},
    "Connect": {"type": "object", "properties": {
        "tap_uri": {"type": "string", "description": "ws(s)://…/tap/{tap_id}"},
        "stream_uri": {"type": "string"}, "rtp_uri": {"type": "string"},
        "page_url": {"type": "string"},
        "public_url": {"type": ["string", "null"], "description": "the public_url setting"},
        "auth": {"type": "boolean"}}},
    "TapSummary": {"type": "object", "properties": {
        "name": {"type": "string"}, "tap_id": {"type": "string"},
        "transport": {"type": ["string", "null"], "enum": ["websocket", "rtp", None]},
        "codec": {"type": ["string", "null"]}, "sample_rate": {"type": ["integer", "null"]},
        "channels": {"type": ["integer", "null"]},
        "channel_names": {"type": ["array", "null"], "items": {"type": "string"}},
        "remote": {"type": ["string", "null"]},
        "state": {"type": "string", "enum": ["recording", "finished", "failed", "interrupted",
                                             "unknown"]},
        "started_at": {"type": ["string", "null"]}, "ended_at": {"type": ["string", "null"]},
        "duration_seconds": {"type": ["number", "null"]},
        "size_bytes": {"type": ["integer", "null"]},
        "loss_percent": {"type": ["number", "null"]},
        "archive_url": {"type": ["string", "null"],
                        "description": "s3://… of the archived audio (archive_url)"},
        "where": {"type": "string", "enum": ["local", "archive"], "description": "local: "
                  "on the disk of this receiver (or of the fleet's `instance`); archive: "
                  "only in the object store (another receiver's, or deleted here), listed "
                  "from its archived sidecar, its audio streamed from the store"},
        "instance": {"type": "string", "description": "with nats_url, on a live tap: the "
                     "receiver (or worker) of the fleet that records it"}}},
    "TapList": {"type": "object", "properties": {
        "taps": {"type": "array", "items": _ref("TapSummary")}, "total": {"type": "integer"},
        "offset": {"type": "integer"}, "limit": {"type": "integer"},
        "active": {"type": "integer"}, "auth": {"type": "boolean"},
        "fleet": {"type": "object", "description": "with nats_url: which instances answered "
                  "(the live taps of all of them are listed)", "properties": {
                      "instance": {"type": "string"},
                      "answered": {"type": "array", "items": {"type": "string"}},
                      "missing": {"type": "array", "items": {"type": "string"}},
                      "reachable": {"type": "boolean"},
                      "truncated": {"type": "integer", "description": "live taps left out: an "
                                    "instance's answer must fit NATS's max_payload"}}},
        "archive": {"type": "object", "description": "with archive_url: the archive's "
                    "listing (refreshed at most every 15 s); while `unreachable`, only local "
                    "recordings are listed", "properties": {
                        "state": {"type": "string", "enum": ["listing", "ok", "unreachable"]},
                        "problem": {"type": ["string", "null"]},
                        "listed": {"type": "integer"},
                        "listed_at": {"type": ["string", "null"]},
                        "encrypted": {"type": "integer", "description": "age-encrypted "
                                      "sidecars: not readable here, not listed"},
                        "unreadable": {"type": "integer"},
                        "pending": {"type": "integer", "description": "sidecars not fetched "
                                    "yet (listed by a later refresh)"},
                        "truncated": {"type": "boolean"}}}}},
    "TapDetail": {"allOf": [_ref("TapSummary"), {"type": "object", "properties": {
        "sidecar": {"type": ["object", "null"], "description": "the JSON sidecar (README)"},
        "live": {"type": ["object", "null"], "description": "while recording: frames, "
                 "frames_written, duration_seconds, elapsed_seconds, rtp"},
        "markers": {"type": "array", "items": {"type": "object", "properties": {
            "type": {"type": "string"}, "at": {"type": "number"}, "label": {"type": "string"},
            "duration": {"type": "number"}}}},
        "wav": {"type": ["object", "null"]}}}]},
    "Waveform": {"type": "object", "properties": {
        "name": {"type": "string"}, "frames": {"type": "integer"},
        "sample_rate": {"type": "integer"}, "channels": {"type": "integer"},
        "duration_seconds": {"type": "number"}, "columns": {"type": "integer"},
        "min": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
        "max": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}}}},
    "Levels": {"type": "object", "properties": {
        "name": {"type": "string"}, "channels": {"type": "array", "items": {"type": "object"}},
        "longest_silence": {"type": "object"}, "silence_threshold_dbfs": {"type": "number"}},
        "additionalProperties": True},
    "Registration": {"type": "object", "required": ["tap_id"], "properties": {
        "tap_id": {"type": "string", "pattern": TAP_ID_PATTERN},
        "codec": {"type": "string", "enum": ["PCMU", "PCMA", "G722", "OPUS"], "default": "PCMU",
                  "description": "OPUS: the stream's first dynamic payload type is Opus"},
        "ptime": {"type": "integer", "minimum": 10, "maximum": 120, "multipleOf": 10,
                  "default": 20},
        "source": {"type": "string", "description": "ip:port of the sender on the shared RTP "
                   "port; without it a port of rtp_port_range is reserved"}}},
    "RegistrationAnswer": {"type": "object", "properties": {
        "tap_id": {"type": "string"},
        "rtp": {"type": "object", "properties": {"address": {"type": "string"},
                                                 "port": {"type": "integer"}}},
        "device": {"type": "object", "description": "a SignalWire RTP device: type rtp, params "
                   "addr (public_address, else public_url's host, else the request's Host), "
                   "port, codec, ptime"},
        "source": {"type": "string"}}},
    "TapStatusEvent": {"type": "object", "description": "a calling.call.tap event (or its "
                       "params): control_id, state tapping|finished, device, call_id, ...",
                       "additionalProperties": True},
}  # fmt: skip


def _under_prefix(path: str, item: dict[str, Any]) -> dict[str, Any]:
    """The same operations with the token in the path instead."""
    variant = copy.deepcopy(item)
    for operation in variant.values():
        operation["operationId"] += "WithPathToken"
        operation["security"] = NO_SECURITY
        operation["parameters"] = [_path("token", "the receiver's token"),
                                   *operation.get("parameters", [])]  # fmt: skip
    return variant


def document() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for path, item in PATHS.items():
        paths[path] = item
        if path not in NOT_UNDER_PREFIX:
            paths[PATH_TOKEN + path] = _under_prefix(path, item)
    paths.update(ONLY_UNDER_PREFIX)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "tap-receiver",
            "version": __version__,
            "description": "Records live call-audio taps (WebSocket and RTP) into per-tap WAV "
            "files with JSON sidecars. Every route that takes the token accepts it as "
            "`Authorization: Bearer`, as `?token=`, or in the path under `/t/{token}`. Errors "
            'are JSON: `{"error", "status"}`. HEAD is answered wherever GET is.',
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "tokenQuery": {"type": "apiKey", "in": "query", "name": "token"},
            },
        },
    }


class OpenApi:
    """Serves the document (built once)."""

    def __init__(self) -> None:
        self.document = document()

    def add_routes(self, app: web.Application) -> None:
        for prefix in ("", PATH_TOKEN):
            app.router.add_get(prefix + "/api/openapi.json", self.serve)

    async def serve(self, _: web.Request) -> web.Response:
        return web.json_response(self.document)
