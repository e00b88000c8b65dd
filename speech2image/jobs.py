"""Job execution: submit, progress, result, cancel. The in-process runner (threads) is the default.

Every model call runs as a job. Views and services only use the :class:`JobRunner` interface
(submit, get, cancel, wait, watch), so a distributed implementation (Celery workers with
Redis) can replace :class:`LocalJobRunner` without touching them.

The local runner keeps one queue. A free worker takes, in order of preference, the oldest job
whose model is already resident (avoiding a needless model switch), unless the oldest job of
all has waited longer than the fairness window. Image jobs with the same batch key (model,
size, steps, scheduler, guidance) are merged into one pipeline call, up to a number of images,
waiting a short while for companions to arrive.
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
from collections.abc import Callable, Hashable, Iterator
from typing import Any, Protocol

from .errors import QueueFull, ServiceBusy, ServiceError
from .logging_setup import current_request_id, job_request_id
from .observe import NULL_OBSERVER, Observer

__all__ = [
    "Job",
    "JobCancelled",
    "JobRunner",
    "JobState",
    "LocalJobRunner",
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
    request_id: str | None = dataclasses.field(default_factory=current_request_id)
    queued_at: float = dataclasses.field(default_factory=time.monotonic)
    started_at: float | None = None
    finished_at: float | None = None
    version: int = 0
    _stage_started: float = dataclasses.field(default=0.0, repr=False)
    _exception: BaseException | None = dataclasses.field(default=None, repr=False)
    _cond: threading.Condition = dataclasses.field(default_factory=threading.Condition, repr=False)

    # --- updates (from the runner and handlers) ------------------------------------------
    def _bump(self) -> None:
        self.version += 1
        self._cond.notify_all()

    def start(self) -> None:
        """The job left the queue."""
        with self._cond:
            self.state = JobState.RUNNING
            self.started_at = time.monotonic()
            self._bump()

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

    def mark_cancelled(self) -> None:
        """Finish as cancelled."""
        self._finish(JobState.CANCELLED)

    def _finish(self, state: JobState, **fields: Any) -> None:
        with self._cond:
            if self.state in TERMINAL:
                return
            self.state = state
            for key, value in fields.items():
                setattr(self, key, value)
            self.finished_at = time.monotonic()
            self.eta_seconds = 0.0 if state == JobState.SUCCEEDED else None
            self._bump()
        if self.cleanup is not None:
            try:
                self.cleanup()
            except Exception:
                log.exception("cleanup of job %s failed", self.id)

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
            if self.result is not None:
                body["result"] = self.result
            if self.error is not None:
                body["error"] = self.error
            return body


Handler = Callable[[list[Job]], None]


class JobRunner(Protocol):
    """What views and services need from a job system (local threads, or Celery later)."""

    def submit(self, job: Job) -> Job:
        """Queue ``job``; raise QueueFull (429) or ServiceBusy (503) when full."""

    def get(self, owner: str, job_id: str) -> Job | None:
        """The owner's job, or None (also for another owner's job)."""

    def cancel(self, owner: str, job_id: str) -> Job | None:
        """Cancel a queued job now, or ask a running one to stop between steps."""

    def watch(self, job: Job, timeout: float) -> Iterator[dict[str, Any] | None]:
        """Snapshots as the job changes; None as a keep-alive after ``timeout`` quiet seconds."""

    def stats(self) -> dict[str, Any]:
        """Queue depth and running jobs, for /status."""


class LocalJobRunner:
    """In-process job runner: worker threads, resident-first scheduling, dynamic batching."""

    def __init__(
        self,
        *,
        workers: int = 1,
        max_batch_images: int = 4,
        max_batch_wait: float = 0.05,
        fairness_seconds: float = 10.0,
        max_queued: int = 64,
        max_queued_per_owner: int = 16,
        is_resident: Callable[[str], bool] = lambda _model: False,
        keep_finished_seconds: float = 3600.0,
        observer: Observer = NULL_OBSERVER,
    ) -> None:
        self.observer = observer
        self.max_batch_images = max_batch_images
        self.max_batch_wait = max_batch_wait
        self.fairness_seconds = fairness_seconds
        self.max_queued = max_queued
        self.max_queued_per_owner = max_queued_per_owner
        self.is_resident = is_resident
        self.keep_finished_seconds = keep_finished_seconds
        self._handlers: dict[str, Handler] = {}
        self._queue: list[Job] = []
        self._jobs: dict[str, Job] = {}
        self._running: set[Job] = set()
        self._cond = threading.Condition()
        self._stopping = False
        self.seconds_per_step = 0.5  # refined from measured jobs (EWMA)
        self.batches_run = 0
        self._workers = [
            threading.Thread(target=self._work, name=f"job-worker-{i}", daemon=True)
            for i in range(workers)
        ]
        for thread in self._workers:
            thread.start()

    def init_app(self, app: Any) -> None:
        """Store on a Flask app as ``app.extensions['jobs']``."""
        app.extensions["jobs"] = self

    def register(self, kind: str, handler: Handler) -> None:
        """Run jobs of ``kind`` with ``handler`` (it receives a batch of one or more jobs)."""
        self._handlers[kind] = handler

    # --- the interface ---------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        """Queue ``job`` unless the owner or the whole queue is at its limit."""
        if job.kind not in self._handlers:
            raise ValueError(f"no handler for job kind {job.kind!r}")
        with self._cond:
            self._forget_old()
            active = [j for j in self._queue if j.owner == job.owner]
            active += [j for j in self._running if j.owner == job.owner]
            if len(active) >= self.max_queued_per_owner:
                raise QueueFull(
                    f"you have {len(active)} jobs queued or running; the limit is "
                    f"{self.max_queued_per_owner}",
                    retry_after=self._estimate_wait(),
                )
            if len(self._queue) >= self.max_queued:
                raise ServiceBusy(
                    f"the queue is full ({self.max_queued} jobs waiting); retry later",
                    retry_after=self._estimate_wait(),
                )
            self._queue.append(job)
            self._jobs[job.id] = job
            self._cond.notify_all()
        return job

    def get(self, owner: str, job_id: str) -> Job | None:
        """The owner's job by id."""
        job = self._jobs.get(job_id)
        return job if job is not None and job.owner == owner else None

    def cancel(self, owner: str, job_id: str) -> Job | None:
        """Cancel: a queued job at once; a running one between denoising steps."""
        job = self.get(owner, job_id)
        if job is None:
            return None
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
                job.mark_cancelled()
                self._observe_end(job)
                return job
        if not job.done:
            job.cancel_requested = True
        return job

    def watch(self, job: Job, timeout: float = 15.0) -> Iterator[dict[str, Any] | None]:
        """Yield a snapshot on every change until the job ends; None on quiet periods."""
        seen = -1
        while True:
            version = job.wait_for_change(seen, timeout)
            if version == seen:
                yield None
                continue
            seen = version
            snapshot = job.snapshot()
            yield snapshot
            if job.done:
                return

    def stats(self) -> dict[str, Any]:
        """Queue depth, running jobs (also by kind), batches run, measured seconds per step."""
        with self._cond:
            by_kind: dict[str, dict[str, int]] = {}
            for state, jobs in (("queued", self._queue), ("running", self._running)):
                for job in jobs:
                    counts = by_kind.setdefault(job.kind, {"queued": 0, "running": 0})
                    counts[state] += 1
            return {
                "queued": len(self._queue),
                "running": len(self._running),
                "by_kind": by_kind,
                "batches_run": self.batches_run,
                "seconds_per_step": round(self.seconds_per_step, 4),
            }

    def shutdown(self) -> None:
        """Stop the workers after their current batch."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    # --- scheduling ------------------------------------------------------------------------
    def _estimate_wait(self) -> float:
        """Seconds until the queue drains, from measured step times."""
        steps = sum(j.steps for j in self._queue) + sum(
            max(j.total_steps - j.step, 0) for j in self._running
        )
        return max(1.0, steps * self.seconds_per_step / max(1, len(self._workers)))

    def _pick(self) -> Job:
        """Oldest job past the fairness window, else the oldest with a resident model."""
        oldest = self._queue[0]
        if time.monotonic() - oldest.queued_at >= self.fairness_seconds:
            return oldest
        for job in self._queue:
            if job.model is None or self.is_resident(job.model):
                return job
        return oldest

    def _take_batch(self) -> list[Job]:
        """Called with the lock held and a non-empty queue."""
        first = self._pick()
        self._queue.remove(first)
        self._running.add(first)  # visible to admission and stats while the batch forms
        batch = [first]
        if first.batch_key is None:
            return batch
        deadline = time.monotonic() + self.max_batch_wait
        while True:
            room = self.max_batch_images - sum(j.images for j in batch)
            for job in list(self._queue):
                if job.batch_key == first.batch_key and job.images <= room:
                    self._queue.remove(job)
                    self._running.add(job)
                    batch.append(job)
                    room -= job.images
            remaining = deadline - time.monotonic()
            if room <= 0 or remaining <= 0 or self._stopping:
                return batch
            self._cond.wait(remaining)

    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._stopping)
                if self._stopping:
                    return
                batch = self._take_batch()
            self._run(batch)
            with self._cond:
                self._running.difference_update(batch)
                self._cond.notify_all()

    def _run(self, batch: list[Job]) -> None:
        started = time.monotonic()
        for job in batch:
            job.start()
        token = job_request_id.set(",".join(j.request_id or "-" for j in batch))
        self.observer.batch_run(batch[0].kind, len(batch), sum(j.images for j in batch))
        try:
            self._handlers[batch[0].kind](batch)
        except JobCancelled:
            pass
        except Exception as exc:
            if not isinstance(exc, ServiceError):
                log.exception("job %s (%s) failed", batch[0].id, batch[0].kind)
            for job in batch:
                job.fail(exc)
        for job in batch:
            if not job.done:  # the handler stopped for cancellation, or forgot the job
                if job.cancel_requested:
                    job.mark_cancelled()
                else:
                    job.fail(RuntimeError("the handler returned without a result"))
        job_request_id.reset(token)
        for job in batch:
            self._observe_end(job)
        self.batches_run += 1
        steps = max(j.total_steps for j in batch)
        if steps and all(j.state == JobState.SUCCEEDED for j in batch):
            measured = (time.monotonic() - started) / steps
            self.seconds_per_step = 0.8 * self.seconds_per_step + 0.2 * measured

    def _observe_end(self, job: Job) -> None:
        took = (job.finished_at or time.monotonic()) - job.queued_at
        self.observer.job_finished(job.kind, job.state.value, took)

    def _forget_old(self) -> None:
        """Drop finished jobs past their keeping time (called with the lock held)."""
        limit = time.monotonic() - self.keep_finished_seconds
        for job_id, job in list(self._jobs.items()):
            if job.done and job.finished_at is not None and job.finished_at < limit:
                del self._jobs[job_id]


def get_job_runner(app: Any) -> JobRunner:
    """The app's job runner (views depend on the interface, not the local implementation)."""
    return app.extensions["jobs"]
