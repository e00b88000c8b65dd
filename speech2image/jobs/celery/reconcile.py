"""Reconciliation: the job rows are the truth; the broker is made to agree with them.

A broker may lose its data (a Redis without persistence restarts, a failover, a flush), a
worker may die holding jobs, an API process may die between writing a job's row and sending
its task. Every few seconds, and at once when Redis restarted or lost its data, one process
of the cluster (a PostgreSQL advisory lock decides which) looks at the unfinished rows:

- a job whose holder's lease lapsed and whose worker no longer beats (it died) goes back to the
  queue and its task is sent again; one that took its worker down too often is failed as
  ``job_failed_repeatedly``. A live worker that lost the database keeps its jobs;
- a queued job nobody holds whose task is not in its queue is sent again;
- a job whose input is gone is failed with ``upload_expired``;
- the admission counters are rebuilt from the rows.

Sending again is safe: a delivery of a job that is finished or held elsewhere is dropped, and
storing a job's images is idempotent. A job is therefore back in a queue within
``lease + interval`` seconds of its worker's death or of the broker's loss.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from ...errors import InputExpired, ServiceError
from ...storage.base import utcnow
from ...storage.jobs import JobRecord, JobStore
from ..records import poison_error
from .state import REDIS_ERRORS, BrokerState

__all__ = ["Reconciler"]

log = logging.getLogger(__name__)


class Reconciler:
    """Makes the broker agree with the job rows, continuously, one process at a time."""

    def __init__(
        self,
        store: JobStore,
        broker: BrokerState,
        *,
        send: Callable[[JobRecord], None],
        fail: Callable[[JobRecord, ServiceError], None],
        input_exists: Callable[[str], bool],
        lease_seconds: float,
        interval: float,
        max_attempts: int,
    ) -> None:
        self.store = store
        self.broker = broker
        self.send = send
        self.fail = fail
        self.input_exists = input_exists
        self.lease_seconds = lease_seconds
        self.interval = interval
        self.max_attempts = max_attempts
        # A row this young may belong to a submission still sending its task.
        self.grace = max(2.0, lease_seconds)
        self._lock_key = zlib.crc32(f"speech2image:{broker.prefix}".encode())
        self._busy = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.passes = 0
        self.last_report: dict[str, Any] | None = None

    def start(self) -> None:
        """Reconcile in a daemon thread until :meth:`stop`."""
        self._thread = threading.Thread(target=self._loop, name="job-reconciler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread."""
        self._stop.set()

    def _loop(self) -> None:
        seen: str | None = None
        last_pass = 0.0
        postponed = False
        delay = 0.0  # the first pass at once (a process starting after a crash)
        while not self._stop.wait(delay):
            delay = 1.0
            fresh = False
            try:
                run_id, lost = self.broker.identity()
            except REDIS_ERRORS:
                continue  # nothing can be sent meanwhile; the rows wait
            if seen is not None and (run_id != seen or lost):
                log.warning("Redis restarted or lost its data: reconciling the jobs now")
                fresh = True
            seen = run_id
            if not fresh and time.monotonic() - last_pass < self.interval:
                continue
            try:
                self.run_once(broker_lost=fresh)
                if postponed:
                    log.info("reconciliation runs again")
                postponed = False
            except (SQLAlchemyError, *REDIS_ERRORS) as exc:
                if not postponed:  # once per outage
                    log.warning("reconciliation postponed: %s", str(exc).splitlines()[0])
                postponed = True
            except Exception:
                log.exception("reconciliation failed")
            last_pass = time.monotonic()

    def run_once(self, *, broker_lost: bool = False) -> dict[str, Any]:
        """One pass (skipped when another process is reconciling); what it did."""
        with self._exclusive() as mine:
            if not mine:
                return {"skipped": True}
            report = self._reconcile(broker_lost)
        self.passes += 1
        self.last_report = report
        if any(report.values()):
            log.info("reconciliation: %s", report)
        return report

    def _reconcile(self, broker_lost: bool) -> dict[str, Any]:
        report = {
            "requeued": 0,
            "resent": 0,
            "failed": 0,
            "admission_fixed": 0,
            "held_by_live_workers": 0,
        }
        # After a loss every queued task is gone: no grace, send them all again now.
        older_than = utcnow() - dt.timedelta(seconds=0 if broker_lost else self.grace)
        rows = self.store.orphans(older_than)
        waiting = self.broker.queued_task_ids({r.queue for r in rows if r.queue})
        live = {worker["name"] for worker in self.broker.workers()}
        for row in rows:
            if row.worker in live:
                # Its lease lapsed while its worker still beats: the worker lost the database
                # for a while, not its life. It renews the lease when the database is back.
                report["held_by_live_workers"] += 1
                continue
            if row.worker is not None:  # its holder's lease lapsed: the worker died
                outcome = self.store.requeue(row, self.max_attempts)
                if outcome == "poison":
                    self.fail(row, poison_error(row.attempts))
                    report["failed"] += 1
                    continue
                if outcome != "requeued":
                    continue  # someone else moved it meanwhile
                report["requeued"] += 1
            elif row.id in waiting:
                continue  # its task waits in the broker
            else:
                report["resent"] += 1
            if row.input and not self.input_exists(row.input):
                self.fail(row, InputExpired("the uploaded audio is no longer available"))
                report["failed"] += 1
                continue
            self.send(row)
            self.store.update(row.id, only_if=("queued",))  # the grace starts again
        active = {r.id: r.owner for r in self.store.unfinished()}
        report["admission_fixed"] = self.broker.rebuild_admission(active, self.grace)
        return report

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[bool]:
        """This process's turn: a thread lock, and PostgreSQL's advisory lock across processes."""
        if not self._busy.acquire(blocking=False):
            yield False
            return
        try:
            if self.store.engine.dialect.name != "postgresql":
                yield True  # SQLite: one machine; the conditional updates keep it safe
                return
            with self.store.engine.connect() as connection:
                key = {"key": self._lock_key}
                if not connection.scalar(text("select pg_try_advisory_lock(:key)"), key):
                    yield False
                    return
                try:
                    yield True
                finally:
                    with contextlib.suppress(SQLAlchemyError):
                        connection.execute(text("select pg_advisory_unlock(:key)"), key)
                        connection.commit()
        finally:
            self._busy.release()
