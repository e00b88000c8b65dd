"""Job execution: submit, progress, result, cancel; local (threads) or distributed (Celery).

Every model call runs as a job. Views and services only use the :class:`JobRunner` interface
(submit, get, cancel, watch, stats). The embedded mode's implementation is
:class:`~speech2image.jobs.local.LocalJobRunner` (threads in this process).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import enum
import logging
import threading
import time
import uuid
from collections.abc import Callable, Collection, Hashable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import ServiceError
from ..logging_setup import current_request_id

if TYPE_CHECKING:
    from ..storage.jobs import JobRecord

__all__ = [
    "TERMINAL",
    "Handler",
    "InputGone",
    "Job",
    "JobCancelled",
    "JobListener",
    "JobRunner",
    "JobState",
    "LocalJobRunner",
    "RemoteJobError",
    "get_job_runner",
]

log = logging.getLogger(__name__)


class JobState(enum.StrEnum):
    """Where a job is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class JobCancelled(Exception):
    """Raised inside a handler when every job it works for was cancelled."""


class InputGone(Exception):
    """A job cannot run again: its input (a stored upload) no longer exists."""


@dataclasses.dataclass(eq=False)
class Job:
    """One unit of model work, its progress and its outcome. Thread-safe."""

    kind: str
    owner: str
    work: Any
    model: str | None = None
    batch_key: Hashable | None = None
    images: int = 1  # how much of a batch it takes
    steps: int = 1  # expected denoising steps (for estimates)
    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    created_at: dt.datetime = dataclasses.field(default_factory=lambda: dt.datetime.now(dt.UTC))
    state: JobState = JobState.QUEUED
    stage: str | None = None
    step: int = 0
    total_steps: int = 0
    eta_seconds: float | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    cancel_requested: bool = False
    waiters: int = 0
    cleanup: Callable[[], None] | None = None  # called once when the job ends, however
    # Told of every change outside the lock ("start", "progress", "finish" with the final
    # state and result or error, before they are visible): the job row.
    listener: JobListener | None = dataclasses.field(default=None, repr=False)
    request_id: str | None = dataclasses.field(default_factory=current_request_id)
    queued_at: float = dataclasses.field(default_factory=time.monotonic)
    started_at: float | None = None
    finished_at: float | None = None
    version: int = 0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # reported by a worker
    _stage_started: float = dataclasses.field(default=0.0, repr=False)
    _exception: BaseException | None = dataclasses.field(default=None, repr=False)
    _finishing: bool = dataclasses.field(default=False, repr=False)
    _cond: threading.Condition = dataclasses.field(default_factory=threading.Condition, repr=False)

    # --- rows of the job table -------------------------------------------------------------
    @classmethod
    def restored(cls, record: JobRecord, work: Any, **fields: Any) -> Job:
        """The job of ``record`` ready to run again (queued, with its id and request id)."""
        return cls(
            kind=record.kind,
            owner=record.owner,
            work=work,
            id=record.id,
            created_at=record.times()["created_at"],  # type: ignore[arg-type]
            request_id=record.request_id,
            **fields,
        )

    @classmethod
    def from_record(cls, record: JobRecord) -> Job:
        """A read-only copy of the job as its row describes it (for jobs not in memory)."""
        times = record.times()
        created = times["created_at"]
        assert created is not None

        def since_created(moment: dt.datetime | None) -> float | None:
            return None if moment is None else (moment - created).total_seconds()

        job = cls(
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
            queued_at=0.0,
            started_at=since_created(times["started_at"]),
            finished_at=since_created(times["finished_at"]),
        )
        return job

    # --- updates (from the runner and handlers) ------------------------------------------
    def _bump(self) -> None:
        self.version += 1
        self._cond.notify_all()

    def _tell(self, event: str, final: dict[str, Any] | None = None) -> None:
        if self.listener is not None:
            self.listener(self, event, final or {})

    def start(self) -> None:
        """The job left the queue."""
        with self._cond:
            self.state = JobState.RUNNING
            self.started_at = time.monotonic()
            self._bump()
        self._tell("start")

    def progress(self, stage: str, step: int, total: int) -> None:
        """Report progress in ``stage``; the ETA comes from this job's own step times."""
        with self._cond:
            now = time.monotonic()
            if self.stage != stage:
                self.stage, self._stage_started = stage, now
            self.step, self.total_steps = step, total
            elapsed = now - self._stage_started
            self.eta_seconds = round(elapsed / step * (total - step), 2) if step else None
            self._bump()
        self._tell("progress")
        if self.cancel_requested:
            raise JobCancelled(self.id)

    def succeed(self, result: dict[str, Any]) -> None:
        """Finish with ``result``."""
        self._finish(JobState.SUCCEEDED, result=result)

    def fail(self, error: BaseException) -> None:
        """Finish with an error, in the API's error shape."""
        if isinstance(error, ServiceError):
            body: dict[str, Any] = {
                "status": error.code,
                "code": error.error,
                "message": error.description,
            }
            if error.details:
                body["details"] = error.details
        else:
            body = {"status": 500, "code": "internal_error", "message": "internal error"}
        self._exception = error  # before waiters wake up
        self._finish(JobState.FAILED, error=body)

    def apply_snapshot(self, snapshot: dict[str, Any]) -> None:
        """Take the state another process reported (a distributed job seen from the API)."""
        with self._cond:
            if self.done:
                return
            progress = snapshot.get("progress") or {}
            self.state = JobState(snapshot["state"])
            self.stage = progress.get("stage")
            self.step = progress.get("step") or 0
            self.total_steps = progress.get("total") or 0
            self.eta_seconds = progress.get("eta_seconds")
            self.result = snapshot.get("result")
            self.error = snapshot.get("error")
            self.model = snapshot.get("model", self.model)
            self.extra = {k: snapshot[k] for k in ("queued_seconds", "worker") if k in snapshot}
            if self.error is not None:
                self._exception = RemoteJobError.from_body(self.error)
            if self.done:
                self.finished_at = time.monotonic()
            self._bump()

    def mark_cancelled(self) -> None:
        """Finish as cancelled."""
        self._finish(JobState.CANCELLED)

    def _finish(self, state: JobState, **fields: Any) -> None:
        with self._cond:
            if self.state in TERMINAL or self._finishing:
                return
            self._finishing = True
        # The row says how the job ended, and its input is removed, before anyone sees it end.
        self._tell("finish", {"state": state, **fields})
        if self.cleanup is not None:
            try:
                self.cleanup()
            except Exception:
                log.exception("cleanup of job %s failed", self.id)
        with self._cond:
            self.state = state
            for key, value in fields.items():
                setattr(self, key, value)
            self.finished_at = time.monotonic()
            self.eta_seconds = 0.0 if state == JobState.SUCCEEDED else None
            self._bump()

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """Count a client waiting on this job (a sync request, an SSE stream) while inside."""
        with self._cond:
            self.waiters += 1
        try:
            yield
        finally:
            with self._cond:
                self.waiters -= 1

    def abandon(self) -> bool:
        """A waiter left; ask the job to stop if no other waiter holds it. True if asked."""
        with self._cond:
            if self.waiters > 1 or self.done:  # others still wait (the caller counts as one)
                return False
            self.cancel_requested = True
            return True

    # --- reading ---------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        """True once succeeded, failed or cancelled."""
        return self.state in TERMINAL

    @property
    def exception(self) -> BaseException | None:
        """The exception a failed job ended with (for synchronous callers)."""
        return self._exception

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job is done or ``timeout`` passes; True if done."""
        with self._cond:
            return self._cond.wait_for(lambda: self.done, timeout)

    def wait_for_change(self, seen: int, timeout: float) -> int:
        """Block until the version moves past ``seen`` (or timeout); returns the version."""
        with self._cond:
            self._cond.wait_for(lambda: self.version != seen, timeout)
            return self.version

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready state."""
        with self._cond:
            body: dict[str, Any] = {
                "id": self.id,
                "kind": self.kind,
                "state": self.state.value,
                "created_at": self.created_at.isoformat(),
                "progress": {
                    "stage": self.stage,
                    "step": self.step,
                    "total": self.total_steps,
                    "eta_seconds": self.eta_seconds,
                },
            }
            if self.model:
                body["model"] = self.model
            if self.started_at is not None:
                body["queued_seconds"] = round(self.started_at - self.queued_at, 3)
            body.update(self.extra)
            if self.result is not None:
                body["result"] = self.result
            if self.error is not None:
                body["error"] = self.error
            return body


class RemoteJobError(ServiceError):
    """A job failed in another process; carries its status and error code."""

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> RemoteJobError:
        """Rebuild the error from its JSON shape."""
        error = cls(body.get("message", "the job failed"), details=body.get("details"))
        error.code = int(body.get("status", 500))
        error.error = str(body.get("code", "internal_error"))
        return error


Handler = Callable[[list[Job]], None]
JobListener = Callable[[Job, str, dict[str, Any]], None]


class JobRunner(Protocol):
    """What views and services need from a job system (local threads, or Celery later)."""

    def submit(self, job: Job) -> Job:
        """Queue ``job``; raise QueueFull (429) or ServiceBusy (503) when full."""

    def get(self, owner: str, job_id: str) -> Job | None:
        """The owner's job, or None (also for another owner's job)."""

    def cancel(self, owner: str, job_id: str) -> Job | None:
        """Cancel a queued job now, or ask a running one to stop between steps."""

    def list_jobs(
        self,
        owner: str,
        *,
        states: Collection[JobState] = (),
        limit: int = 20,
        offset: int = 0,
    ) -> tuple[list[Job], int]:
        """The owner's jobs newest first (only ``states`` when given), and how many match."""

    def watch(self, job: Job, timeout: float) -> Iterator[dict[str, Any] | None]:
        """Snapshots as the job changes; None as a keep-alive after ``timeout`` quiet seconds."""

    def stats(self) -> dict[str, Any]:
        """Queue depth and running jobs, for /status."""


def get_job_runner(app: Any) -> JobRunner:
    """The app's job runner (views depend on the interface, not the local implementation)."""
    return app.extensions["jobs"]


# Last: the local runner imports the names above.
from .local import LocalJobRunner  # noqa: E402
