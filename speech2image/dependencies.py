"""Whether each dependency answers: the database, the image store, the broker.

Checked at most every ``max_age`` seconds (the answer is cached), so /metrics scrapes and
admission never hammer a dependency that is down, nor wait on it more than once at a time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .errors import StorageUnavailable

__all__ = ["Dependencies", "get_dependencies"]

log = logging.getLogger(__name__)


class Dependencies:
    """Named checks (each raises when its dependency does not answer), cached briefly."""

    def __init__(self, checks: dict[str, Callable[[], Any]], max_age: float = 2.0) -> None:
        self.checks = checks
        self.max_age = max_age
        self._lock = threading.Lock()
        self._checked = 0.0
        self._status: dict[str, bool] = {}

    def init_app(self, app: Any) -> None:
        """Store on the app as ``app.extensions['dependencies']``."""
        app.extensions["dependencies"] = self

    def status(self) -> dict[str, bool]:
        """Name -> answering now (as of at most ``max_age`` seconds ago)."""
        with self._lock:  # one check at a time; the others take its answer
            if time.monotonic() - self._checked >= self.max_age:
                status = {}
                for name, check in self.checks.items():
                    try:
                        check()
                        status[name] = True
                    except Exception as exc:
                        if self._status.get(name, True):
                            log.warning("%s is not answering: %s", name.replace("_", " "), exc)
                        status[name] = False
                self._status, self._checked = status, time.monotonic()
            return dict(self._status)

    def require_image_store(self) -> None:
        """Refuse new work (503) while the image store does not answer."""
        if not self.status().get("image_store", True):
            raise StorageUnavailable(
                "the image store is not answering; retry shortly", retry_after=5
            )


def get_dependencies(app: Any) -> Dependencies:
    """The app's dependency checks."""
    return app.extensions["dependencies"]
