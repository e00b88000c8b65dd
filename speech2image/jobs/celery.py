"""The distributed job runner: Celery workers fed through Redis, one queue per model.

API processes (which never import torch) validate a request, record the job, refuse hostile
audio, and send the task ``speech2image.run_job`` to the queue of the job's model. Workers
(``speech2image worker``) consume only the queues of the models they serve. Each worker holds
several tasks at once and hands them to an in-process :class:`LocalJobRunner`, which merges
compatible ones into one pipeline call. Workers publish every change of a job on Redis
pub/sub; whichever API process holds a waiting request or an event stream relays it.

Delivery: tasks are acknowledged late and rejected when their worker is lost, so a worker
killed mid-job leaves its task to be delivered again after the broker's visibility timeout.
A running job keeps its task invisible (it refreshes the task's place in kombu's unacked
index) and holds a lease, so a job longer than the visibility timeout still runs once.
Each delivery counts an attempt; past ``S2I_JOB_MAX_ATTEMPTS`` the job is failed as poison.

Every job is also a row of the history database's job table (when the app gives the runner
and the worker a :class:`~speech2image.storage.jobs.JobStore`): written by the API when the job
is accepted, marked running and finished by the worker. ``GET /jobs/<id>`` falls back to the
row when Redis no longer has the job (expired, flushed) or cannot be reached.

Redis keys, all under ``S2I_QUEUE_PREFIX``: ``job:<id>`` (state), ``events`` (pub/sub),
``cancel:<id>``, ``upload:<id>``, ``lease:<id>``, ``attempts:<id>``, ``deliveries:<id>``,
``active`` and
``active:<owner>`` (admission), ``worker:<name>`` (heartbeats).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import redis
from celery import Celery, Task
from celery import signals as celery_signals
from celery.exceptions import Reject
from sqlalchemy.exc import SQLAlchemyError

from ..config import Settings
from ..errors import QueueFull, ServiceBusy
from ..storage.jobs import JobStore
from . import TERMINAL, Job, JobState
from .recorder import JobRecorder, batch_key_json

__all__ = [
    "TASK_NAME",
    "CeleryJobRunner",
    "JobStates",
    "JobWorker",
    "celery_init_app",
    "pipeline_queue_name",
    "pipeline_queues",
    "queue_name",
]

log = logging.getLogger(__name__)

TASK_NAME = "speech2image.run_job"
REDIS_ERRORS = (redis.RedisError, OSError)
HEARTBEAT_SECONDS = 2.0
WORKER_TTL = 10  # a worker silent this long is gone
LEASE_TTL = 15  # a lease not refreshed this long belongs to a dead worker
TRACK_SECONDS = 30.0  # how long an API process follows a job nobody waits for

_ADMIT = """
if redis.call('SCARD', KEYS[2]) >= tonumber(ARGV[3]) then return 1 end
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 2 end
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[1])
return 0
"""

# Set the state record only if its current state is one of ARGV[3..]; 1 when set.
_TRANSITION = """
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
local state = cjson.decode(current)['state']
for i = 3, #ARGV do
  if ARGV[i] == state then
    redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
    return 1
  end
end
return 0
"""


def queue_name(model: str) -> str:
    """The Celery queue of a model (its loader name, e.g. ``sd:dreamshaper``)."""
    return f"model.{model}"


def pipeline_queue_name(image_model: str | None) -> str:
    """The queue of speech-to-image jobs: Whisper plus an image model named by the request
    (``sd:<name>``), or plus every model the automatic choice may pick (None)."""
    return f"pipeline.{image_model or 'auto'}"


def pipeline_queues(models: list[str], whisper: str, auto_models: list[str]) -> list[str]:
    """The speech-to-image queues a worker serving ``models`` can take."""
    if whisper not in models:
        return []
    queues = [pipeline_queue_name(m) for m in models if m.startswith("sd:")]
    if all(m in models for m in auto_models):
        queues.append(pipeline_queue_name(None))
    return queues


def redis_client(settings: Settings) -> redis.Redis:
    """A client of the broker's Redis that fails fast when Redis is away."""
    return redis.Redis.from_url(
        settings.broker_url,
        socket_connect_timeout=2,
        socket_timeout=10,
        health_check_interval=30,
        decode_responses=False,
    )


class JobStates:
    """Job state records and events in Redis (shared by API processes and workers)."""

    def __init__(self, client: redis.Redis, prefix: str, keep_seconds: float) -> None:
        self.redis = client
        self.prefix = prefix
        self.keep_seconds = int(keep_seconds)
        self.events = f"{prefix}:events"
        self._transition = client.register_script(_TRANSITION)
        self._admit = client.register_script(_ADMIT)

    def key(self, kind: str, *parts: str) -> str:
        """A Redis key under the prefix."""
        return ":".join((self.prefix, kind, *parts))

    def load(self, job_id: str) -> dict[str, Any] | None:
        """The job's record, or None."""
        raw = self.redis.get(self.key("job", job_id))
        return json.loads(raw) if raw else None

    def load_many(self, job_ids: list[str]) -> list[dict[str, Any] | None]:
        """Records of several jobs, in order."""
        if not job_ids:
            return []
        raws = self.redis.mget([self.key("job", i) for i in job_ids])
        return [json.loads(raw) if raw else None for raw in raws]

    def create(self, record: dict[str, Any]) -> None:
        """Write a new job's record, and index it under its owner (for GET /jobs)."""
        owned = self.key("owned", record["owner"])
        created = dt.datetime.fromisoformat(record["created_at"]).timestamp()
        self.redis.pipeline().set(
            self.key("job", record["id"]), json.dumps(record), ex=self.keep_seconds
        ).zadd(owned, {record["id"]: created}).expire(owned, int(self.keep_seconds) + 1).execute()

    def owned(self, owner: str) -> list[dict[str, Any]]:
        """The owner's job records still kept, newest first (expired ones dropped)."""
        owned = self.key("owned", owner)
        cutoff = time.time() - self.keep_seconds
        self.redis.zremrangebyscore(owned, "-inf", cutoff)
        ids = [
            i.decode() if isinstance(i, bytes) else i for i in self.redis.zrevrange(owned, 0, -1)
        ]
        return [record for record in self.load_many(ids) if record is not None]

    def transition(self, record: dict[str, Any], allowed: set[str]) -> bool:
        """Replace the record if its state is in ``allowed``; publish it. True if replaced."""
        done = self._transition(
            keys=[self.key("job", record["id"])],
            args=[json.dumps(record), self.keep_seconds, *sorted(allowed)],
        )
        if done:
            self.publish(record)
        return bool(done)

    def publish(self, record: dict[str, Any]) -> None:
        """Tell every API process about a change."""
        self.redis.publish(self.events, json.dumps(record))

    def admit(self, job_id: str, owner: str, max_queued: int, max_per_owner: int) -> int:
        """Count a job against the limits: 0 admitted, 1 owner full, 2 everything full."""
        return int(
            self._admit(
                keys=[self.key("active"), self.key("active", owner)],
                args=[job_id, max_queued, max_per_owner],
            )
        )

    def release(self, job_id: str, owner: str) -> None:
        """The job no longer counts against the limits."""
        self.redis.pipeline().srem(self.key("active"), job_id).srem(
            self.key("active", owner), job_id
        ).execute()


def job_from_record(record: dict[str, Any]) -> Job:
    """A Job object mirroring a record (on an API process)."""
    job = Job(
        kind=record["kind"],
        owner=record["owner"],
        work=None,
        model=record.get("model"),
        id=record["id"],
        created_at=dt.datetime.fromisoformat(record["created_at"]),
        request_id=record.get("request_id"),
    )
    job.apply_snapshot(record)
    return job


def _record(job: Job, owner: str) -> dict[str, Any]:
    return job.snapshot() | {"owner": owner, "request_id": job.request_id}


# --- the API side --------------------------------------------------------------------------


class CeleryJobRunner:
    """JobRunner of an API process: jobs go to Celery workers through Redis."""

    def __init__(
        self,
        settings: Settings,
        celery: Celery,
        states: JobStates,
        *,
        default_model: str,
        check_upload: Callable[[Path], None],
        rows: JobStore | None = None,
    ) -> None:
        self.settings = settings
        self.celery = celery
        self.states = states
        self.rows = (
            JobRecorder(rows, "api", settings.job_keep_seconds) if rows is not None else None
        )
        self.default_model = default_model
        self.check_upload = check_upload
        self._tracked: dict[int, tuple[Job, float]] = {}
        self._lock = threading.Lock()
        self._listener: threading.Thread | None = None

    def init_app(self, app: Any) -> None:
        """Store on a Flask app as ``app.extensions['jobs']``."""
        app.extensions["jobs"] = self

    # An API process runs no job itself: a graceful stop has nothing of its own to drain.
    runs_jobs = False

    def shutdown(self) -> None:
        """Nothing to stop here: jobs run on the workers and queued ones stay in the broker."""

    # --- the interface ---------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        """Check the input, count the job against the limits, record it and send its task."""
        from ..tasks import job_payload

        payload, upload = job_payload(job)
        if upload is not None:
            self.check_upload(upload)  # hostile audio is refused here, before any worker time
        model = job.model or self.default_model
        job.model = model
        try:
            verdict = self.states.admit(
                job.id, job.owner, self.settings.queue_max, self.settings.queue_max_per_owner
            )
        except REDIS_ERRORS as exc:
            raise _broker_down(exc) from None
        if verdict == 1:
            raise QueueFull(
                f"you have {self.settings.queue_max_per_owner} jobs queued or running; "
                "that is the limit",
                retry_after=5,
            )
        if verdict == 2:
            raise ServiceBusy(
                f"the queue is full ({self.settings.queue_max} jobs); retry later",
                retry_after=5,
            )
        try:
            if upload is not None:
                self.states.redis.set(
                    self.states.key("upload", job.id),
                    upload.read_bytes(),
                    ex=self.states.keep_seconds,
                )
            self.states.create(_record(job, job.owner))
            self._accept_row(job, model, payload)
            self.celery.send_task(
                TASK_NAME,
                args=[job.id, job.kind, job.owner, payload, job.request_id],
                queue=self._queue(job, model),
                task_id=job.id,
                retry=False,
            )
        except Exception as exc:
            if self.rows is not None and not isinstance(exc, ServiceBusy):
                with contextlib.suppress(SQLAlchemyError):  # accepted by nobody after all
                    self.rows.store.finish(
                        job.id,
                        JobState.FAILED.value,
                        error={"status": 503, "code": "service_busy", "message": "not queued"},
                    )
            with contextlib.suppress(*REDIS_ERRORS):
                self.states.release(job.id, job.owner)
                self.states.redis.delete(
                    self.states.key("job", job.id), self.states.key("upload", job.id)
                )
            if isinstance(exc, REDIS_ERRORS) or _is_connection_error(exc):
                raise _broker_down(exc) from None
            raise
        finally:
            if job.cleanup is not None:  # the upload now travels in Redis
                job.cleanup()
                job.cleanup = None
        self._track(job)
        return job

    @staticmethod
    def _queue(job: Job, model: str) -> str:
        """Speech-to-image goes to workers that serve Whisper and the image model it may use."""
        if job.kind != "speech_to_image":
            return queue_name(model)
        chosen = str(job.work.image_fields.get("model") or "auto").strip()
        return pipeline_queue_name(None if chosen == "auto" else f"sd:{chosen}")

    def _accept_row(self, job: Job, model: str, payload: dict[str, Any]) -> None:
        """The job's row in the history database, before its task is sent."""
        if self.rows is None:
            return
        try:
            self.rows.store.add(
                id=job.id,
                owner=job.owner,
                kind=job.kind,
                model=model,
                batch_key=batch_key_json(job.batch_key),
                work=payload,
                created_at=job.created_at,
                request_id=job.request_id,
            )
        except SQLAlchemyError as exc:
            log.error("cannot record job %s: %s", job.id, exc)
            raise ServiceBusy(
                "the job database is unavailable; retry in a moment", retry_after=5
            ) from None

    def _finish_row(self, job_id: str, state: str) -> None:
        if self.rows is None:
            return
        try:
            self.rows.store.finish(job_id, state)
        except SQLAlchemyError:
            log.exception("could not record the end of job %s in the job table", job_id)

    def _from_row(self, owner: str, job_id: str) -> Job | None:
        return self.rows.load(owner, job_id) if self.rows is not None else None

    def get(self, owner: str, job_id: str) -> Job | None:
        """The owner's job, from its record (or its row, when Redis lost or cannot say it)."""
        try:
            record = self.states.load(job_id)
        except REDIS_ERRORS as exc:
            with contextlib.suppress(ServiceBusy):
                job = self._from_row(owner, job_id)
                if job is not None and job.done:  # finished jobs stay readable
                    return job
            raise _broker_down(exc) from None
        if record is None:
            return self._from_row(owner, job_id)
        if record["owner"] != owner:
            return None
        return job_from_record(record)

    def list_jobs(
        self,
        owner: str,
        *,
        states: Collection[JobState] = (),
        limit: int = 20,
        offset: int = 0,
    ) -> tuple[list[Job], int]:
        """The owner's jobs newest first, from their records."""
        try:
            records = self.states.owned(owner)
        except REDIS_ERRORS as exc:
            raise _broker_down(exc) from None
        wanted = {state.value for state in states}
        mine = [r for r in records if not wanted or r["state"] in wanted]
        return [job_from_record(r) for r in mine[offset : offset + limit]], len(mine)

    def cancel(self, owner: str, job_id: str) -> Job | None:
        """Cancel a queued job now; ask the worker to stop a running one between steps."""
        try:
            record = self.states.load(job_id)
            if record is None or record["owner"] != owner:
                return None
            if record["state"] in TERMINAL:
                return job_from_record(record)
            self.states.redis.set(
                self.states.key("cancel", job_id), b"1", ex=self.states.keep_seconds
            )
            if record["state"] == JobState.QUEUED:
                cancelled = record | {"state": JobState.CANCELLED.value}
                if self.states.transition(cancelled, {JobState.QUEUED.value}):
                    self.states.release(job_id, owner)
                    self.states.redis.delete(self.states.key("upload", job_id))
                    self._finish_row(job_id, JobState.CANCELLED.value)
                    return job_from_record(cancelled)
            return job_from_record(self.states.load(job_id) or record)
        except REDIS_ERRORS as exc:
            raise _broker_down(exc) from None

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

    def stats(self) -> dict[str, Any]:
        """Queue depth per model, workers and what they run."""
        try:
            return cluster_status(self.states)
        except REDIS_ERRORS as exc:
            return {"mode": "distributed", "error": f"broker unreachable: {exc}"}

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
        """Apply published changes to followed jobs; re-read them each second (missed events)."""
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
            try:
                if pubsub is None:
                    pubsub = self.states.redis.pubsub(ignore_subscribe_messages=True)
                    pubsub.subscribe(self.states.events)
                message = pubsub.get_message(timeout=0.5)
                if message is not None:
                    record = json.loads(message["data"])
                    for job in jobs:
                        if job.id == record["id"]:
                            job.apply_snapshot(record)
                if time.monotonic() - last_poll >= 1.0:
                    last_poll = time.monotonic()
                    for job, record in zip(
                        jobs, self.states.load_many([j.id for j in jobs]), strict=True
                    ):
                        if record is not None:
                            job.apply_snapshot(record)
            except REDIS_ERRORS:
                if not outage:  # once per outage, not once a second
                    log.warning("job events: Redis unreachable; retrying every second")
                outage, pubsub = True, None
                time.sleep(1.0)
                continue
            if outage:
                log.info("job events: Redis answers again")
                outage = False


def _is_connection_error(exc: BaseException) -> bool:
    from kombu.exceptions import OperationalError

    return isinstance(exc, OperationalError)


def _broker_down(exc: BaseException) -> ServiceBusy:
    log.warning("broker unreachable: %s", exc)
    return ServiceBusy("the job queue is unreachable; retry shortly", retry_after=5)


def cluster_status(states: JobStates) -> dict[str, Any]:
    """Live workers (from their heartbeats) and the queue depth of each model."""
    client = states.redis
    workers = []
    for key in client.scan_iter(match=states.key("worker", "*"), count=100):
        raw = client.get(key)
        if raw:
            workers.append(json.loads(raw))
    workers.sort(key=lambda w: w["name"])
    models = sorted({m for w in workers for m in w["models"]})
    queues = {}
    for model in models:
        queues[model] = int(client.llen(f"{states.prefix}:{queue_name(model)}"))
    return {
        "mode": "distributed",
        "queued": sum(queues.values()),
        "running": sum(w["running"] for w in workers),
        "queues": queues,
        "workers": workers,
    }


# --- Celery, the Flask way -----------------------------------------------------------------


def celery_init_app(app: Any) -> Celery:
    """Build the Celery app from the Flask settings; each task runs in the app context."""
    settings: Settings = app.config["S2I_SETTINGS"]

    class FlaskTask(Task):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery = Celery(app.name, task_cls=FlaskTask)
    visibility = settings.broker_visibility_timeout
    celery.conf.update(
        broker_url=settings.broker_url,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "global_keyprefix": f"{settings.queue_prefix}:",
            "visibility_timeout": visibility,
            # Sweep for tasks of dead workers often enough to redo them soon after the timeout.
            "unacked_restore_interval": max(1, min(10, int(visibility // 4))),
            "unacked_restore_throttle": 1,
            "socket_connect_timeout": 2,
            "socket_timeout": 10,
        },
        task_ignore_result=True,  # outcomes live in the job records
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_default_queue=f"{settings.queue_prefix}.default",
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        broker_heartbeat=0,
    )

    @celery.task(
        name=TASK_NAME,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        # The thread pool cannot enforce Celery's time limits: JobWorker stops jobs itself.
    )
    def run_job(
        self: Task,
        job_id: str,
        kind: str,
        owner: str,
        payload: dict[str, Any],
        request_id: str | None = None,
    ) -> None:
        worker: JobWorker = app.extensions["job_worker"]
        worker.execute(job_id, kind, owner, payload, request_id)

    app.extensions["celery"] = celery
    return celery


# --- the worker side -----------------------------------------------------------------------


class JobWorker:
    """Runs delivered tasks through the worker's LocalJobRunner, reporting to Redis."""

    def __init__(
        self,
        settings: Settings,
        states: JobStates,
        local: Any,
        *,
        models: list[str],
        loader: Any,
        make_local_job: Callable[[str, str, str, dict[str, Any], Path | None], Job],
        pipelines: list[str] | None = None,
        rows: JobStore | None = None,
    ) -> None:
        self.settings = settings
        self.states = states
        self.rows = rows
        self.local = local
        self.models = models
        self.pipelines = list(pipelines or [])
        self.loader = loader
        self.make_local_job = make_local_job
        self.name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.shutting_down = threading.Event()
        self._delivery_tags: dict[str, str] = {}
        self._lock = threading.Lock()
        self._running: set[str] = set()
        self.started = time.time()
        self.jobs_done = 0

    def init_app(self, app: Any) -> None:
        """Store on a Flask app as ``app.extensions['job_worker']``; hook Celery's signals."""
        app.extensions["job_worker"] = self
        celery_signals.task_received.connect(self._on_received, weak=False)
        celery_signals.worker_shutting_down.connect(self._on_shutdown, weak=False)

    def queues(self) -> list[str]:
        """The queues this worker consumes: its models', and speech-to-image it can finish."""
        return [queue_name(m) for m in self.models] + self.pipelines

    def _on_received(self, sender: Any = None, request: Any = None, **_: Any) -> None:
        with contextlib.suppress(AttributeError), self._lock:
            self._delivery_tags[request.id] = request.message.delivery_tag

    def _on_shutdown(self, **_: Any) -> None:
        log.info("worker %s: shutting down after its running jobs", self.name)
        self.shutting_down.set()

    # --- heartbeats ------------------------------------------------------------------------
    def start_heartbeat(self) -> threading.Thread:
        """Announce this worker in Redis every few seconds (for /ready and /status)."""

        def beat() -> None:
            while not self.shutting_down.is_set():
                with contextlib.suppress(*REDIS_ERRORS):
                    self.states.redis.set(
                        self.states.key("worker", self.name),
                        json.dumps(self.describe()),
                        ex=WORKER_TTL,
                    )
                self.shutting_down.wait(HEARTBEAT_SECONDS)
            with contextlib.suppress(*REDIS_ERRORS):
                self.states.redis.delete(self.states.key("worker", self.name))

        thread = threading.Thread(target=beat, name="worker-heartbeat", daemon=True)
        thread.start()
        return thread

    def describe(self) -> dict[str, Any]:
        """What /status shows about this worker."""
        resident = {
            row["name"]: row.get("bytes", 0) for row in self.loader.status() if row.get("loaded")
        }
        with self._lock:
            running = len(self._running)
        return {
            "name": self.name,
            "pid": os.getpid(),
            "models": self.models,
            "queues": self.queues(),
            "resident_models": resident,
            "resident_bytes": sum(resident.values()),
            "running": running,
            "jobs_done": self.jobs_done,
            "batches_run": self.local.batches_run,
            "started_at": dt.datetime.fromtimestamp(self.started, dt.UTC).isoformat(),
        }

    # --- one delivery ----------------------------------------------------------------------
    def execute(
        self,
        job_id: str,
        kind: str,
        owner: str,
        payload: dict[str, Any],
        request_id: str | None,
    ) -> None:
        """Run one delivered job once: skip it if done, wait out a live duplicate."""
        states, client = self.states, self.states.redis
        with self._lock:
            tag = self._delivery_tags.pop(job_id, None)
        keeper = _Keeper(client, self.states, job_id, self.name, tag, self.settings)
        deliveries = states.key("deliveries", job_id)
        client.pipeline().incr(deliveries).expire(deliveries, states.keep_seconds).execute()
        while True:
            record = states.load(job_id)
            if record is None:
                log.warning("job %s: no record (expired); dropped", job_id)
                return
            if record["state"] in TERMINAL:
                log.info("job %s: already %s; delivery dropped", job_id, record["state"])
                self._row("finish", job_id, record)  # a no-op unless its row missed the end
                return
            if keeper.acquire():
                break
            # Another live worker runs it (delivered twice): wait for it to finish or die.
            keeper.touch_task()
            time.sleep(1.0)
        try:
            with self._lock:
                self._running.add(job_id)
            self._execute(record, kind, owner, payload, request_id, keeper)
        finally:
            keeper.release()
            with self._lock:
                self._running.discard(job_id)

    def _execute(
        self,
        record: dict[str, Any],
        kind: str,
        owner: str,
        payload: dict[str, Any],
        request_id: str | None,
        keeper: _Keeper,
    ) -> None:
        states, client, job_id = self.states, self.states.redis, record["id"]
        attempts = int(client.incr(states.key("attempts", job_id)))
        client.expire(states.key("attempts", job_id), states.keep_seconds)
        if attempts > self.settings.job_max_attempts:
            log.error("job %s: delivered %d times; failed as poison", job_id, attempts)
            self._finish(
                record
                | {
                    "state": JobState.FAILED.value,
                    "error": {
                        "status": 500,
                        "code": "job_failed_repeatedly",
                        "message": f"the job stopped its worker {attempts - 1} times; "
                        "it will not be tried again",
                    },
                },
                owner,
            )
            return
        running = record | {"worker": self.name}
        if not states.transition(running, {JobState.QUEUED.value, JobState.RUNNING.value}):
            return  # cancelled while queued
        self._row("start", job_id)
        upload: Path | None = None
        if kind in ("transcribe", "speech_to_image"):
            data = client.get(states.key("upload", job_id))
            if data is None:
                self._finish(
                    running
                    | {
                        "state": JobState.FAILED.value,
                        "error": {
                            "status": 410,
                            "code": "upload_expired",
                            "message": "the uploaded audio is no longer available",
                        },
                    },
                    owner,
                )
                return
            upload_dir = Path(self.settings.upload_dir)
            upload_dir.mkdir(parents=True, exist_ok=True)
            upload = upload_dir / f"upload-{uuid.uuid4().hex}"
            upload.write_bytes(data)
        job = self.make_local_job(job_id, kind, owner, payload, upload)
        job.request_id = request_id
        job.created_at = dt.datetime.fromisoformat(record["created_at"])
        self.local.submit(job)
        started = time.monotonic()
        timed_out = False
        for snapshot in self.local.watch(job, timeout=1.0):
            keeper.refresh()
            if client.exists(states.key("cancel", job_id)) and not job.done:
                self.local.cancel(owner, job_id)
            if self.shutting_down.is_set() and job.state == JobState.QUEUED:
                self.local.cancel(owner, job_id)  # not started: leave it to another worker
                client.decr(states.key("attempts", job_id))
                states.transition(record, {JobState.RUNNING.value})
                raise Reject("worker shutting down", requeue=True)
            if time.monotonic() - started > self.settings.job_time_limit and not job.done:
                timed_out = True
                self.local.cancel(owner, job_id)
            if snapshot is not None and not job.done:
                with contextlib.suppress(*REDIS_ERRORS):
                    states.transition(
                        running | _progress_fields(snapshot),
                        {JobState.QUEUED.value, JobState.RUNNING.value},
                    )
        final = running | _progress_fields(job.snapshot())
        if timed_out and job.state == JobState.CANCELLED:
            final |= {
                "state": JobState.FAILED.value,
                "error": {
                    "status": 504,
                    "code": "job_timeout",
                    "message": f"the job ran longer than {self.settings.job_time_limit:g} s",
                },
            }
        self._finish(final, owner)

    def _row(self, event: str, job_id: str, record: dict[str, Any] | None = None) -> None:
        """Mirror a change into the job's row; Redis stays the live state if the write fails."""
        if self.rows is None:
            return
        try:
            if event == "start":
                self.rows.start(job_id, self.name)
            elif record is not None:
                progress = record.get("progress") or {}
                self.rows.finish(
                    job_id,
                    record["state"],
                    stage=progress.get("stage"),
                    step=progress.get("step") or 0,
                    total=progress.get("total") or 0,
                    result=record.get("result"),
                    error=record.get("error"),
                    worker=self.name,
                )
        except (SQLAlchemyError, ValueError):
            log.exception("could not record %s of job %s in the job table", event, job_id)

    def _finish(self, record: dict[str, Any], owner: str) -> None:
        states, job_id = self.states, record["id"]
        states.transition(record, {JobState.QUEUED.value, JobState.RUNNING.value})
        self._row("finish", job_id, record)
        states.release(job_id, owner)
        states.redis.delete(
            states.key("upload", job_id),
            states.key("cancel", job_id),
            states.key("attempts", job_id),
        )
        self.jobs_done += 1


def _progress_fields(snapshot: dict[str, Any]) -> dict[str, Any]:
    keep = ("state", "progress", "result", "error", "queued_seconds")
    return {k: snapshot[k] for k in keep if k in snapshot}


class _Keeper:
    """Holds a job's lease and keeps its task invisible to other workers while it runs."""

    def __init__(
        self,
        client: redis.Redis,
        states: JobStates,
        job_id: str,
        owner_name: str,
        delivery_tag: str | None,
        settings: Settings,
    ) -> None:
        self.client = client
        self.lease_key = states.key("lease", job_id)
        self.owner_name = owner_name.encode()
        self.delivery_tag = delivery_tag
        self.unacked_index = f"{settings.queue_prefix}:unacked_index"
        # Refresh well within both the lease and the broker's visibility timeout.
        self.every = max(0.5, min(LEASE_TTL, settings.broker_visibility_timeout) / 3)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        """Take the lease; False while another live worker holds it."""
        if not self.client.set(self.lease_key, self.owner_name, nx=True, ex=LEASE_TTL):
            return False
        self._thread = threading.Thread(target=self._beat, name="job-lease", daemon=True)
        self._thread.start()
        return True

    def touch_task(self) -> None:
        """Keep this delivery invisible too while it waits for the duplicate's end."""
        if self.delivery_tag is not None:
            with contextlib.suppress(*REDIS_ERRORS):
                self.client.zadd(self.unacked_index, {self.delivery_tag: time.time()}, xx=True)

    def refresh(self) -> None:
        """Extend the lease and the task's invisibility now."""
        with contextlib.suppress(*REDIS_ERRORS):
            self.client.set(self.lease_key, self.owner_name, xx=True, ex=LEASE_TTL)
        self.touch_task()

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            self.refresh()

    def release(self) -> None:
        """Stop refreshing and give the lease back."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            with contextlib.suppress(*REDIS_ERRORS):
                if self.client.get(self.lease_key) == self.owner_name:
                    self.client.delete(self.lease_key)
