"""Log formats (`ORP_LOG_FORMAT`): `json`, one object per line, or `text`, readable lines; the
access lines and every other message (ORP's, aiohttp's, gunicorn's) follow the same choice.

An access record carries its fields as `record.access` (the message is the JSON line already,
so anything that reads the message, such as a test's log capture, still gets JSON); the text
format lays the same fields out as `key=value` pairs.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import IO, Any

from orp_proxy.protocol.sse import dumps

_TEXT_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"
# Shown first, in this order, in a text access line; the other fields follow as key=value.
_ACCESS_HEAD = ("method", "path", "status")
_ACCESS_SKIPPED = frozenset({"ts", "type", "pid", *_ACCESS_HEAD})


def _value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value if value and not any(c.isspace() or c in '"=' for c in value) \
            else dumps(value)
    if isinstance(value, int | float):
        return str(value)
    return dumps(value)


class JsonFormatter(logging.Formatter):
    """`{"ts", "type": "log", "level", "logger", "pid", "message"[, "exception"]}` per line;
    access records are their own JSON line."""

    def format(self, record: logging.LogRecord) -> str:
        if isinstance(getattr(record, "access", None), dict):
            return record.getMessage()
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "type": "log",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return dumps(line)


class TextFormatter(logging.Formatter):
    """`time [pid] LEVEL logger: message`; an access line reads `... orp.access: POST
    /v1/responses 200 request_id=... duration_ms=...`."""

    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        access = getattr(record, "access", None)
        if not isinstance(access, dict):
            return super().format(record)
        head = " ".join(_value(access.get(key)) for key in _ACCESS_HEAD)
        rest = " ".join(f"{key}={_value(value)}" for key, value in access.items()
                        if key not in _ACCESS_SKIPPED)
        saved = record.msg, record.args
        record.msg, record.args = f"{head} {rest}", None
        try:
            return super().format(record)
        finally:
            record.msg, record.args = saved


def formatter_class(log_format: str) -> type[logging.Formatter]:
    return JsonFormatter if log_format == "json" else TextFormatter


def configure_logging(level: str, log_format: str, stream: IO[str] | None = None) -> None:
    """For `orp-proxy` (the gunicorn config does the same in its logging dictionary): one
    handler on stderr for everything, access lines included, in the chosen format. aiosqlite
    stays quiet below INFO, since its DEBUG lines carry SQL parameters (message content, the
    owner-hash key)."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter_class(log_format)())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    access = logging.getLogger("orp.access")
    access.handlers[:] = []
    access.propagate = True
    logging.getLogger("aiosqlite").setLevel(max(logging.INFO, root.level))
