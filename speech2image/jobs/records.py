"""Every mapping of a job to its row and to its events, and the writer that keeps rows in step.

A job's row (:class:`~speech2image.storage.jobs.JobRecord`) is written when the job is
accepted, marked running and finished, with throttled progress in between: a row is written
when the stage changes and at most every ``PROGRESS_SAVE_SECONDS`` otherwise, so a fast
denoising loop does not turn into a database write per step. A final write that fails (the
database is away) is retried in the background until it lands. A job's event (Redis
pub/sub in the distributed mode) is its snapshot plus its owner.
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
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from ..errors import DatabaseUnavailable, IdempotencyConflict, JobFailedRepeatedly
from ..storage.base import aware, utcnow
from ..storage.jobs import DuplicateJob, JobRecord, JobStore
from .base import Job, JobState
from .kinds import JobKinds

__all__ = [
    "LOCAL_PREFIX",
    "PROGRESS_SAVE_SECONDS",
    "DuplicateJob",
    "JobRecorder",
    "batch_key_json",
    "check_same_kind",
    "database_down",
    "job_event",
    "job_from_row",
    "local_worker_is_dead",
    "local_worker_name",
    "poison_error",
    "refresh_from_row",
    "row_fields",
    "runnable_job",
]

log = logging.getLogger(__name__)

PROGRESS_SAVE_SECONDS = 0.5
FINISH_RETRY_SECONDS = 1.0  # first back-off of a final write that failed (doubles, capped)
LOCAL_PREFIX = "local:"
DATABASE_RETRY_AFTER = 5


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


# --- job <-> row ---------------------------------------------------------------------------
def row_fields(job: Job, document: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """The columns of a new row for ``job`` whose work is ``document``."""
    return {
        "id": job.id,
        "owner": job.owner,
        "kind": job.kind,
        "model": job.model,
        "batch_key": batch_key_json(job.batch_key),
        "work": document,
        "state": JobState.QUEUED.value,
        "created_at": job.created_at,
        "request_id": job.request_id,
        "idempotency_key": job.idempotency_key,
        **fields,
    }


def job_from_row(record: JobRecord) -> Job:
    """A read-only copy of the job as its row describes it (for jobs not in memory)."""
    times = record.times()
    created = times["created_at"]
    assert created is not None

    def since_created(moment: dt.datetime | None) -> float | None:
        return None if moment is None else (moment - created).total_seconds()

    job = Job(
        kind=record.kind,
        owner=record.owner,
        work=None,
        model=record.model,
        id=record.id,
        created_at=created,
        state=JobState(record.state),
        stage=record.stage,
        step=record.step,
        total_steps=record.total,
        result=record.result,
        error=record.error,
        cancel_requested=record.cancel_requested,
        request_id=record.request_id,
        idempotency_key=record.idempotency_key,
        queued_at=0.0,
        started_at=since_created(times["started_at"]),
        finished_at=since_created(times["finished_at"]),
    )
    if record.worker and not record.worker.startswith(LOCAL_PREFIX) and record.started_at:
        job.extra["worker"] = record.worker  # a distributed worker's name (never a local pid)
    return job


def runnable_job(
    kinds: JobKinds,
    record: JobRecord,
    *,
    input: Path | None,
    document: dict[str, Any] | None = None,
    request_id: str | None = None,
) -> Job:
    """The job a row describes, ready to run again: after a crash (the row's document) or
    on a worker (the task's, which is the same document). A job that was in a batch that
    crashed runs alone."""
    return kinds.rebuild(
        record.kind,
        record.owner,
        record.work if document is None else document,
        id=record.id,
        input=input,
        created_at=aware(record.created_at),
        request_id=record.request_id if request_id is None else request_id,
        alone=record.suspect,
    )


def refresh_from_row(job: Job, record: JobRecord) -> None:
    """Bring a followed job (an API process's copy) up to what its row says."""
    job.apply_snapshot(job_from_row(record).snapshot())


def check_same_kind(job: Job, record: JobRecord) -> None:
    """An Idempotency-Key used again must be for the same kind of request (409 otherwise)."""
    if record.kind != job.kind:
        raise IdempotencyConflict(
            f"this Idempotency-Key was used for a {record.kind} request; use a new key",
            details={"field": "Idempotency-Key", "job_id": record.id},
        )


# --- job <-> event -------------------------------------------------------------------------
def job_event(job: Job, worker: str | None = None) -> dict[str, Any]:
    """What a worker publishes when a job changes: its snapshot, owner and worker."""
    event = job.snapshot() | {"owner": job.owner}
    event.pop("queued_seconds", None)  # the worker's own wait only; the row knows the whole
    if worker is not None:
        event["worker"] = worker
    return event


# --- keeping rows in step ------------------------------------------------------------------
class JobRecorder:
    """Keeps the rows of one runner's jobs in step with the jobs."""

    def __init__(
        self,
        store: JobStore,
        worker: str,
        keep_finished_seconds: float,
        kinds: JobKinds | None = None,
    ) -> None:
        self.store = store
        self.kinds = kinds  # with kinds, a job's final write carries its usage row
        self.worker = worker
        self.keep = dt.timedelta(seconds=keep_finished_seconds)
        self._lock = threading.Lock()
        self._last_saved: dict[str, tuple[float, str | None]] = {}
        self._unsaved: dict[str, dict[str, Any]] = {}  # final writes waiting for the database
        self._retrier: threading.Thread | None = None

    def accept(self, job: Job, document: dict[str, Any], **fields: Any) -> None:
        """Write the row of a job being accepted; 503 when the database cannot take it.

        Raises :class:`DuplicateJob` when the job's Idempotency-Key was used before.
        """
        try:
            self.store.add(**row_fields(job, document, **fields))
        except DuplicateJob:
            raise
        except SQLAlchemyError as exc:
            log.error("cannot record job %s: %s", job.id, exc)
            raise database_down() from exc

    def listen(self, job: Job) -> None:
        """Write ``job``'s start, progress and end into its row from now on."""
        job.listener = self.changed

    def changed(self, job: Job, event: str, final: dict[str, Any]) -> None:
        """Listener of a job: write its row on start and finish, throttled on progress."""
        try:
            if event == "start":
                self.store.start(job.id, self.worker, job.batch_size)
            elif event == "finish":
                with self._lock:
                    self._last_saved.pop(job.id, None)
                fields = self.final_fields(job, final)
                if self.kinds is not None:
                    fields["usage"] = self.usage(job, final)
                self.finish(job.id, fields)
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
            log.warning("could not record %s of job %s", event, job.id, exc_info=True)

    @staticmethod
    def final_fields(job: Job, final: dict[str, Any]) -> dict[str, Any]:
        """The columns of a finished job's row."""
        return {
            "state": JobState(final["state"]).value,
            "stage": job.stage,
            "step": job.step,
            "total": job.total_steps,
            "result": final.get("result"),
            "error": final.get("error"),
            "lease_expires_at": None,
        }

    def usage(self, job: Job, final: dict[str, Any]) -> dict[str, float]:
        """What ``job`` used: its kind's account plus its device time (its share of a batch)."""
        assert self.kinds is not None
        use = dict(self.kinds.usage(job, final.get("result")))
        if job.started_at is not None:
            device = (time.monotonic() - job.started_at) / max(1, job.batch_size)
            use["device_seconds"] = round(device, 3)
        return use

    def finish(self, job_id: str, fields: dict[str, Any]) -> bool:
        """Record a job's end now, or retry in the background until the database answers.

        True when written now. A job that ended while the database was away is never left
        ``running`` in its row: the write lands when the database is back.
        """
        try:
            state = fields["state"]
            rest = {k: v for k, v in fields.items() if k != "state"}
            self.store.finish(job_id, state, **rest)
            return True
        except SQLAlchemyError as exc:
            log.warning(
                "job %s ended but its row cannot be written yet (%s); retrying", job_id, exc
            )
            with self._lock:
                self._unsaved[job_id] = fields
                if self._retrier is None or not self._retrier.is_alive():
                    self._retrier = threading.Thread(
                        target=self._retry_finishes, name="job-row-retry", daemon=True
                    )
                    self._retrier.start()
            return False

    def pending(self) -> int:
        """Final writes still waiting for the database."""
        with self._lock:
            return len(self._unsaved)

    def _retry_finishes(self) -> None:
        delay = FINISH_RETRY_SECONDS
        while True:
            time.sleep(delay)
            with self._lock:
                waiting = dict(self._unsaved)
            if not waiting:
                with self._lock:
                    if not self._unsaved:
                        self._retrier = None
                        return
                continue
            for job_id, fields in waiting.items():
                rest = {k: v for k, v in fields.items() if k != "state"}
                try:
                    self.store.finish(job_id, fields["state"], **rest)
                except SQLAlchemyError:
                    delay = min(delay * 2, 30.0)
                    break
                with self._lock:
                    self._unsaved.pop(job_id, None)
                log.info("job %s: its end is recorded now that the database answers", job_id)
                delay = FINISH_RETRY_SECONDS

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
        record = self.row(owner, job_id)
        return None if record is None else job_from_row(record)

    def row(self, owner: str, job_id: str) -> JobRecord | None:
        """The owner's row, unless it finished longer ago than kept; 503 if unreachable."""
        try:
            record = self.store.get(job_id, owner)
        except SQLAlchemyError as exc:
            raise database_down() from exc
        if record is None or self.expired(record):
            return None
        return record

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
            raise database_down() from exc

    def by_idempotency_key(self, owner: str, key: str) -> JobRecord | None:
        """The owner's job made with ``key``; 503 if the database cannot say."""
        try:
            return self.store.by_idempotency_key(owner, key)
        except SQLAlchemyError as exc:
            raise database_down() from exc

    def expired(self, record: JobRecord) -> bool:
        """True when a finished row is past its keeping time."""
        return record.finished_at is not None and aware(record.finished_at) < utcnow() - self.keep

    def expire(self) -> int:
        """Delete finished rows past their keeping time."""
        return self.store.expire(self.keep)


def database_down() -> DatabaseUnavailable:
    """The 503 of a request that needed the job database while it did not answer."""
    return DatabaseUnavailable(
        "the job database is unavailable; retry in a moment", retry_after=DATABASE_RETRY_AFTER
    )


def poison_error(attempts: int) -> JobFailedRepeatedly:
    """The error of a job that took its worker down too often."""
    return JobFailedRepeatedly(
        f"the job stopped its worker {attempts} times; it will not be tried again"
    )
