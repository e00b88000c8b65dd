"""Shared by the bench scripts (run as `python bench/NAME.py`, so this folder is on sys.path)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_service_logs(level: int = logging.WARNING) -> Iterator[None]:
    """Keep the service logging to its file, but off the console while the tables print."""
    logger = logging.getLogger("speech2image")
    saved = [
        (h, h.level)
        for h in logger.handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]
    for handler, _ in saved:
        handler.setLevel(level)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    try:
        yield
    finally:
        for handler, old in saved:
            handler.setLevel(old)
