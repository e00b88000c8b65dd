"""The API side of the distributed mode: jobs become rows and Celery tasks; rows answer.

An API process (which never imports a model library) validates a request, refuses hostile
audio, counts the job against the admission limits (Redis), keeps its upload in the image
store, writes its row (PostgreSQL) and sends its task to the queue of its model. The row is
the truth: ``GET /jobs`` reads rows, cancelling writes the row, and a task that could not be
sent (the broker went away a moment ago) is sent by the reconciler. A process that waits for
a job (a synchronous request, an event stream) follows it through Redis pub/sub, and re-reads
its row every second, so an outage of Redis delays nothing but the progress events.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy.exc import SQLAlchemyError

from ...config import Settings
from ...errors import (
    QueueFull,
    ServiceBusy,
    StorageUnavailable,
)
from ...storage.base import utcnow
from ...storage.jobs import JobRecord
from ..base import Job, JobState, RunnerStats
from ..inputs import JobInputs, discard_file
from ..kinds import JobKinds, queue_name
from ..records import (
    DuplicateJob,
    JobRecorder,
    check_same_kind,
    database_down,
    job_event,
    job_from_row,
    refresh_from_row,
)
from .app import send_job
from .state import REDIS_ERRORS, BrokerState

__all__ = ["BROKER_RETRY_AFTER", "CeleryJobRunner", "broker_down"]

log = logging.getLogger(__name__)

TRACK_SECONDS = 30.0  # how long an API process follows a job nobody waits for
BROKER_RETRY_AFTER = 2  # seconds a client should wait after the broker failed to answer


class CeleryJobRunner:
    """JobRunner of an API process: jobs go to Celery workers; rows are the truth."""

    runs_jobs = False  # an API process runs no job: a graceful stop has nothing to drain

    def __init__(
        self,
        settings: Settings,
        celery: Celery,
        broker: BrokerState,
        kinds: JobKinds,
        *,
        recorder: JobRecorder,
        inputs: JobInputs,
        default_model: str,
        queues: list[str],
        check_upload: Callable[[Path], None],
        check_store: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.celery = celery
        self.broker = broker
        self.kinds = kinds
        self.recorder = recorder
        self.inputs = inputs
        self.default_model = default_model
        self.queues = queues
        self.check_upload = check_upload
        self.check_store = check_store
        self._tracked: dict[int, tuple[Job, float]] = {}
        self._lock = threading.Lock()
        self._listener: threading.Thread | None = None

    def init_app(self, app: Any) -> None:
        """Store on a Flask app as ``app.extensions['jobs']``."""
        app.extensions["jobs"] = self

    def shutdown(self) -> None:
        """Nothing to stop here: jobs run on the workers and queued ones stay queued."""

    # --- submitting ------------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        """Check the input, admit the job, keep its upload, write its row, send its task."""
        try:
            return self._submit(job)
        finally:
            discard_file(job.input)  # the upload now lives in the image store (or nowhere)

    def _submit(self, job: Job) -> Job:
        if job.idempotency_key:
            record = self.recorder.by_idempotency_key(job.owner, job.idempotency_key)
            if record is not None:
                return self._earlier(job, record)
        if job.input is not None and self.kinds[job.kind].input_is_audio:
            self.check_upload(job.input)  # hostile audio is refused here, before any worker
        self.check_store()  # images (and uploads) go there: refuse while it is down
        job.model = job.model or self.default_model
        queue = self.kinds.queue(job, self.default_model)
        document = self.kinds.document(job)
        self._admit(job)
        location = None
        try:
            if job.input is not None:
                location = self._keep_input(job)
            self.recorder.accept(job, document, input=location, queue=queue)
        except DuplicateJob as duplicate:  # the same key at the same moment
            self._unadmit(job, location)
            return self._earlier(job, duplicate.existing)
        except BaseException:
            self._unadmit(job, location)
            raise
        # From here the job is accepted: its row is the truth, whatever the broker does.
        try:
            send_job(self.celery, job.id, job.kind, job.owner, document, job.request_id, queue)
        except Exception as exc:
            log.warning("job %s: task not sent (%s); the reconciler sends it", job.id, exc)
        self._track(job)
        return job

    def _keep_input(self, job: Job) -> str:
        assert job.input is not None
        try:
            return self.inputs.keep(job.id, job.input)
        except Exception as exc:  # whatever the object store's client raises
            log.warning("job %s: its upload cannot be stored: %s", job.id, exc)
            raise StorageUnavailable(
                "the image store is not answering; retry shortly", retry_after=5
            ) from None

    def send_row(self, record: JobRecord) -> None:
        """Send a row's task again (the reconciler's hand)."""
        queue = record.queue or queue_name(record.model or self.default_model)  # rows of 0.2
        send_job(
            self.celery, record.id, record.kind, record.owner, record.work, record.request_id, queue
        )

    def _admit(self, job: Job) -> None:
        settings = self.settings
        try:
            verdict = self.broker.admit(
                job.id, job.owner, settings.queue_max, settings.queue_max_per_owner
            )
        except REDIS_ERRORS as exc:
            raise broker_down(exc) from None
        if verdict == 1:
            raise QueueFull(
                f"you have {settings.queue_max_per_owner} jobs queued or running; "
                "that is the limit",
                retry_after=5,
            )
        if verdict == 2:
            raise ServiceBusy(
                f"the queue is full ({settings.queue_max} jobs); retry later", retry_after=5
            )

    def _unadmit(self, job: Job, location: str | None) -> None:
        """A job that was not accepted after all: give back what it took (best effort;
        the reconciler heals the counters of what cannot be given back now)."""
        with contextlib.suppress(*REDIS_ERRORS):
            self.broker.release(job.id, job.owner)
        if location is not None:
            with contextlib.suppress(Exception):
                self.inputs.discard(job.id, location)

    def _earlier(self, job: Job, record: JobRecord) -> Job:
        """The job an earlier request with the same Idempotency-Key made."""
        check_same_kind(job, record)
        earlier = job_from_row(record)
        if not earlier.done:
            self._track(earlier)
        return earlier

    # --- reading ---------------------------------------------------------------------------
    def get(self, owner: str, job_id: str) -> Job | None:
        """The owner's job, as its row says."""
        return self.recorder.load(owner, job_id)

    def list_jobs(
        self,
        owner: str,
        *,
        states: Collection[JobState] = (),
        limit: int = 20,
        offset: int = 0,
    ) -> tuple[list[Job], int]:
        """The owner's jobs newest first, from their rows."""
        records, total = self.recorder.for_owner(
            owner, [state.value for state in states], limit, offset
        )
        return [job_from_row(r) for r in records], total

    def cancel(self, owner: str, job_id: str) -> Job | None:
        """Cancel a queued job now; ask the worker to stop a running one between steps."""
        record = self.recorder.row(owner, job_id)
        if record is None:
            return None
        if record.state in ("succeeded", "failed", "cancelled"):
            return job_from_row(record)
        store = self.recorder.store
        try:
            if record.state == JobState.QUEUED and store.update(
                job_id,
                only_if=(JobState.QUEUED.value,),
                state=JobState.CANCELLED.value,
                cancel_requested=True,
                finished_at=utcnow(),
                lease_expires_at=None,
            ):
                # Its task, if a worker ever gets it, finds the row finished and drops it.
                with contextlib.suppress(*REDIS_ERRORS):
                    self.broker.release(job_id, owner)
                if record.input:
                    with contextlib.suppress(Exception):
                        self.inputs.discard(job_id, record.input)
            else:
                store.update(job_id, only_if=("running",), cancel_requested=True)
            record = store.get(job_id, owner) or record
        except SQLAlchemyError as exc:
            raise database_down() from exc
        job = job_from_row(record)
        if job.done:
            with contextlib.suppress(*REDIS_ERRORS):
                self.broker.publish(job_event(job))
        return job

    def watch(self, job: Job, timeout: float = 15.0) -> Iterator[dict[str, Any] | None]:
        """Snapshots as the worker reports changes; None on quiet periods."""
        self._track(job)
        seen = -1
        while True:
            version = job.wait_for_change(seen, timeout)
            if version == seen:
                yield None
                continue
            seen = version
            yield job.snapshot()
            if job.done:
                return

    # --- operators -------------------------------------------------------------------------
    def stats(self) -> RunnerStats:
        """Queue depth per queue (from the broker), live workers and what they run."""
        try:
            workers = self.broker.workers()
            depths = self.broker.queue_depths(self.queues)
        except REDIS_ERRORS as exc:
            return RunnerStats(
                mode="distributed", queued=None, running=None, error=f"broker unreachable: {exc}"
            )
        # A model's queue by the model's name; speech-to-image queues by their own.
        queues = {name.removeprefix("model."): n for name, n in depths.items()}
        return RunnerStats(
            mode="distributed",
            queued=sum(queues.values()),
            running=sum(w["running"] for w in workers),
            queues=queues,
            workers=workers,
        )

    def health(self) -> dict[str, dict[str, Any]]:
        """Whether the broker answers."""
        try:
            self.broker.ping()
        except REDIS_ERRORS as exc:
            return {"broker": {"ok": False, "problem": f"{type(exc).__name__}: {exc}"}}
        return {"broker": {"ok": True}}

    # --- following jobs this process waits for --------------------------------------------
    def _track(self, job: Job) -> None:
        with self._lock:
            self._tracked[id(job)] = (job, time.monotonic())
            if self._listener is None or not self._listener.is_alive():
                self._listener = threading.Thread(
                    target=self._listen, name="job-events", daemon=True
                )
                self._listener.start()

    def _followed(self) -> list[Job]:
        """Jobs still followed; drops finished ones and those nobody waits for any more."""
        now = time.monotonic()
        with self._lock:
            for key, (job, since) in list(self._tracked.items()):
                if job.done or (job.waiters == 0 and now - since > TRACK_SECONDS):
                    del self._tracked[key]
            return [job for job, _ in self._tracked.values()]

    def _listen(self) -> None:
        """Apply published changes to followed jobs; re-read their rows every second."""
        pubsub = None
        last_poll = 0.0
        outage = False
        while True:
            jobs = self._followed()
            if not jobs:
                with self._lock:
                    if not self._tracked:
                        self._listener = None
                        if pubsub is not None:
                            with contextlib.suppress(*REDIS_ERRORS):
                                pubsub.close()
                        return
            if time.monotonic() - last_poll >= 1.0:  # the truth, whatever Redis does
                last_poll = time.monotonic()
                self._poll_rows(jobs)
            try:
                if pubsub is None:
                    pubsub = self.broker.redis.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(self.broker.events)
                message = pubsub.get_message(timeout=0.5)
                if message is not None:
                    event = json.loads(message["data"])
                    for job in jobs:
                        if job.id == event["id"]:
                            job.apply_snapshot(event)
            except REDIS_ERRORS:
                if not outage:  # once per outage, not once a second
                    log.warning("job events: Redis unreachable; following the rows meanwhile")
                outage, pubsub = True, None
                time.sleep(0.5)
                continue
            if outage:
                log.info("job events: Redis answers again")
                outage = False

    def _poll_rows(self, jobs: list[Job]) -> None:
        try:
            rows = self.recorder.store.get_many([job.id for job in jobs])
        except SQLAlchemyError:
            return  # the next poll, or an event, brings the news
        for job in jobs:
            record = rows.get(job.id)
            # Events are fresher than rows (progress is saved throttled): a row moves a job
            # on only when it says more than the job knows.
            if record is not None and (record.state != job.state.value or record.step > job.step):
                refresh_from_row(job, record)


def broker_down(exc: BaseException) -> ServiceBusy:
    """The 503 of a request that needed the broker while it did not answer."""
    log.warning("broker unreachable: %s", exc)
    return ServiceBusy(
        "the job queue is not answering; retry shortly", retry_after=BROKER_RETRY_AFTER
    )
