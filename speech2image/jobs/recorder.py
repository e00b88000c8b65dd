"""Writes a job's life into its row of the job table: accepted, started, progress, finished.

Any runner uses it (the local threads, a Celery worker). Progress is throttled: a row is
written when the stage changes and at most every ``PROGRESS_SAVE_SECONDS`` otherwise, so a
fast denoising loop does not turn into a database write per step.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from ..errors import ServiceBusy
from ..storage.base import aware, utcnow
from ..storage.jobs import JobRecord, JobStore
from . import Job, JobState

__all__ = [
    "PROGRESS_SAVE_SECONDS",
    "JobRecorder",
    "batch_key_json",
    "interrupted_error",
    "local_worker_is_dead",
    "local_worker_name",
]

log = logging.getLogger(__name__)

PROGRESS_SAVE_SECONDS = 0.5
LOCAL_PREFIX = "local:"


def local_worker_name() -> str:
    """This process's name in the ``worker`` column: host, pid, process start, a nonce."""
    import psutil

    started = int(psutil.Process().create_time())
    return f"{LOCAL_PREFIX}{socket.gethostname()}:{os.getpid()}:{started}:{uuid.uuid4().hex[:8]}"


def local_worker_is_dead(worker: str | None) -> bool:
    """True when ``worker`` names an embedded-mode process of this host that no longer runs.

    Workers of other hosts, or of other kinds (Celery), are not this process's to judge.
    """
    import psutil

    if not worker or not worker.startswith(LOCAL_PREFIX):
        return False
    try:
        host, pid, started, _nonce = worker.removeprefix(LOCAL_PREFIX).rsplit(":", 3)
        process = psutil.Process(int(pid))
        return host == socket.gethostname() and int(process.create_time()) != int(started)
    except psutil.NoSuchProcess:
        return host == socket.gethostname()
    except (ValueError, psutil.Error):
        return False


def batch_key_json(key: Any) -> Any:
    """A batch key as JSON (tuples become lists)."""
    if isinstance(key, tuple | list):
        return [batch_key_json(part) for part in key]
    if key is None or isinstance(key, str | int | float | bool):
        return key
    return str(key)


def interrupted_error(reason: str) -> dict[str, Any]:
    """The error of a job that cannot run again after its process died."""
    return {
        "status": 503,
        "code": "interrupted",
        "message": f"the server stopped before the job finished and {reason}; submit it again",
    }


class JobRecorder:
    """Keeps the rows of one runner's jobs in step with the jobs."""

    def __init__(self, store: JobStore, worker: str, keep_finished_seconds: float) -> None:
        self.store = store
        self.worker = worker
        self.keep = dt.timedelta(seconds=keep_finished_seconds)
        self._lock = threading.Lock()
        self._last_saved: dict[str, tuple[float, str | None]] = {}

    def accept(self, job: Job, work: dict[str, Any]) -> None:
        """Write the row of a job being accepted; 503 when the database cannot take it."""
        try:
            self.store.add(
                id=job.id,
                owner=job.owner,
                kind=job.kind,
                model=job.model,
                batch_key=batch_key_json(job.batch_key),
                work=work,
                state=JobState.QUEUED.value,
                created_at=job.created_at,
                worker=self.worker,
                request_id=job.request_id,
            )
        except SQLAlchemyError as exc:
            log.error("cannot record job %s: %s", job.id, exc)
            raise ServiceBusy(
                "the job database is unavailable; retry in a moment", retry_after=5
            ) from exc
        job.listener = self.changed

    def changed(self, job: Job, event: str, final: dict[str, Any]) -> None:
        """Listener of a job: write its row on start and finish, throttled on progress."""
        try:
            if event == "start":
                self.store.start(job.id, self.worker)
            elif event == "finish":
                with self._lock:
                    self._last_saved.pop(job.id, None)
                self.store.finish(
                    job.id,
                    JobState(final["state"]).value,
                    stage=job.stage,
                    step=job.step,
                    total=job.total_steps,
                    result=final.get("result"),
                    error=final.get("error"),
                )
            elif self._due(job):
                self.store.update(
                    job.id,
                    only_if=(JobState.RUNNING.value,),
                    stage=job.stage,
                    step=job.step,
                    total=job.total_steps,
                )
        except SQLAlchemyError:
            # The job goes on in memory; its row catches up at the next write.
            log.exception("could not record %s of job %s", event, job.id)

    def _due(self, job: Job) -> bool:
        now = time.monotonic()
        with self._lock:
            last = self._last_saved.get(job.id)
            if last is not None and last[1] == job.stage and now - last[0] < PROGRESS_SAVE_SECONDS:
                return False
            self._last_saved[job.id] = (now, job.stage)
            return True

    def load(self, owner: str, job_id: str) -> Job | None:
        """The owner's job as its row says, unless it finished longer ago than kept."""
        try:
            record = self.store.get(job_id, owner)
        except SQLAlchemyError as exc:
            raise ServiceBusy("the job database is unavailable; retry in a moment") from exc
        if record is None or self.expired(record):
            return None
        return Job.from_record(record)

    def for_owner(
        self, owner: str, states: Iterable[str], limit: int, offset: int
    ) -> tuple[list[JobRecord], int]:
        """The owner's rows newest first, without those past their keeping time."""
        try:
            return self.store.for_owner(
                owner,
                states=states,
                finished_after=utcnow() - self.keep,
                limit=limit,
                offset=offset,
            )
        except SQLAlchemyError as exc:
            raise ServiceBusy("the job database is unavailable; retry in a moment") from exc

    def expired(self, record: JobRecord) -> bool:
        """True when a finished row is past its keeping time."""
        return record.finished_at is not None and aware(record.finished_at) < utcnow() - self.keep

    def expire(self) -> int:
        """Delete finished rows past their keeping time."""
        return self.store.expire(self.keep)
