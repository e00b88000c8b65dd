"""Logging: ``logs/app.log`` with rotation, every record tagged with the request id."""

from __future__ import annotations

import contextvars
import logging
import logging.handlers
import sys
from pathlib import Path

from flask import g, has_request_context

__all__ = ["configure_logging", "current_request_id", "job_request_id"]

FORMAT = "%(asctime)s %(levelname)s [%(request_id)s] %(name)s: %(message)s"


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
    """Adds ``request_id`` to every record: the current request's (or job's), or '-'."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id() or getattr(record, "request_id", "-")
        return True


def configure_logging(log_dir: Path, level: str, max_bytes: int, backup_count: int) -> Path:
    """Send the package's logs to ``log_dir/app.log`` (rotated) and stderr; idempotent."""
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / "app.log"
    logger = logging.getLogger("speech2image")
    for handler in list(logger.handlers):
        if getattr(handler, "_speech2image", False):
            logger.removeHandler(handler)
            handler.close()
    formatter = logging.Formatter(FORMAT)
    file_handler = logging.handlers.RotatingFileHandler(
        path, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8"
    )
    stream_handler = logging.StreamHandler(sys.stderr)
    for handler in (file_handler, stream_handler):
        handler.setFormatter(formatter)
        handler.addFilter(RequestIdFilter())
        handler._speech2image = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return path
