"""Celery, the Flask way: the Celery app built from the settings, and the one task it runs."""

from __future__ import annotations

import functools
from typing import Any

from celery import Celery, Task

from ...config import Settings

__all__ = ["TASK_NAME", "celery_init_app", "guard_a_torn_down_connection", "send_job"]


TASK_NAME = "speech2image.run_job"


def celery_init_app(app: Any) -> Celery:
    """Build the Celery app from the Flask settings; each task runs in the app context."""
    settings: Settings = app.config["S2I_SETTINGS"]
    guard_a_torn_down_connection()

    class FlaskTask(Task):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery = Celery(app.name, task_cls=FlaskTask)
    visibility = settings.broker_visibility_timeout
    timeout = settings.redis_timeout_seconds
    celery.conf.update(
        broker_url=settings.broker_url,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "global_keyprefix": f"{settings.queue_prefix}:",
            "visibility_timeout": visibility,
            # Sweep for tasks of dead workers often enough to redo them soon after the timeout.
            "unacked_restore_interval": max(1, min(10, int(visibility // 4))),
            "unacked_restore_throttle": 1,
            # A frozen Redis must fail a send quickly (503), never hold a request.
            "socket_connect_timeout": timeout,
            "socket_timeout": timeout,
        },
        broker_connection_timeout=timeout,
        task_ignore_result=True,  # outcomes live in the job rows
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_default_queue=f"{settings.queue_prefix}.default",
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        broker_heartbeat=0,
        # A lost broker connection must not stop running jobs: their rows, not the broker,
        # say how they end, and a redelivered copy of a finished job is dropped.
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )

    @celery.task(
        name=TASK_NAME,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        shared=False,  # this app's task only (an API and a worker app may share a process)
        # The thread pool cannot enforce Celery's time limits: JobWorker stops jobs itself.
    )
    def run_job(
        self: Task,
        job_id: str,
        kind: str,
        owner: str,
        document: dict[str, Any],
        request_id: str | None = None,
    ) -> None:
        app.extensions["job_worker"].execute(job_id, kind, owner, document, request_id)

    app.extensions["celery"] = celery
    return celery


def send_job(
    celery: Celery,
    job_id: str,
    kind: str,
    owner: str,
    document: dict[str, Any],
    request_id: str | None,
    queue: str,
) -> None:
    """Send a job's task (its id is the job's id) to ``queue``; fail fast, never retry."""
    celery.send_task(
        TASK_NAME,
        args=[job_id, kind, owner, document, request_id],
        queue=queue,
        task_id=job_id,
        retry=False,
    )


def guard_a_torn_down_connection() -> None:
    """Make kombu's Redis channel report a torn-down connection as a connection error.

    When Redis goes away, Celery tears the broker connection down (its transport loses its
    client) while the worker's event loop still holds work for the old channel: a finished
    task's ack, the periodic sweep that restores unacked messages. kombu (5.7) then builds a
    Redis client from the missing connection and raises ``AttributeError``, which Celery takes
    for an unrecoverable error: the worker shuts down. Raised as a Redis ``ConnectionError``,
    it is what those paths already handle (an ack is logged and skipped: the broker or the
    reconciler gives the message back and its job's row decides; a sweep is retried next
    tick). Idempotent.
    """
    import redis
    from kombu.transport import redis as kombu_redis

    channel = kombu_redis.Channel
    if getattr(channel._connparams, "_s2i_guarded", False):
        return
    original = channel._connparams

    @functools.wraps(original)
    def connparams(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.connection is None or getattr(self.connection, "client", None) is None:
            raise redis.exceptions.ConnectionError("the broker connection was torn down")
        return original(self, *args, **kwargs)

    connparams._s2i_guarded = True  # type: ignore[attr-defined]
    channel._connparams = connparams
