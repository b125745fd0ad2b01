"""Every setting in one place: TOML key, `RECEIVER_*` environment variable and `--flag`.

Precedence: command line > environment > config file > built-in default. Each setting is declared
once in `SETTINGS`; the argument parser, the environment reader, the file reader, the shipped
`config/receiver.toml` (checked by a test) and the README table all follow from that list.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ENV_PREFIX = "RECEIVER_"
LOG_LEVELS = ("debug", "info", "warning", "error")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmg]?)(?:i?b)?\s*$", re.IGNORECASE)
_TOKEN_RE = re.compile(r"^[A-Za-z0-9._~-]{8,256}$")


class ConfigError(Exception):
    """A bad setting: the message names the key and the problem, and is shown as one line."""


@dataclass(frozen=True)
class Setting:
    key: str
    kind: str  # str | int | float | bool | size | path
    default: Any
    help: str
    check: Callable[[Any], str | None] | None = None  # returns a problem, or None when fine
    choices: tuple[str, ...] = ()  # for string settings with a fixed set of (lower-case) values

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper()


def _port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else "must be a port number from 0 to 65535"


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _between(low: float, high: float) -> Callable[[float], str | None]:
    def check(value: float) -> str | None:
        return None if low <= value <= high else f"must be between {low:g} and {high:g}"

    return check


def parse_port_range(text: str) -> range | None:
    """'20000-20999' -> range(20000, 21000); '' -> None. Raises ValueError."""
    if not text.strip():
        return None
    low, sep, high = text.partition("-")
    try:
        first, last = int(low), int(high if sep else low)
    except ValueError:
        raise ValueError("must be FIRST-LAST, e.g. 20000-20999") from None
    if not 1 <= first <= last <= 65535:
        raise ValueError("must be FIRST-LAST with 1 <= FIRST <= LAST <= 65535")
    return range(first, last + 1)


def _port_range_problem(value: str) -> str | None:
    try:
        parse_port_range(value)
    except ValueError as exc:
        return str(exc)
    return None


def parse_cidrs(text: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """'10.0.0.0/8, 2001:db8::/32' -> networks. Raises ValueError."""
    return [
        ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip()
    ]


def _cidrs_problem(value: str) -> str | None:
    try:
        parse_cidrs(value)
    except ValueError as exc:
        return f"must be comma-separated CIDR networks ({exc})"
    return None


def worker_count(value: str) -> int:
    """'auto' -> CPU cores, '3' -> 3. Raises ValueError."""
    if value.strip().lower() == "auto":
        return max(
            1,
            len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else os.cpu_count() or 1,
        )
    count = int(value)
    if not 1 <= count <= 256:
        raise ValueError("must be 1 to 256 or auto")
    return count


def _workers_problem(value: str) -> str | None:
    try:
        worker_count(value)
    except ValueError:
        return "must be a number from 1 to 256, or auto"
    return None


def nats_servers(text: str) -> list[str]:
    """'nats://a:4222, nats://b:4222' -> the server URLs; '' -> []. Raises ValueError."""
    servers = [part.strip() for part in text.split(",") if part.strip()]
    for server in servers:
        parts = urlsplit(server)
        if parts.scheme not in ("nats", "tls") or not parts.hostname:
            raise ValueError("must be nats://host:port or tls://host:port (comma-separated)")
        try:
            _ = parts.port  # a bad port raises
        except ValueError:
            raise ValueError("has a bad port") from None
    return servers


def _nats_url(value: str) -> str | None:
    try:
        nats_servers(value)
    except ValueError as exc:
        return str(exc)
    return None


_INSTANCE_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _instance_name(value: str) -> str | None:
    if value == "" or _INSTANCE_RE.match(value):
        return None
    return "must be 1-64 letters, digits, - or _"


PUBLIC_URL_SCHEMES = {"http": "http", "https": "https", "ws": "http", "wss": "https"}


def normalize_public_url(text: str) -> str:
    """'wss://tap.example.com/' -> 'https://tap.example.com': the HTTP base URL (scheme, host,
    port, an optional path prefix) callers reach this server at; '' stays ''. Raises ValueError."""
    text = text.strip()
    if not text:
        return ""
    parts = urlsplit(text)
    scheme = PUBLIC_URL_SCHEMES.get(parts.scheme.lower())
    if scheme is None:
        raise ValueError("must start with https://, wss://, http:// or ws://")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("has a bad port") from None
    if not parts.hostname:
        raise ValueError("must name a host, e.g. https://tap.example.com")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry a user name or password")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query string or fragment")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    netloc = host if port is None else f"{host}:{port}"
    return f"{scheme}://{netloc}{parts.path.rstrip('/')}"


def _public_url(value: str) -> str | None:
    try:
        normalize_public_url(value)
    except ValueError as exc:
        return str(exc)
    return None


def _token(value: str) -> str | None:
    if value == "" or _TOKEN_RE.match(value):
        return None
    return "must be 8 to 256 characters from A-Z a-z 0-9 . _ ~ - (it goes into the tap URI)"


def _archive_url_problem(value: str) -> str | None:
    if not value:
        return None
    try:
        parse_archive_url(value)
    except ValueError as exc:
        return str(exc)
    return None


def parse_archive_url(text: str) -> tuple[str, str]:
    """'s3://bucket/some/prefix/' -> ('bucket', 'some/prefix'). Raises ValueError."""
    parts = urlsplit(text.strip())
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError("must be s3://BUCKET or s3://BUCKET/PREFIX")
    if parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError("must be s3://BUCKET/PREFIX, without user, query or fragment")
    return parts.netloc, parts.path.strip("/")


def _recipients_problem(value: str) -> str | None:
    from receiver.archive.encryption import load_recipients  # pyrage only when it is used

    try:
        load_recipients(parse_recipients(value))
    except ValueError as exc:
        return str(exc)
    return None


def _endpoint_problem(value: str) -> str | None:
    if not value:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL, e.g. http://minio:9000"
    return None


SETTINGS: tuple[Setting, ...] = (
    Setting("host", "str", "0.0.0.0", "Address the HTTP/WebSocket and RTP listeners bind to."),
    Setting("http_port", "int", 8080, "TCP port for HTTP, WebSocket taps and /healthz.", _port),
    Setting("rtp_port", "int", 5004, "UDP port for RTP taps.", _port),
    Setting("recordings", "path", "./recordings", "Directory for WAV files and sidecars."),
    Setting("log_level", "str", "info", "debug, info, warning or error.", choices=LOG_LEVELS),
    Setting(
        "token",
        "str",
        "",
        "Secret every tap must present. Empty: generated once, kept in <recordings>/"
        ".receiver-token.",
        _token,
    ),
    Setting("no_auth", "bool", False, "Accept taps without a token (logs a warning)."),
    Setting(
        "tls_cert",
        "str",
        "",
        "PEM certificate (chain) file: serve https/wss directly. Needs tls_key.",
    ),
    Setting("tls_key", "str", "", "PEM private key file for tls_cert."),
    Setting(
        "workers",
        "str",
        "1",
        "Processes sharing the ports (SO_REUSEPORT); 'auto' = one per CPU core.",
        _workers_problem,
    ),
    Setting(
        "ws_max_taps",
        "int",
        10000,
        "Concurrent WebSocket taps (per worker); more are refused with 503.",
        _between(1, 1_000_000),
    ),
    Setting(
        "max_tap_duration",
        "float",
        0.0,
        "Longest recording in seconds (0: no limit); then max_tap_duration_action.",
        _between(0, 10 * 365 * 86400),
    ),
    Setting(
        "max_tap_duration_action",
        "str",
        "split",
        "At max_tap_duration: split (finalize, go on in a .N segment) or stop.",
        choices=("split", "stop"),
    ),
    Setting(
        "live_interval",
        "float",
        0.2,
        "Seconds between updates of live listeners (GET /api/taps/{name}/live) and of live audio "
        "on NATS (live_nats): how far their audio trails what the timeline has placed, and the "
        "length of a NATS message's audio.",
        _between(0.02, 1.0),
    ),
    Setting(
        "live_queue_seconds",
        "float",
        2.0,
        "Seconds of audio one live listener may have waiting; what it cannot take beyond that "
        "is dropped (counted, and it is told by a gap marker), never delaying the recording.",
        _between(0.1, 60),
    ),
    Setting(
        "live_max_subscribers",
        "int",
        10000,
        "Live listeners at once, all taps together; more are refused (503).",
        _between(0, 1_000_000),
    ),
    Setting(
        "live_nats",
        "bool",
        False,
        "With nats_url: publish every recording tap's decoded audio on NATS "
        "(tap-receiver.live.<instance>.<tap id>, one message per live_interval). Costs CPU "
        "whether anyone subscribes or not: every tap's audio is decoded a second time, on the "
        "event loop (Opus and G.722 above all), and sent to NATS.",
    ),
    Setting(
        "new_tap_rate_limit",
        "float",
        0.0,
        "New taps per second allowed from one source address (0: no limit; a media server "
        "may legitimately start thousands).",
        _between(0, 1_000_000),
    ),
    Setting(
        "min_free_space",
        "size",
        1024**3,
        "Free space the recordings directory must keep: below it new taps are refused (503) "
        "and open taps are finalized.",
        _between(0, 2**62),
    ),
    Setting(
        "http_allow",
        "str",
        "",
        "CIDR allow-list for HTTP/WebSocket clients, comma-separated (empty: everyone).",
        lambda v: _cidrs_problem(v),
    ),
    Setting(
        "rtp_allow",
        "str",
        "",
        "CIDR allow-list for RTP senders, comma-separated (empty: everyone).",
        lambda v: _cidrs_problem(v),
    ),
    Setting(
        "http_request_timeout",
        "float",
        10.0,
        "Seconds a client has to send its request (or WebSocket upgrade) after connecting.",
        _between(0.1, 3600),
    ),
    Setting(
        "flush_interval",
        "float",
        1.0,
        "Seconds of audio buffered per tap before a batch is written (the taps take turns in "
        "slices, one about every 0.1 s: a tenth of them at the default, so flushing thousands "
        "of taps never holds the event loop for long).",
        _between(0.05, 60),
    ),
    Setting(
        "max_unwritten_seconds",
        "float",
        10.0,
        "Seconds of audio one tap may hold while the disk is behind; beyond it, its audio becomes "
        "silence of the same length (counted: dropped_overflow_frames).",
        _between(1, 3600),
    ),
    Setting(
        "max_unwritten_bytes",
        "size",
        256 * 1024 * 1024,
        "Audio handed to the disk writer and not yet written, all taps together; beyond it, taps "
        "keep their audio (up to max_unwritten_seconds) and new taps are refused.",
        _between(1024 * 1024, 2**40),
    ),
    Setting(
        "max_opening_seconds",
        "float",
        10.0,
        "New taps' files are created at a paced rate, in arrival order; while the taps waiting "
        "for theirs would wait longer than this, new taps are refused (503; RTP refused_overload).",
        _between(0.1, 60),
    ),
    Setting(
        "max_load",
        "float",
        0.8,
        "Share of its core the event loop may be busy (averaged over about a second) before new "
        "taps are refused (503; RTP refused_overload), so the taps it has stay exact.",
        _between(0.1, 1.0),
    ),
    Setting(
        "ws_max_message_size",
        "size",
        64 * 1024,
        "Largest WebSocket message accepted; a bigger one closes the tap with 1009.",
        _positive,
    ),
    Setting(
        "ws_heartbeat",
        "float",
        30.0,
        "Seconds between WebSocket pings; a peer that stops answering is closed (0: off).",
        _between(0, 3600),
    ),
    Setting(
        "stream_jitter_ms",
        "int",
        1000,
        "Media Streams JSON: milliseconds of later audio a missing or out-of-order chunk is "
        "waited for before its place becomes silence.",
        _between(0, 10000),
    ),
    Setting(
        "stream_split_tracks",
        "bool",
        False,
        "Media Streams with both tracks: also write one mono WAV per track next to the stereo one.",
    ),
    Setting(
        "stream_l16_byte_order",
        "str",
        "little",
        "Byte order of audio/x-L16 payloads in Media Streams JSON: little or big.",
        choices=("little", "big"),
    ),
    Setting(
        "shutdown_timeout",
        "float",
        4.0,
        "Seconds SIGTERM waits for open taps to be finalized.",
        _between(0.1, 60),
    ),
    Setting(
        "rtp_idle_timeout",
        "float",
        5.0,
        "Seconds without a packet after which an RTP tap is finalized.",
        _between(0.1, 3600),
    ),
    Setting(
        "rtp_jitter_ms",
        "int",
        200,
        "Jitter window in milliseconds: how long a gap waits for late packets.",
        _between(0, 5000),
    ),
    Setting(
        "rtp_max_gap",
        "float",
        30.0,
        "Longest timestamp gap (seconds) filled with silence; longer is a discontinuity.",
        _between(0.1, 86400),
    ),
    Setting(
        "rtp_max_streams",
        "int",
        10000,
        "Concurrent RTP streams; new sources beyond it are refused.",
        _between(1, 1_000_000),
    ),
    Setting(
        "rtp_recv_buffer",
        "size",
        32 * 1024 * 1024,
        "SO_RCVBUF requested for the RTP socket (the kernel may grant less); also the most "
        "the receiver reads ahead into its own memory while a burst of new streams keeps it busy.",
        _positive,
    ),
    Setting(
        "rtp_port_range",
        "str",
        "",
        "Per-tap RTP ports (e.g. 20000-20999) handed out by POST /api/taps; empty: off.",
        lambda v: _port_range_problem(v),
    ),
    Setting(
        "rtp_registration_timeout",
        "float",
        120.0,
        "Seconds a registered RTP tap waits for its first packet before its port is released.",
        _between(1, 86400),
    ),
    Setting(
        "public_address",
        "str",
        "",
        "Address for RTP in the start-up banner and in the SignalWire device objects this server "
        "hands out (SignalWire needs a public IPv4); empty: the host of public_url, else the Host "
        "of the request.",
    ),
    Setting(
        "public_url",
        "str",
        "",
        "Where callers reach this server, e.g. https://tap.example.com behind a TLS proxy: the "
        "start-up banner, the page and the registration API build the URIs to paste from it; "
        "empty: this machine's address, http_port, and wss:// only with tls_cert.",
        _public_url,
    ),
    Setting(
        "webhook_url",
        "str",
        "",
        "POST each finalized tap's sidecar JSON here (signed, retried); empty: off.",
    ),
    Setting(
        "webhook_secret",
        "str",
        "",
        "Key of the HMAC-SHA256 signature in the X-Tap-Receiver-Signature header.",
    ),
    Setting(
        "nats_url",
        "str",
        "",
        "NATS server of the fleet's control plane (nats://host:4222; several, comma-separated, "
        "for a NATS cluster): the receivers and workers that share it list each other's live "
        "taps and pass on registrations and status callbacks; empty: this receiver is on its own.",
        _nats_url,
    ),
    Setting(
        "instance_name",
        "str",
        "",
        "This receiver's name in the fleet (letters, digits, - and _); empty: the host name and "
        "http_port. Under --workers each worker adds -w<N>.",
        _instance_name,
    ),
    Setting(
        "log_format",
        "str",
        "text",
        "Log lines as text or json (one object per line).",
        choices=("text", "json"),
    ),
    Setting(
        "archive_url",
        "str",
        "",
        "Object store each finished recording is uploaded to, s3://bucket/prefix (credentials "
        "from the standard AWS variables and files); empty: off.",
        lambda v: _archive_url_problem(v),
    ),
    Setting(
        "archive_endpoint",
        "str",
        "",
        "URL of an S3-compatible store (MinIO, Ceph, R2, ...); empty: AWS S3.",
        lambda v: _endpoint_problem(v),
    ),
    Setting(
        "archive_recipients",
        "str",
        "",
        "age public keys (age1..., comma-separated): what is uploaded is encrypted for them; "
        "empty: uploaded as is.",
        lambda v: _recipients_problem(v),
    ),
    Setting(
        "archive_concurrency",
        "int",
        4,
        "Files uploaded at once.",
        _between(1, 64),
    ),
    Setting(
        "archive_part_size",
        "size",
        16 * 1024 * 1024,
        "Files larger than this are uploaded in parts of this size (multipart); S3 and most "
        "compatible stores need at least 5 MiB.",
        _between(256 * 1024, 5 * 1024**3),
    ),
    Setting(
        "archive_delete_local",
        "bool",
        False,
        "Delete a recording's local audio once the store has confirmed its upload (its sidecar "
        "stays, saying where the audio is).",
    ),
    Setting(
        "retention_max_age",
        "float",
        0.0,
        "Seconds a finished recording's audio is kept locally, then deleted (0: forever); with "
        "archive_url, only once it is archived.",
        _between(0, 100 * 365 * 86400),
    ),
    Setting(
        "retention_max_bytes",
        "size",
        0,
        "Local audio kept within this many bytes, oldest finished recordings deleted first "
        "(0: no limit); with archive_url, only archived ones.",
        _between(0, 2**62),
    ),
    Setting(
        "rtp_dtmf_payload_type",
        "int",
        101,
        "RTP payload type of RFC 4733 telephone-events (DTMF).",
        _between(96, 127),
    ),
    Setting(
        "rtp_payload_types",
        "str",
        "111=opus",
        "Dynamic RTP payload types and their codecs, as PT=CODEC[,PT=CODEC...] (PT 96-127; "
        "CODEC opus, g722, pcmu or pcma), for streams on the shared port and pool ports alike "
        "(a registered tap's codec also maps its stream's first dynamic payload type). The "
        "static ones are always known: 0 PCMU, 8 PCMA, 9 G.722.",
        lambda text: _payload_types_problem(text),
    ),
)

RTP_DYNAMIC_CODECS = ("opus", "g722", "pcmu", "pcma")


def parse_payload_types(text: str) -> dict[int, str]:
    """'111=opus, 112=g722' -> {111: 'opus', 112: 'g722'}; '' -> {}. Raises ValueError."""
    mapping: dict[int, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        pt, sep, codec = item.partition("=")
        codec = codec.strip().lower()
        try:
            number = int(pt)
        except ValueError:
            raise ValueError(f"{item.strip()!r} is not PT=CODEC") from None
        if not sep or not 96 <= number <= 127 or codec not in RTP_DYNAMIC_CODECS:
            raise ValueError(
                f"{item.strip()!r}: PT must be 96-127 and CODEC one of "
                + ", ".join(RTP_DYNAMIC_CODECS)
            )
        mapping[number] = codec
    return mapping


def _payload_types_problem(text: str) -> str | None:
    try:
        parse_payload_types(text)
    except ValueError as exc:
        return str(exc)
    return None


_BY_KEY = {s.key: s for s in SETTINGS}


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Where the server listens and how it starts and stops."""

    host: str
    http_port: int
    rtp_port: int
    tls_cert: str
    tls_key: str
    workers: int  # `workers`, with 'auto' resolved to the CPU cores
    public_address: str
    public_url: str  # normalized: http(s)://host[:port][/prefix], or ""
    http_request_timeout: float
    shutdown_timeout: float


@dataclass(frozen=True, slots=True)
class AuthSettings:
    token: str
    no_auth: bool


@dataclass(frozen=True, slots=True)
class StorageSettings:
    recordings: Path
    flush_interval: float
    max_unwritten_seconds: float
    max_unwritten_bytes: int
    min_free_space: int
    max_tap_duration: float
    max_tap_duration_action: str  # "split" or "stop"


@dataclass(frozen=True, slots=True)
class LiveSettings:
    interval: float
    queue_seconds: float
    max_subscribers: int
    nats: bool  # `live_nats`: every recording tap's audio on NATS too (needs nats_url)


@dataclass(frozen=True, slots=True)
class LimitSettings:
    """Who may start a tap and how many may run (see receiver.taps.admission)."""

    ws_max_taps: int
    rtp_max_streams: int
    new_tap_rate_limit: float
    max_opening_seconds: float
    max_load: float
    http_allow: tuple[IPNetwork, ...]
    rtp_allow: tuple[IPNetwork, ...]


@dataclass(frozen=True, slots=True)
class WsSettings:
    max_message_size: int
    heartbeat: float
    stream_jitter_ms: int
    stream_split_tracks: bool
    stream_l16_big_endian: bool  # `stream_l16_byte_order = "big"`


@dataclass(frozen=True, slots=True)
class RtpSettings:
    idle_timeout: float
    jitter_window: float  # seconds (the setting `rtp_jitter_ms`)
    max_gap: float
    recv_buffer: int
    port_range: range | None
    registration_timeout: float
    dtmf_payload_type: int
    payload_types: dict[int, str]  # dynamic payload types -> codec names (`rtp_payload_types`)


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    url: str
    secret: str


@dataclass(frozen=True, slots=True)
class ArchiveSettings:
    """Object storage and local retention (receiver.archive)."""

    bucket: str  # "" when archiving is off
    prefix: str  # key prefix without a trailing slash, may be ""
    endpoint: str
    recipients: tuple[str, ...]  # age public keys
    concurrency: int
    part_size: int
    delete_local: bool
    retention_max_age: float
    retention_max_bytes: int

    @property
    def enabled(self) -> bool:
        return bool(self.bucket)


@dataclass(frozen=True, slots=True)
class FleetSettings:
    """The control plane shared by several receivers (receiver.fleet); off without nats_url."""

    nats_servers: tuple[str, ...]
    instance_name: str  # "" = the host name and http_port


@dataclass(frozen=True, slots=True)
class LogSettings:
    level: str
    format: str


@dataclass(frozen=True, slots=True)
class Config:
    """The merged settings, parsed once into typed groups; each part of the server receives the
    group it needs. Built only by `load` (or `from_argv`); defaults live in SETTINGS."""

    server: ServerSettings
    auth: AuthSettings
    storage: StorageSettings
    limits: LimitSettings
    live: LiveSettings
    ws: WsSettings
    rtp: RtpSettings
    webhooks: WebhookSettings
    fleet: FleetSettings
    log: LogSettings
    archive: ArchiveSettings
    settings: Mapping[str, Any]  # every setting by its key, as merged (before grouping)
    config_file: Path | None = None

    def replace(self, **changes: Any) -> Config:
        """The same settings with some changed, by key (`rtp_port=5006`)."""
        unknown = set(changes) - _BY_KEY.keys()
        if unknown:
            raise TypeError(f"unknown settings: {', '.join(sorted(unknown))}")
        return build({**self.settings, **changes}, self.config_file)


def build(values: Mapping[str, Any], config_file: Path | None = None) -> Config:
    """Typed groups from merged, converted values (one per key of SETTINGS)."""
    v = dict(values)
    return Config(
        server=ServerSettings(
            host=v["host"],
            http_port=v["http_port"],
            rtp_port=v["rtp_port"],
            tls_cert=v["tls_cert"],
            tls_key=v["tls_key"],
            workers=worker_count(v["workers"]),
            public_address=v["public_address"],
            public_url=normalize_public_url(v["public_url"]),
            http_request_timeout=v["http_request_timeout"],
            shutdown_timeout=v["shutdown_timeout"],
        ),
        auth=AuthSettings(token=v["token"], no_auth=v["no_auth"]),
        storage=StorageSettings(
            recordings=v["recordings"],
            flush_interval=v["flush_interval"],
            max_unwritten_seconds=v["max_unwritten_seconds"],
            max_unwritten_bytes=v["max_unwritten_bytes"],
            min_free_space=v["min_free_space"],
            max_tap_duration=v["max_tap_duration"],
            max_tap_duration_action=v["max_tap_duration_action"],
        ),
        limits=LimitSettings(
            ws_max_taps=v["ws_max_taps"],
            rtp_max_streams=v["rtp_max_streams"],
            new_tap_rate_limit=v["new_tap_rate_limit"],
            max_opening_seconds=v["max_opening_seconds"],
            max_load=v["max_load"],
            http_allow=tuple(parse_cidrs(v["http_allow"])),
            rtp_allow=tuple(parse_cidrs(v["rtp_allow"])),
        ),
        live=LiveSettings(
            interval=v["live_interval"],
            queue_seconds=v["live_queue_seconds"],
            max_subscribers=v["live_max_subscribers"],
            nats=v["live_nats"],
        ),
        ws=WsSettings(
            max_message_size=v["ws_max_message_size"],
            heartbeat=v["ws_heartbeat"],
            stream_jitter_ms=v["stream_jitter_ms"],
            stream_split_tracks=v["stream_split_tracks"],
            stream_l16_big_endian=v["stream_l16_byte_order"] == "big",
        ),
        rtp=RtpSettings(
            idle_timeout=v["rtp_idle_timeout"],
            jitter_window=v["rtp_jitter_ms"] / 1000,
            max_gap=v["rtp_max_gap"],
            recv_buffer=v["rtp_recv_buffer"],
            port_range=parse_port_range(v["rtp_port_range"]),
            registration_timeout=v["rtp_registration_timeout"],
            dtmf_payload_type=v["rtp_dtmf_payload_type"],
            payload_types=parse_payload_types(v["rtp_payload_types"]),
        ),
        webhooks=WebhookSettings(url=v["webhook_url"], secret=v["webhook_secret"]),
        fleet=FleetSettings(
            nats_servers=tuple(nats_servers(v["nats_url"])),
            instance_name=v["instance_name"],
        ),
        log=LogSettings(level=v["log_level"], format=v["log_format"]),
        archive=_archive_settings(v),
        settings=v,
        config_file=config_file,
    )


def parse_recipients(text: str) -> tuple[str, ...]:
    """'age1..., age1...' -> the keys (separated by commas or white space)."""
    return tuple(part for part in re.split(r"[\s,]+", text) if part)


def _archive_settings(v: Mapping[str, Any]) -> ArchiveSettings:
    bucket, prefix = parse_archive_url(v["archive_url"]) if v["archive_url"] else ("", "")
    return ArchiveSettings(
        bucket=bucket,
        prefix=prefix,
        endpoint=v["archive_endpoint"].rstrip("/"),
        recipients=parse_recipients(v["archive_recipients"]),
        concurrency=v["archive_concurrency"],
        part_size=v["archive_part_size"],
        delete_local=v["archive_delete_local"],
        retention_max_age=v["retention_max_age"],
        retention_max_bytes=v["retention_max_bytes"],
    )


def parse_size(text: str) -> int:
    """'65536', '64K', '4MiB', '1G' -> bytes (binary multiples)."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError("must be a number of bytes, optionally with a K, M or G suffix")
    number, unit = match.groups()
    return int(number) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit.lower()]


def _convert(setting: Setting, raw: Any, source: str) -> Any:
    """Turn a raw value (TOML value, or a string from env/CLI) into the setting's type."""
    where = f"{setting.key} (from {source})"
    try:
        value: Any
        if setting.kind == "bool":
            if isinstance(raw, bool):
                value = raw
            elif isinstance(raw, str) and raw.strip().lower() in ("1", "true", "yes", "on"):
                value = True
            elif isinstance(raw, str) and raw.strip().lower() in ("0", "false", "no", "off", ""):
                value = False
            else:
                raise ValueError("must be true or false")
        elif setting.kind == "int":
            if isinstance(raw, bool) or not isinstance(raw, int | str):
                raise ValueError("must be a whole number")
            value = int(raw)
        elif setting.kind == "float":
            if isinstance(raw, bool) or not isinstance(raw, int | float | str):
                raise ValueError("must be a number")
            value = float(raw)
        elif setting.kind == "size":
            if isinstance(raw, bool):
                raise ValueError("must be a number of bytes")
            value = raw if isinstance(raw, int) else parse_size(str(raw))
        elif setting.kind == "path":
            if not isinstance(raw, str) or not raw:
                raise ValueError("must be a non-empty path")
            value = Path(raw).expanduser()
        else:
            if not isinstance(raw, str):
                raise ValueError("must be a string")
            value = raw.strip().lower() if setting.choices else raw
            if setting.choices and value not in setting.choices:
                raise ValueError(f"{value!r} must be one of " + ", ".join(setting.choices))
    except ValueError as exc:
        problem = str(exc) if "must" in str(exc) else f"{raw!r} is not a valid {setting.kind}"
        raise ConfigError(f"{where}: {problem}") from None
    if setting.check is not None:
        check_problem = setting.check(value)
        if check_problem:
            raise ConfigError(f"{where}: {value!r} {check_problem}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One `--kebab-case` flag per setting; None means "not given" so precedence can apply."""
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=None,
        help=f"TOML configuration file (env {ENV_PREFIX}CONFIG).",
    )
    for s in SETTINGS:
        text = f"{s.help} Default: {s.default!r}. Env {s.env}."
        if s.kind == "bool":
            parser.add_argument(s.flag, dest=s.key, action="store_const", const=True, help=text)
        else:
            parser.add_argument(s.flag, dest=s.key, metavar=s.key.upper(), help=text)


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config: file {str(path)!r} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config: cannot read {str(path)!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {str(path)!r} is not valid TOML: {exc}") from None
    for key in data:
        if key not in _BY_KEY:
            raise ConfigError(f"{key} (from {path}): unknown setting")
    return data


def load(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[Config, list[str]]:
    """Merge defaults, file, environment and command line. Returns the config and warnings."""
    warnings: list[str] = []
    config_path = args.config or environ.get(ENV_PREFIX + "CONFIG") or None
    file_values = _read_file(Path(config_path)) if config_path else {}
    known_env = {s.env for s in SETTINGS} | {ENV_PREFIX + "CONFIG"}
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in known_env:
            warnings.append(f"ignoring unknown environment variable {name}")
    values: dict[str, Any] = {}
    for s in SETTINGS:
        cli_value = getattr(args, s.key, None)
        if cli_value is not None:
            values[s.key] = _convert(s, cli_value, s.flag)
        elif s.env in environ:
            values[s.key] = _convert(s, environ[s.env], s.env)
        elif s.key in file_values:
            values[s.key] = _convert(s, file_values[s.key], str(config_path))
        else:
            values[s.key] = _convert(s, s.default, "default")
    if values["webhook_url"] and not values["webhook_secret"]:
        raise ConfigError("webhook_secret: required when webhook_url is set (it signs the body)")
    if (values["archive_delete_local"] or values["archive_recipients"]) and not values[
        "archive_url"
    ]:
        raise ConfigError(
            "archive_delete_local, archive_recipients: need archive_url (where the recordings go)"
        )
    if values["live_nats"] and not values["nats_url"]:
        raise ConfigError("live_nats: needs nats_url (the NATS server the audio goes to)")
    if bool(values["tls_cert"]) != bool(values["tls_key"]):
        raise ConfigError("tls_cert, tls_key: give both (certificate and private key) or neither")
    return build(values, Path(config_path) if config_path else None), warnings


def from_argv(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Config:
    """Convenience for tests and embedding: parse flags like the command line does."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config, _ = load(parser.parse_args(list(argv)), os.environ if environ is None else environ)
    return config


def one_setting(key: str, environ: Mapping[str, str]) -> Any:
    """One setting without the command line: environment > config file (RECEIVER_CONFIG) >
    default; for commands that need only it (`tap-receiver ls` and the recordings directory).
    Raises ConfigError."""
    setting = _BY_KEY[key]
    if setting.env in environ:
        return _convert(setting, environ[setting.env], setting.env)
    config_path = environ.get(ENV_PREFIX + "CONFIG")
    if config_path:
        file_values = _read_file(Path(config_path))
        if key in file_values:
            return _convert(setting, file_values[key], config_path)
    return _convert(setting, setting.default, "default")
