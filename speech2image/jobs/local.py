"""The in-process job runner (threads): the embedded mode's implementation of JobRunner.

The local runner keeps one queue. A free worker takes, in order of preference, the oldest job
whose model is already resident (avoiding a needless model switch), unless the oldest job of
all has waited longer than the fairness window. Image jobs with the same batch key (model,
size, steps, scheduler, guidance) are merged into one pipeline call, up to a number of images,
waiting a short while for companions to arrive.

With a job store, every accepted job is a row (see :mod:`.records`): after a crash,
:meth:`LocalJobRunner.recover` runs again the jobs a dead process left queued or running, or
fails them as ``interrupted`` when their input is gone, and finished jobs stay readable from
the table for ``keep_finished_seconds``. A job that ran in a batch of several when its
process died runs alone the next time, and is not charged that attempt.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator
from typing import Any

from ..errors import (
    JobInterrupted,
    QueueFull,
    ServiceBusy,
    ServiceError,
    error_body,
)
from ..logging_setup import job_request_id
from ..observe import NULL_OBSERVER, Observer
from ..storage.jobs import JobRecord, JobStore
from .base import InputGone, Job, JobCancelled, JobState, RunnerStats
from .inputs import JobInputs, discard_file
from .kinds import JobKinds
from .records import (
    DuplicateJob,
    JobRecorder,
    check_same_kind,
    job_from_row,
    local_worker_is_dead,
    local_worker_name,
    runnable_job,
)

__all__ = ["MAX_ATTEMPTS", "LocalJobRunner"]

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3  # a job that took its process down this often is failed, not run again


class LocalJobRunner:
    """In-process job runner: worker threads, resident-first scheduling, dynamic batching."""

    runs_jobs = True  # a graceful stop waits for this process's jobs

    def __init__(
        self,
        kinds: JobKinds,
        *,
        workers: int = 1,
        max_batch_images: int = 4,
        max_batch_wait: float = 0.05,
        fairness_seconds: float = 10.0,
        max_queued: int = 64,
        max_queued_per_owner: int = 16,
        is_resident: Callable[[str], bool] = lambda _model: False,
        keep_finished_seconds: float = 3600.0,
        store: JobStore | None = None,
        inputs: JobInputs | None = None,
        observer: Observer = NULL_OBSERVER,
    ) -> None:
        self.kinds = kinds
        self.inputs = inputs
        self.observer = observer
        self.max_batch_images = max_batch_images
        self.max_batch_wait = max_batch_wait
        self.fairness_seconds = fairness_seconds
        self.max_queued = max_queued
        self.max_queued_per_owner = max_queued_per_owner
        self.is_resident = is_resident
        self.keep_finished_seconds = keep_finished_seconds
        self.worker_name = local_worker_name()
        self.recorder = (
            JobRecorder(store, self.worker_name, keep_finished_seconds, kinds) if store else None
        )
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

    # --- the interface ---------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        """Queue ``job`` unless the owner or the whole queue is at its limit.

        A job whose Idempotency-Key the owner used before is not queued: the earlier job is
        returned instead (and the new job's input removed).
        """
        if job.kind not in self.kinds:
            raise ValueError(f"no job kind {job.kind!r}")
        if self.recorder is not None and job.idempotency_key:
            existing = self._earlier(job)
            if existing is not None:
                return existing
        document = self.kinds.document(job) if self.recorder is not None else {}
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
            location = None
            if job.input is not None and self.inputs is not None:
                location = self.inputs.keep(job.id, job.input)
            if self.recorder is not None:  # the row first: an accepted job is never lost
                try:
                    self.recorder.accept(job, document, worker=self.worker_name, input=location)
                except DuplicateJob as duplicate:  # the same key, at the same moment
                    discard_file(job.input)
                    return self._existing(job, duplicate.existing)
                self.recorder.listen(job)
            self._own_input(job, location)
            self._queue.append(job)
            self._jobs[job.id] = job
            self._cond.notify_all()
        return job

    def _own_input(self, job: Job, location: str | None) -> None:
        """The job's input is removed when the job ends, however it ends."""
        if job.input is None:
            return
        inputs, path = self.inputs, job.input
        if inputs is not None and location is not None:
            job.cleanup = lambda: inputs.discard(job.id, location)
        else:
            job.cleanup = lambda: discard_file(path)

    def _earlier(self, job: Job) -> Job | None:
        """The owner's job made earlier with ``job``'s Idempotency-Key, if any."""
        assert self.recorder is not None and job.idempotency_key
        record = self.recorder.by_idempotency_key(job.owner, job.idempotency_key)
        if record is None:
            return None
        discard_file(job.input)
        return self._existing(job, record)

    def _existing(self, job: Job, record: JobRecord) -> Job:
        check_same_kind(job, record)
        return self._jobs.get(record.id) or job_from_row(record)

    def get(self, owner: str, job_id: str) -> Job | None:
        """The owner's job by id (from the job table when it is not in memory)."""
        job = self._jobs.get(job_id)
        if job is not None:
            return job if job.owner == owner else None
        return self.recorder.load(owner, job_id) if self.recorder is not None else None

    def health(self) -> dict[str, dict[str, Any]]:
        """Nothing outside this process: the database and the folders are checked by /ready."""
        return {}

    def list_jobs(
        self,
        owner: str,
        *,
        states: Collection[JobState] = (),
        limit: int = 20,
        offset: int = 0,
    ) -> tuple[list[Job], int]:
        """The owner's jobs newest first (from the job table, so a restart forgets none)."""
        if self.recorder is not None:
            records, total = self.recorder.for_owner(
                owner, [state.value for state in states], limit, offset
            )
            with self._cond:  # jobs in memory are fresher than their throttled rows
                live = dict(self._jobs)
            return [live.get(r.id) or job_from_row(r) for r in records], total
        with self._cond:
            mine = [
                job
                for job in list(self._jobs.values())
                if job.owner == owner and (not states or job.state in states)
            ]
        mine.sort(key=lambda job: job.created_at, reverse=True)
        return mine[offset : offset + limit], len(mine)

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
            if job.id not in self._jobs and self.recorder is not None:  # another process's
                self.recorder.store.update(job.id, cancel_requested=True)
        return job

    def withdraw(self, job: Job) -> bool:
        """Take a job that has not started out of the queue, unfinished (it runs elsewhere)."""
        with self._cond:
            if job not in self._queue:
                return False
            self._queue.remove(job)
            self._jobs.pop(job.id, None)
            return True

    def recover(self) -> dict[str, int]:
        """Run again the jobs a dead process left queued or running; fail those that cannot.

        Also deletes finished rows past their keeping time. Only rows of embedded-mode
        processes of this host that no longer run are taken, each by one claimant.
        """
        if self.recorder is None:
            return {}
        store = self.recorder.store
        report = {"requeued": 0, "failed": 0, "expired": self.recorder.expire()}
        for stale in store.unfinished():
            if not local_worker_is_dead(stale.worker):
                continue
            record = store.claim(stale, self.worker_name)
            if record is None:
                continue  # another process took it first
            job, reason = self._restore(record)
            if job is None:
                error = JobInterrupted(
                    f"the server stopped before the job finished and {reason}; submit it again"
                )
                store.finish(record.id, "failed", error=error_body(error))
                if self.inputs is not None:
                    self.inputs.discard(record.id, record.input)
                report["failed"] += 1
                log.warning("job %s (%s) cannot run again: %s", record.id, record.kind, reason)
                continue
            self.recorder.listen(job)
            self._own_input(job, record.input)
            with self._cond:
                self._queue.append(job)
                self._jobs[job.id] = job
                self._cond.notify_all()
            report["requeued"] += 1
            log.info("job %s (%s) queued again after a restart", record.id, record.kind)
        return report

    def _restore(self, record: JobRecord) -> tuple[Job | None, str]:
        if record.batch_size <= 1 and record.attempts >= MAX_ATTEMPTS:
            return None, f"it was interrupted {record.attempts} times"
        if record.kind not in self.kinds:
            return None, f"this server cannot restore {record.kind!r} jobs"
        try:
            path = None
            location = record.input or (record.work or {}).get("path")  # rows of 0.1 named it
            # Any kind whose row names an input gets it back (audio or an image to edit).
            if self.kinds[record.kind].takes_input or record.input:
                found = self.inputs.fetch(record.id, location) if self.inputs and location else None
                if found is None:
                    raise InputGone("its uploaded audio is gone")
                path = found
            job = runnable_job(self.kinds, record, input=path)
            return job, ""
        except InputGone as exc:
            return None, str(exc)
        except Exception:
            log.exception("restoring job %s failed", record.id)
            return None, "its request could not be restored"

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

    def stats(self) -> RunnerStats:
        """Queue depth, running jobs (also by kind), batches run, measured seconds per step."""
        with self._cond:
            by_kind: dict[str, dict[str, int]] = {}
            for state, jobs in (("queued", self._queue), ("running", self._running)):
                for job in jobs:
                    counts = by_kind.setdefault(job.kind, {"queued": 0, "running": 0})
                    counts[state] += 1
            return RunnerStats(
                mode="embedded",
                queued=len(self._queue),
                running=len(self._running),
                by_kind=by_kind,
                batches_run=self.batches_run,
                seconds_per_step=round(self.seconds_per_step, 4),
            )

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
        """Of the highest priority: the oldest job past the fairness window, else the oldest
        with a resident model."""
        top = max(job.priority for job in self._queue)
        queue = [job for job in self._queue if job.priority == top]
        oldest = queue[0]
        if time.monotonic() - oldest.queued_at >= self.fairness_seconds:
            return oldest
        for job in queue:
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
            job.start(len(batch))
        token = job_request_id.set(",".join(j.request_id or "-" for j in batch))
        self.observer.batch_run(batch[0].kind, len(batch), sum(j.images for j in batch))
        try:
            self.kinds.run(batch)
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
