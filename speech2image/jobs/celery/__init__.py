"""The distributed job runner: Celery workers fed through Redis, rows in PostgreSQL the truth.

:mod:`.app` builds the Celery app and its one task; :mod:`.state` is what Redis holds
(admission counters, job events, heartbeats: all rebuildable); :mod:`.runner` is the API
side (the JobRunner of an API process); :mod:`.worker` the worker side; :mod:`.reconcile`
makes the broker agree with the rows after any fault.
"""

from __future__ import annotations

from .app import TASK_NAME, celery_init_app, send_job
from .reconcile import Reconciler
from .runner import CeleryJobRunner, broker_down
from .state import REDIS_ERRORS, BrokerState, redis_client
from .worker import JobWorker, LeaseKeeper

__all__ = [
    "REDIS_ERRORS",
    "TASK_NAME",
    "BrokerState",
    "CeleryJobRunner",
    "JobWorker",
    "LeaseKeeper",
    "Reconciler",
    "broker_down",
    "celery_init_app",
    "redis_client",
    "send_job",
]
