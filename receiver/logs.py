"""Logging set-up: readable text lines (default) or one JSON object per line (`log_format=json`).

Lines about a tap pass their data as `extra={"fields": {...}}`; the JSON form puts those fields at
the top level, the text form appends them as key=value."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp.http_exceptions import HttpProcessingError

from receiver.redaction import redact_text


def _reveals_token(record: logging.LogRecord) -> bool:
    """Only the start-up line that tells the operator the tap URI to paste carries the token on
    purpose (`extra={"reveals_token": True}`); every other line is redacted."""
    return bool(getattr(record, "reveals_token", False))


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        line = orjson.dumps(entry, default=str).decode()
        return line if _reveals_token(record) else redact_text(line)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _fields(record)
        if fields.get("counters"):
            line += " " + " ".join(f"{k}={v}" for k, v in sorted(fields["counters"].items()))
        return line if _reveals_token(record) else redact_text(line)


class BadRequestLines(logging.Filter):
    """aiohttp logs each request it cannot parse (bytes 0xff in the request line, a broken
    header) at ERROR with a full traceback: anyone who can connect could flood the log. Such a
    request already got its 400; it is logged as one line, without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and (exc.code or 400) < 500:
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else None
            detail = str(exc.message).strip().splitlines()[0] if exc.message else type(exc).__name__
            record.msg = "refused a malformed HTTP request from %s (%d): %s"
            record.args = (remote, exc.code or 400, detail.rstrip(":"))
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(BadRequestLines())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp").setLevel(max(logging.WARNING, root.level))


class WorkerLogFilter(logging.Filter):
    """Marks each log line with the worker: `receiver.taps[1]`, and `worker` in JSON lines."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.endswith("]"):
            record.name = f"{record.name}[{self.index}]"
            fields = getattr(record, "fields", None)
            record.fields = {**(fields if isinstance(fields, dict) else {}), "worker": self.index}
        return True
