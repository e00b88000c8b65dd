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
        self._known: dict[str, tuple[float, bool]] = {}  # name -> (checked at, answering)
        self._checking: dict[str, threading.Lock] = {}

    def init_app(self, app: Any) -> None:
        """Store on the app as ``app.extensions['dependencies']``."""
        app.extensions["dependencies"] = self

    def answering(self, name: str) -> bool:
        """Whether dependency ``name`` answers (as of at most ``max_age`` seconds ago)."""
        with self._lock:
            lock = self._checking.setdefault(name, threading.Lock())
        with lock:  # one check at a time per dependency; the others take its answer
            checked, ok = self._known.get(name, (-self.max_age, True))
            if time.monotonic() - checked < self.max_age:
                return ok
            try:
                self.checks[name]()
                answering = True
            except Exception as exc:
                if ok:  # once per outage
                    log.warning("%s is not answering: %s", name.replace("_", " "), exc)
                answering = False
            self._known[name] = (time.monotonic(), answering)
            return answering

    def status(self) -> dict[str, bool]:
        """Name -> answering, for every dependency."""
        return {name: self.answering(name) for name in list(self.checks)}

    def require_image_store(self) -> None:
        """Refuse new work (503) while the image store does not answer."""
        if "image_store" in self.checks and not self.answering("image_store"):
            raise StorageUnavailable(
                "the image store is not answering; retry shortly", retry_after=5
            )


def get_dependencies(app: Any) -> Dependencies:
    """The app's dependency checks."""
    return app.extensions["dependencies"]
