"""Celery, the Flask way: the Celery app built from the settings, and the one task it runs."""

from __future__ import annotations

import functools
import logging
from typing import Any

from celery import Celery, Task
from kombu.message import Message

from ...config import Settings

__all__ = ["TASK_NAME", "celery_init_app", "guard_acks_on_a_lost_connection", "send_job"]

log = logging.getLogger(__name__)

TASK_NAME = "speech2image.run_job"


def celery_init_app(app: Any) -> Celery:
    """Build the Celery app from the Flask settings; each task runs in the app context."""
    settings: Settings = app.config["S2I_SETTINGS"]
    guard_acks_on_a_lost_connection()

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


def _connection_gone(message: Message) -> bool:
    transport = getattr(message.channel, "connection", None)
    return transport is None or getattr(transport, "client", None) is None


def guard_acks_on_a_lost_connection() -> None:
    """Let an ack or reject that finds its broker connection torn down be skipped, not fatal.

    When Redis goes away while a finished task's ack waits in the worker's event loop, kombu
    (5.7) tears the connection down first and the ack then raises ``AttributeError`` (its
    transport has no client any more). Celery takes that for an unrecoverable error and the
    worker exits. A message left unacked is safe here: the broker gives it back after the
    visibility timeout, or the reconciler resends the job, and a delivery of a finished job
    is dropped by its row. So such an ack is logged and skipped. Idempotent.
    """
    if getattr(Message.ack_log_error, "_s2i_guarded", False):
        return

    def guarded(method: Any) -> Any:
        @functools.wraps(method)
        def call(self: Message, logger: Any, errors: Any, *args: Any, **kwargs: Any) -> Any:
            try:
                return method(self, logger, errors, *args, **kwargs)
            except AttributeError:
                if not _connection_gone(self):
                    raise
                log.warning(
                    "could not %s task message %s: its broker connection is gone; the broker "
                    "or the reconciler gives it back and its job's row decides what happens",
                    method.__name__.split("_")[0],
                    self.delivery_tag,
                )
                return None

        call._s2i_guarded = True  # type: ignore[attr-defined]
        return call

    Message.ack_log_error = guarded(Message.ack_log_error)  # type: ignore[method-assign]
    Message.reject_log_error = guarded(Message.reject_log_error)  # type: ignore[method-assign]
