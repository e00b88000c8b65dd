"""Logging: ``logs/app.log`` with rotation, every record tagged with the request id and owner.

``text`` (the default) writes one readable line per record; ``json`` writes one JSON object per
line (python-json-logger) with ``time``, ``level``, ``logger``, ``message``, ``request_id``,
``owner`` and whatever the record carries as ``extra`` (the request log adds ``method``,
``path``, ``endpoint``, ``status``, ``duration_ms`` and ``client``).
"""

from __future__ import annotations

import contextvars
import logging
import logging.handlers
import sys
from pathlib import Path

from flask import g, has_request_context

__all__ = ["configure_logging", "current_request_id", "job_request_id", "make_formatter"]

FORMAT = "%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s"
JSON_FIELDS = "%(levelname)s %(name)s %(message)s %(request_id)s %(owner)s"


# Set while a job runs in a worker thread, so its log lines carry the submitting request's id.
job_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "job_request_id", default=None
)


def current_request_id() -> str | None:
    """The id of the request being served, or of the request whose job is running."""
    if has_request_context():
        return getattr(g, "request_id", None)
    return job_request_id.get()


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (the current request's or job's, or '-') and ``owner`` to records."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id() or getattr(record, "request_id", "-")
        if not hasattr(record, "owner"):
            record.owner = g.get("owner") if has_request_context() else None
        return True


def make_formatter(log_format: str = "text") -> logging.Formatter:
    """The formatter of ``S2I_LOG_FORMAT``: readable lines, or one JSON object per line."""
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        return JsonFormatter(
            JSON_FIELDS,
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp="time",
            json_ensure_ascii=False,
        )
    return logging.Formatter(FORMAT)


# Libraries whose own messages belong in app.log: Flask-Limiter says there when its storage
# (Redis) fails and when it comes back.
LIBRARY_LOGGERS = ("flask-limiter",)


def configure_logging(
    log_dir: Path, level: str, max_bytes: int, backup_count: int, log_format: str = "text"
) -> Path:
    """Send the package's logs to ``log_dir/app.log`` (rotated) and stderr; idempotent."""
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / "app.log"
    loggers = [logging.getLogger(name) for name in ("speech2image", *LIBRARY_LOGGERS)]
    for logger in loggers:
        for handler in list(logger.handlers):
            if getattr(handler, "_speech2image", False):
                logger.removeHandler(handler)
                handler.close()
    formatter = make_formatter(log_format)
    file_handler = logging.handlers.RotatingFileHandler(
        path, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8"
    )
    stream_handler = logging.StreamHandler(sys.stderr)
    for handler in (file_handler, stream_handler):
        handler.setFormatter(formatter)
        handler.addFilter(RequestIdFilter())
        handler._speech2image = True  # type: ignore[attr-defined]
        for logger in loggers:
            logger.addHandler(handler)
    for logger in loggers:
        logger.setLevel(level)
        logger.propagate = False
    return path
