"""Logging setup: readable text for a terminal, JSON lines for production (``LOG_FORMAT``).

Records carry the ids of the connection and the session they concern: the endpoint
and the worker set ``connection_id`` / ``session_id`` in context variables, which
asyncio copies into every task they start, and a filter copies them onto each record.
JSON lines come from python-json-logger (orjson flavour), one object per record with
``time``, ``level``, ``logger``, ``message`` and those ids when known.
"""

from __future__ import annotations

import logging
import re
from contextvars import ContextVar
from typing import Literal

from pythonjsonlogger.orjson import OrjsonFormatter

__all__ = [
    "LogFormat",
    "RedactTokens",
    "configure_logging",
    "connection_id_var",
    "redact_access_log",
    "session_id_var",
]

LogFormat = Literal["text", "json"]

#: The WebSocket connection the current task serves.
connection_id_var: ContextVar[str | None] = ContextVar("connection_id", default=None)
#: The session the current task works on.
session_id_var: ContextVar[str | None] = ContextVar("session_id", default=None)

_TEXT = "%(levelname)s %(name)s: %(message)s"


class ContextIds(logging.Filter):
    """Adds ``connection_id`` and ``session_id`` from the context to each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in (("connection_id", connection_id_var), ("session_id", session_id_var)):
            if getattr(record, name, None) is None:
                value = var.get()
                if value is not None:
                    setattr(record, name, value)
        return True


def formatter(fmt: LogFormat) -> logging.Formatter:
    """The formatter for ``fmt``."""
    if fmt == "json":
        return OrjsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        )
    return logging.Formatter(_TEXT)


def configure_logging(level: str = "info", fmt: LogFormat = "text") -> None:
    """Log to stderr at ``level`` in ``fmt``, replacing any earlier configuration."""
    handler = logging.StreamHandler()
    handler.addFilter(ContextIds())
    handler.setFormatter(formatter(fmt))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


_TOKEN_IN_QUERY = re.compile(r"((?:^|[?&])token=)[^&\s\"]*")


class RedactTokens(logging.Filter):
    """Replaces the value of ``token=`` in a logged request path with ``[redacted]``.

    uvicorn's access log writes every request line, and a WebSocket carries its token in
    the query (``/ws?appid=…&token=…``): a token is a credential for a minute (a JWT for
    longer), so it must not end up in log files.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                _TOKEN_IN_QUERY.sub(r"\1[redacted]", arg) if isinstance(arg, str) else arg
                for arg in record.args
            )
        elif isinstance(record.msg, str):
            record.msg = _TOKEN_IN_QUERY.sub(r"\1[redacted]", record.msg)
        return True


def redact_access_log() -> None:
    """Install ``RedactTokens`` on uvicorn's access and error loggers (once)."""
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(RedactTokens())
