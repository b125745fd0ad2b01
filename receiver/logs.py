"""Logging set-up: readable text lines (default) or one JSON object per line (`log_format=json`).

Lines about a tap pass their data as `extra={"fields": {...}}`; the JSON form puts those fields at
the top level, the text form appends them as key=value."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson


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
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = _fields(record)
        if fields.get("counters"):
            line += " " + " ".join(f"{k}={v}" for k, v in sorted(fields["counters"].items()))
        return line


def setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
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
