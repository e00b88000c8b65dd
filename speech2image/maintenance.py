"""Cleanup: images past retention (rows and files together) and idle models; also on a timer."""

from __future__ import annotations

import datetime as dt
import logging
import threading
from typing import Any

from .config import Settings
from .model_loader import ModelLoader
from .storage import Storage

__all__ = ["Maintenance", "get_maintenance"]

log = logging.getLogger(__name__)


class Maintenance:
    """Runs retention and idle-model cleanup on demand and every S2I_CLEANUP_INTERVAL_SECONDS."""

    def __init__(self, settings: Settings, storage: Storage, loader: ModelLoader) -> None:
        self.settings = settings
        self.storage = storage
        self.loader = loader
        self._lock = threading.Lock()  # one cleanup at a time
        self._stop: threading.Event | None = None
        self.last_run: dict[str, Any] | None = None

    def init_app(self, app: Any) -> None:
        """Store on the app as ``app.extensions['maintenance']`` (its role starts the timer)."""
        app.extensions["maintenance"] = self

    def run(self) -> dict[str, Any]:
        """Remove expired images and job rows, unload idle models; report what was removed."""
        s = self.settings
        max_age = dt.timedelta(days=s.image_retention_days) if s.image_retention_days else None
        with self._lock:
            removed = self.storage.cleanup(
                max_age=max_age, max_count=s.image_max_count, max_bytes=int(s.image_max_bytes)
            )
            unloaded = self.loader.unload_idle()
            keep = dt.timedelta(seconds=s.job_keep_seconds)
            jobs_expired = self.storage.with_room(lambda: self.storage.jobs.expire(keep))
        report = {**removed, "models_unloaded": unloaded, "jobs_expired": jobs_expired}
        self.last_run = {"at": dt.datetime.now(dt.UTC).isoformat(), **report}
        if removed["images_removed"] or unloaded or removed["orphan_files_removed"] or jobs_expired:
            log.info("cleanup: %s", report)
        return report

    def start(self, interval: float) -> None:
        """Run cleanup every ``interval`` seconds in a daemon thread."""
        self._stop = stop = threading.Event()

        def loop() -> None:
            while not stop.wait(interval):
                try:
                    self.run()
                except Exception:  # the next round may succeed; never kill the timer
                    log.exception("scheduled cleanup failed")

        threading.Thread(target=loop, name="cleanup-timer", daemon=True).start()

    def stop(self) -> None:
        """Stop the timer."""
        if self._stop is not None:
            self._stop.set()


def get_maintenance(app: Any) -> Maintenance:
    """The app's maintenance runner."""
    return app.extensions["maintenance"]
