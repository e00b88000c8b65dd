"""The worker side: delivered tasks run through the worker's local runner, rows kept true.

A delivery is taken only through the job's row (:meth:`JobStore.take`): a job that is
finished, or held by another live worker's lease, is dropped, so redelivery and the
reconciler's resending are safe. While a job is held its lease is renewed (every second,
one statement for all the worker's jobs), which is also how a cancellation from any API
process reaches the worker. A job that ran in a batch that took its worker down runs alone
the next time (the row says ``suspect``), and only crashes of a job running alone count
against ``S2I_JOB_MAX_ATTEMPTS``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from celery import signals as celery_signals
from celery.exceptions import Reject
from sqlalchemy.exc import SQLAlchemyError

from ...config import Settings
from ...errors import InputExpired, JobTimeout, StorageUnavailable, error_body
from ...storage.base import aware
from ...storage.jobs import JobRecord, JobStore
from ..base import Job, JobState
from ..inputs import JobInputs, discard_file
from ..kinds import JobKinds
from ..local import LocalJobRunner
from ..records import JobRecorder, job_event, poison_error, runnable_job
from .state import REDIS_ERRORS, BrokerState

__all__ = ["JobWorker", "LeaseKeeper"]

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 2.0


class LeaseKeeper:
    """Renews the leases of the jobs this worker holds; learns which it must stop."""

    def __init__(
        self, store: JobStore, broker: BrokerState, worker: str, lease_seconds: float
    ) -> None:
        self.store = store
        self.broker = broker
        self.worker = worker
        self.lease_seconds = lease_seconds
        self._held: dict[str, str | None] = {}  # job id -> the task's delivery tag
        self.cancel_asked: set[str] = set()  # an API process asked to cancel them
        self.lost: set[str] = set()  # no longer this worker's (taken over after a lapse)
        self._touch_after = 0.0  # Redis back-off: touching tasks must never delay leases
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._outage = False
        threading.Thread(target=self._loop, name="job-leases", daemon=True).start()

    def hold(self, job_id: str, delivery_tag: str | None) -> None:
        """Keep renewing ``job_id``'s lease."""
        with self._lock:
            self._held[job_id] = delivery_tag

    def drop(self, job_id: str) -> None:
        """The job ended (or went back to the queue)."""
        with self._lock:
            self._held.pop(job_id, None)
            self.cancel_asked.discard(job_id)
            self.lost.discard(job_id)

    def held(self) -> list[str]:
        """The ids held now."""
        with self._lock:
            return list(self._held)

    def close(self) -> None:
        """Stop renewing."""
        self._stopped.set()

    def _loop(self) -> None:
        while not self._stopped.wait(1.0):
            with self._lock:
                held = dict(self._held)
            if not held:
                continue
            try:
                still, cancel = self.store.renew(held, self.worker, self.lease_seconds)
            except SQLAlchemyError as exc:
                if not self._outage:
                    log.warning("leases cannot be renewed (database away): %s", exc)
                self._outage = True
                continue
            if self._outage:
                log.info("leases renewed again")
                self._outage = False
            with self._lock:
                self.cancel_asked |= cancel
                self.lost |= set(held) - still
            if time.monotonic() < self._touch_after:
                continue
            for tag in held.values():  # and keep the tasks invisible to kombu's restore
                if tag is None:
                    continue
                try:
                    self.broker.touch_unacked(tag)
                except REDIS_ERRORS:
                    self._touch_after = time.monotonic() + 5.0  # Redis is away: later
                    break


class JobWorker:
    """Runs delivered tasks through the worker's LocalJobRunner, keeping the rows true."""

    def __init__(
        self,
        settings: Settings,
        broker: BrokerState,
        local: LocalJobRunner,
        kinds: JobKinds,
        *,
        models: list[str],
        pipelines: list[str],
        loader: Any,
        rows: JobStore,
        inputs: JobInputs,
    ) -> None:
        self.settings = settings
        self.broker = broker
        self.local = local
        self.kinds = kinds
        self.models = models
        self.pipelines = list(pipelines)
        self.loader = loader
        self.rows = rows
        self.inputs = inputs
        self.name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.recorder = JobRecorder(rows, self.name, settings.job_keep_seconds, kinds)
        self.keeper = LeaseKeeper(rows, broker, self.name, settings.job_lease_seconds)
        self.shutting_down = threading.Event()
        self._delivery_tags: dict[str, str] = {}
        self._lock = threading.Lock()
        self.started = time.time()
        self.jobs_done = 0

    def init_app(self, app: Any) -> None:
        """Store on a Flask app as ``app.extensions['job_worker']``; hook Celery's signals."""
        app.extensions["job_worker"] = self
        celery_signals.task_received.connect(self._on_received, weak=False)
        celery_signals.worker_shutting_down.connect(self._on_shutdown, weak=False)

    def queues(self) -> list[str]:
        """The queues this worker consumes: its models', and speech-to-image it can finish."""
        from ..kinds import queue_name

        return [queue_name(m) for m in self.models] + self.pipelines

    def _on_received(self, sender: Any = None, request: Any = None, **_: Any) -> None:
        with contextlib.suppress(AttributeError), self._lock:
            self._delivery_tags[request.id] = request.message.delivery_tag

    def _on_shutdown(self, **_: Any) -> None:
        log.info("worker %s: shutting down after its running jobs", self.name)
        self.shutting_down.set()

    # --- heartbeats ------------------------------------------------------------------------
    def start_heartbeat(self) -> threading.Thread:
        """Announce this worker in Redis every few seconds (for /ready, /status, /metrics)."""

        def beat() -> None:
            while not self.shutting_down.is_set():
                with contextlib.suppress(*REDIS_ERRORS):
                    self.broker.heartbeat(self.name, self.describe())
                self.shutting_down.wait(HEARTBEAT_SECONDS)
            with contextlib.suppress(*REDIS_ERRORS):
                self.broker.forget_worker(self.name)

        thread = threading.Thread(target=beat, name="worker-heartbeat", daemon=True)
        thread.start()
        return thread

    def describe(self) -> dict[str, Any]:
        """What /status shows about this worker."""
        resident = {
            row["name"]: row.get("bytes", 0) for row in self.loader.status() if row.get("loaded")
        }
        return {
            "name": self.name,
            "pid": os.getpid(),
            "models": self.models,
            "queues": self.queues(),
            "resident_models": resident,
            "resident_bytes": sum(resident.values()),
            "running": len(self.keeper.held()),
            "jobs_done": self.jobs_done,
            "batches_run": self.local.stats().batches_run,
            "started_at": dt.datetime.fromtimestamp(self.started, dt.UTC).isoformat(),
        }

    # --- one delivery ----------------------------------------------------------------------
    def execute(
        self,
        job_id: str,
        kind: str,
        owner: str,
        document: dict[str, Any],
        request_id: str | None,
    ) -> None:
        """Run one delivered job, unless it is finished or held by another delivery."""
        with self._lock:
            tag = self._delivery_tags.pop(job_id, None)
        settings = self.settings
        try:
            outcome, row = self.rows.take(
                job_id, self.name, settings.job_lease_seconds, settings.job_max_attempts
            )
        except SQLAlchemyError as exc:
            log.warning("job %s: the database cannot say who holds it (%s); later", job_id, exc)
            time.sleep(1.0)
            raise Reject("database unavailable", requeue=True) from None
        if outcome == "missing":
            log.warning("job %s: no row (never accepted, or expired); dropped", job_id)
            with contextlib.suppress(*REDIS_ERRORS):
                self.broker.release(job_id, owner)
            return
        assert row is not None
        if outcome in ("finished", "held"):
            log.info("job %s: %s; this delivery is dropped", job_id, outcome)
            return
        if outcome == "poison":
            log.error("job %s: took its worker down %d times; failed", job_id, row.attempts)
            self._end(row, row.owner, error=poison_error(row.attempts))
            return
        self.keeper.hold(job_id, tag)
        try:
            self._run(row, kind, owner, document, request_id)
        finally:
            self.keeper.drop(job_id)

    def _run(
        self,
        row: JobRecord,
        kind: str,
        owner: str,
        document: dict[str, Any],
        request_id: str | None,
    ) -> None:
        path: Path | None = None
        if row.input:
            try:
                path = self.inputs.fetch(row.id, row.input)
            except StorageUnavailable:  # its input is safe, only out of reach: later
                with contextlib.suppress(SQLAlchemyError):
                    self.rows.let_go(row.id, self.name)
                time.sleep(2.0)
                raise Reject("the image store is not answering", requeue=True) from None
            if path is None:
                self._end(row, owner, error=InputExpired("the uploaded audio is gone"))
                return
        try:
            job = runnable_job(
                self.kinds, row, input=path, document=document, request_id=request_id
            )
        except Exception as exc:
            discard_file(path)
            log.exception("job %s: its work cannot be read", row.id)
            self._end(row, owner, error=exc)
            return
        job.listener = self._listen
        job.cleanup = lambda: discard_file(path)  # the local copy; the kept one at the end
        self.local.submit(job)
        self._follow(job, row, owner)

    def _follow(self, job: Job, row: JobRecord, owner: str) -> None:
        """Relay the job's changes, stop it when asked, then finish its delivery."""
        started = time.monotonic()
        limit = self.settings.job_time_limit
        for snapshot in self.local.watch(job, timeout=1.0):
            if job.done:
                break
            if job.id in self.keeper.lost:
                # Its lease lapsed and another delivery holds it now: stop here without a
                # word to its row, which is no longer this worker's to write.
                log.warning("job %s: lost its lease; stopping this copy", job.id)
                job.listener = None
                self.local.cancel(owner, job.id)
            elif job.id in self.keeper.cancel_asked:
                self.local.cancel(owner, job.id)
            # Not started when the worker stops: leave it to another worker.
            if self.shutting_down.is_set() and self.local.withdraw(job):
                with contextlib.suppress(SQLAlchemyError):
                    self.rows.let_go(job.id, self.name)
                discard_file(job.input)
                raise Reject("worker shutting down", requeue=True)
            if time.monotonic() - started > limit:
                self.local.withdraw(job)
                job.cancel_requested = True  # a running handler stops at its next step
                job.fail(JobTimeout(f"the job ran longer than {limit:g} s"))
                break
            if snapshot is not None:
                self._publish(job)
        job.wait()
        if job.listener is None:  # lost: the delivery that holds it now reports its end
            discard_file(job.input)
            return
        self._publish(job)
        self._release(row, owner)

    def _listen(self, job: Job, event: str, final: dict[str, Any]) -> None:
        """The local job's listener: its row follows it."""
        if event != "start":
            self.recorder.changed(job, event, final)
            return
        try:
            if not self.rows.start(job.id, self.name, job.batch_size):
                job.cancel_requested = True  # cancelled, or taken over, while it waited here
        except SQLAlchemyError:
            log.warning("job %s: its start cannot be recorded now", job.id, exc_info=True)

    def _publish(self, job: Job) -> None:
        with contextlib.suppress(*REDIS_ERRORS):
            self.broker.publish(job_event(job, self.name))

    def _release(self, row: JobRecord, owner: str) -> None:
        """The job ended: it no longer counts against admission, its kept input goes."""
        with contextlib.suppress(*REDIS_ERRORS):
            self.broker.release(row.id, owner)
        if row.input:
            try:
                self.inputs.discard(row.id, row.input)
            except Exception as exc:  # the orphan sweep of the store removes it later
                log.warning("job %s: its input could not be removed: %s", row.id, exc)
        self.jobs_done += 1

    def _end(self, row: JobRecord, owner: str, *, error: BaseException) -> None:
        """Fail a taken job that never reached the local runner."""
        fields = {"state": JobState.FAILED.value, "error": error_body(error)}
        fields["lease_expires_at"] = None
        self.recorder.finish(row.id, fields)
        with contextlib.suppress(*REDIS_ERRORS):
            self.broker.publish(_event(row, owner, fields))
        self._release(row, owner)


def _event(row: JobRecord, owner: str, fields: dict[str, Any]) -> dict[str, Any]:
    """The event of a job that ended without running here."""
    return {
        "id": row.id,
        "kind": row.kind,
        "owner": owner,
        "state": fields["state"],
        "created_at": aware(row.created_at).isoformat(),
        "progress": {"stage": None, "step": 0, "total": 0, "eta_seconds": None},
        "error": fields.get("error"),
    }
