"""The job interface: a Job, its states, and the runner Protocol both runners implement.

Every model call runs as a job. Views and services use only :class:`JobRunner` (submit, get,
cancel, list_jobs, watch, stats, health); the embedded mode's implementation is
:class:`~speech2image.jobs.local.LocalJobRunner` (threads in this process), the distributed
mode's :class:`~speech2image.jobs.celery.CeleryJobRunner` (Celery workers).
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
from pathlib import Path
from typing import Any, Protocol

from ..errors import error_body, error_from_body
from ..logging_setup import current_request_id

__all__ = [
    "TERMINAL",
    "InputGone",
    "Job",
    "JobCancelled",
    "JobListener",
    "JobRunner",
    "JobState",
    "RunnerStats",
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
    """One unit of model work, its progress and its outcome. Thread-safe.

    ``work`` is the kind's validated request; ``input`` the local file it needs (an upload),
    which the runner removes when the job ends. ``model``, ``batch_key``, ``images`` and
    ``steps`` come from the kind (:meth:`~speech2image.jobs.kinds.JobKinds.new`).
    """

    kind: str
    owner: str
    work: Any
    model: str | None = None
    batch_key: Hashable | None = None
    images: int = 1  # how much of a batch it takes
    steps: int = 1  # expected denoising steps (for estimates)
    priority: int = 0  # started before lower ones (drafts: -1)
    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    created_at: dt.datetime = dataclasses.field(default_factory=lambda: dt.datetime.now(dt.UTC))
    input: Path | None = None
    idempotency_key: str | None = None
    state: JobState = JobState.QUEUED
    stage: str | None = None
    step: int = 0
    total_steps: int = 0
    eta_seconds: float | None = None
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    cancel_requested: bool = False
    waiters: int = 0
    batch_size: int = 0  # jobs in the pipeline call it ran in (0: not started)
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
    # What the job shows while it runs (the transcript so far, the latest preview frame):
    # the newest only, carried by its snapshots and events, never stored in its row.
    partial: dict[str, Any] | None = None
    _stage_started: float = dataclasses.field(default=0.0, repr=False)
    _exception: BaseException | None = dataclasses.field(default=None, repr=False)
    _finishing: bool = dataclasses.field(default=False, repr=False)
    _cond: threading.Condition = dataclasses.field(default_factory=threading.Condition, repr=False)

    # --- updates (from the runner and handlers) ------------------------------------------
    def _bump(self) -> None:
        self.version += 1
        self._cond.notify_all()

    def _tell(self, event: str, final: dict[str, Any] | None = None) -> None:
        if self.listener is not None:
            self.listener(self, event, final or {})

    def start(self, batch_size: int = 1) -> None:
        """The job left the queue and runs in a pipeline call with ``batch_size`` jobs."""
        with self._cond:
            self.state = JobState.RUNNING
            self.started_at = time.monotonic()
            self.batch_size = batch_size
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

    def show(self, **partial: Any) -> None:
        """Update what the job shows while it runs (merged into ``partial``); watchers wake."""
        with self._cond:
            self.partial = {**(self.partial or {}), **partial}
            self._bump()
        self._tell("progress")

    def succeed(self, result: dict[str, Any]) -> None:
        """Finish with ``result``."""
        self._finish(JobState.SUCCEEDED, result=result)

    def fail(self, error: BaseException) -> None:
        """Finish with an error, in the API's error shape."""
        self._exception = error  # before waiters wake up
        self._finish(JobState.FAILED, error=error_body(error))

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
            self.partial = snapshot.get("partial", self.partial)
            if self.error is not None:
                self._exception = error_from_body(self.error)
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
            if self.partial is not None:
                body["partial"] = self.partial
            if self.result is not None:
                body["result"] = self.result
            if self.error is not None:
                body["error"] = self.error
            return body


JobListener = Callable[[Job, str, dict[str, Any]], None]


@dataclasses.dataclass(frozen=True)
class RunnerStats:
    """What a runner reports for /status and /metrics. ``None``: unknown now (broker down)."""

    mode: str  # "embedded" (threads here) or "distributed" (Celery workers)
    queued: int | None
    running: int | None
    by_kind: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    batches_run: int = 0
    seconds_per_step: float | None = None
    queues: dict[str, int] | None = None  # distributed: jobs waiting in each queue
    workers: list[dict[str, Any]] | None = None  # distributed: live workers
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The JSON of /status (fields that do not apply to the mode left out)."""
        body = dataclasses.asdict(self)
        return {k: v for k, v in body.items() if v is not None or k in ("queued", "running")}


class JobRunner(Protocol):
    """What views, services and the server need from a job system (local threads or Celery)."""

    #: True when jobs run in this process (a graceful stop must wait for them).
    runs_jobs: bool

    def submit(self, job: Job) -> Job:
        """Queue ``job`` (or return the job its Idempotency-Key already made); raise
        QueueFull (429) or ServiceBusy (503) when full."""

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

    def stats(self) -> RunnerStats:
        """Queue depth and running jobs, for /status and /metrics."""

    def health(self) -> dict[str, dict[str, Any]]:
        """Readiness of what the runner depends on (e.g. the broker): name -> {ok, problem}."""

    def shutdown(self) -> None:
        """Stop taking jobs; running ones finish."""


def get_job_runner(app: Any) -> JobRunner:
    """The app's job runner (views depend on the interface, not an implementation)."""
    return app.extensions["jobs"]
