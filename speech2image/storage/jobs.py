"""Job rows: every accepted job is a row in the history database, so none is silently lost.

The row holds what is needed to run the job again (``work``: JSON, e.g. the validated image
request or the stored upload's path), its state and progress, the result or the error, and
who ran it. Any runner (local threads, Celery workers) writes through :class:`JobStore`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Integer,
    String,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Mapped, mapped_column, sessionmaker

from .base import Base, aware, utcnow
from .space import storage_error

__all__ = ["ACTIVE_STATES", "FINISHED_STATES", "JobRecord", "JobStore"]

ACTIVE_STATES = ("queued", "running")
FINISHED_STATES = ("succeeded", "failed", "cancelled")


class JobRecord(Base):
    """One job: what to run, where it is, how it ended."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    model: Mapped[str | None] = mapped_column(String(128))
    batch_key: Mapped[Any | None] = mapped_column(JSON)
    work: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16), index=True)
    stage: Mapped[str | None] = mapped_column(String(32))
    step: Mapped[int] = mapped_column(Integer, default=0)
    total: Mapped[int] = mapped_column(Integer, default=0)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    worker: Mapped[str | None] = mapped_column(String(128))
    request_id: Mapped[str | None] = mapped_column(String(64))

    def times(self) -> dict[str, dt.datetime | None]:
        """created/started/finished, timezone-aware UTC."""
        return {
            "created_at": aware(self.created_at),
            "started_at": aware(self.started_at) if self.started_at else None,
            "finished_at": aware(self.finished_at) if self.finished_at else None,
        }


class JobStore:
    """Reads and writes job rows; every method is one short transaction."""

    def __init__(self, engine: Engine, check_room: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._check_room = check_room

    def add(self, **fields: Any) -> JobRecord:
        """Insert a new job row (state ``queued`` unless given).

        New work: refused before the row is written when the disk is below its reserve (507
        ``storage_full``) or cannot be written (503), and 507 if the database finds no room.
        """
        if self._check_room is not None:
            self._check_room()
        now = utcnow()
        fields.setdefault("state", "queued")
        fields.setdefault("created_at", now)
        fields.setdefault("updated_at", now)
        record = JobRecord(**fields)
        try:
            with self._sessions.begin() as session:
                session.add(record)
        except OperationalError as exc:
            refusal = storage_error(exc, "the job")
            if refusal is not None:
                raise refusal from exc
            raise
        return record

    def update(self, job_id: str, *, only_if: Iterable[str] | None = None, **fields: Any) -> bool:
        """Set ``fields`` on a row (when its state is in ``only_if``, if given); True if set."""
        statement = update(JobRecord).where(JobRecord.id == job_id)
        if only_if is not None:
            statement = statement.where(JobRecord.state.in_(list(only_if)))
        with self._sessions.begin() as session:
            result = session.execute(statement.values(updated_at=utcnow(), **fields))
        return bool(result.rowcount)  # type: ignore[attr-defined]

    def start(self, job_id: str, worker: str) -> bool:
        """Mark a queued (or redelivered running) job as running here; count the attempt."""
        return self.update(
            job_id,
            only_if=ACTIVE_STATES,
            state="running",
            worker=worker,
            started_at=utcnow(),
            attempts=JobRecord.attempts + 1,
        )

    def finish(self, job_id: str, state: str, **fields: Any) -> bool:
        """Record the end of a job (once: a finished row is never changed again)."""
        if state not in FINISHED_STATES:
            raise ValueError(f"not a final state: {state!r}")
        return self.update(
            job_id, only_if=ACTIVE_STATES, state=state, finished_at=utcnow(), **fields
        )

    def claim(self, job_id: str, previous_worker: str | None, worker: str) -> bool:
        """Take an unfinished job over from a dead worker (only one claimant wins)."""
        statement = (
            update(JobRecord)
            .where(JobRecord.id == job_id, JobRecord.state.in_(list(ACTIVE_STATES)))
            .where(
                JobRecord.worker.is_(None)
                if previous_worker is None
                else JobRecord.worker == previous_worker
            )
            .values(worker=worker, state="queued", stage=None, step=0, updated_at=utcnow())
        )
        with self._sessions.begin() as session:
            return bool(session.execute(statement).rowcount)  # type: ignore[attr-defined]

    def get(self, job_id: str, owner: str | None = None) -> JobRecord | None:
        """A job by id (only the owner's, when ``owner`` is given)."""
        if "\x00" in job_id:  # a client's path id; PostgreSQL refuses NUL in any string
            return None
        conditions = [JobRecord.id == job_id]
        if owner is not None:
            conditions.append(JobRecord.owner == owner)
        with self._sessions() as session:
            return session.scalar(select(JobRecord).where(*conditions))

    def for_owner(
        self,
        owner: str,
        *,
        states: Iterable[str] = (),
        finished_after: dt.datetime | None = None,
        limit: int = 20,
        offset: int = 0,
    ) -> tuple[list[JobRecord], int]:
        """The owner's jobs newest first (finished ones only if they ended after the given
        time), and how many match in all."""
        conditions = [JobRecord.owner == owner]
        wanted = list(states)
        if wanted:
            conditions.append(JobRecord.state.in_(wanted))
        if finished_after is not None:
            conditions.append(
                (JobRecord.finished_at.is_(None)) | (JobRecord.finished_at >= finished_after)
            )
        with self._sessions() as session:
            total = session.scalar(select(func.count()).select_from(JobRecord).where(*conditions))
            rows = session.scalars(
                select(JobRecord)
                .where(*conditions)
                .order_by(JobRecord.created_at.desc(), JobRecord.id.desc())
                .limit(limit)
                .offset(offset)
            ).all()
        return list(rows), int(total or 0)

    def unfinished(self) -> list[JobRecord]:
        """Queued and running jobs, oldest first."""
        with self._sessions() as session:
            return list(
                session.scalars(
                    select(JobRecord)
                    .where(JobRecord.state.in_(list(ACTIVE_STATES)))
                    .order_by(JobRecord.created_at, JobRecord.id)
                )
            )

    def count_active(self, owner: str | None = None) -> dict[str, int]:
        """Queued and running jobs (of ``owner``, if given), by state."""
        conditions = [JobRecord.state.in_(list(ACTIVE_STATES))]
        if owner is not None:
            conditions.append(JobRecord.owner == owner)
        with self._sessions() as session:
            rows = session.execute(
                select(JobRecord.state, func.count()).where(*conditions).group_by(JobRecord.state)
            ).all()
        counts = dict.fromkeys(ACTIVE_STATES, 0)
        counts.update({state: int(n) for state, n in rows})
        return counts

    def expire(self, keep: dt.timedelta, now: dt.datetime | None = None) -> int:
        """Delete finished jobs older than ``keep``; how many were removed."""
        cutoff = (now or utcnow()) - keep
        with self._sessions.begin() as session:
            result = session.execute(
                delete(JobRecord).where(
                    JobRecord.state.in_(list(FINISHED_STATES)), JobRecord.finished_at < cutoff
                )
            )
        return int(result.rowcount)  # type: ignore[attr-defined]
