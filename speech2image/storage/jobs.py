"""Job rows: every accepted job is a row in the history database, so none is silently lost.

The row holds what is needed to run the job again (``work``: the kind's JSON document, and
``input``: where its upload is kept), its state and progress, the result or the error, who
holds it and until when (``worker``, ``lease_expires_at``), and how often it ran. In the
distributed mode the row is the truth: Redis only carries what can be rebuilt from rows.
Any runner (local threads, Celery workers) writes through :class:`JobStore`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Index,
    Integer,
    String,
    delete,
    false,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Mapped, mapped_column, sessionmaker

from .base import Base, aware, utcnow
from .space import storage_error

__all__ = ["ACTIVE_STATES", "FINISHED_STATES", "DuplicateJob", "JobRecord", "JobStore"]

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
    input: Mapped[str | None] = mapped_column(String(512))  # a path, or an object's name
    queue: Mapped[str | None] = mapped_column(String(160))  # its distributed queue
    idempotency_key: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    batch_size: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    suspect: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    deliveries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    __table_args__ = (
        Index("ix_jobs_owner_idempotency_key", "owner", "idempotency_key", unique=True),
    )

    def times(self) -> dict[str, dt.datetime | None]:
        """created/started/finished, timezone-aware UTC."""
        return {
            "created_at": aware(self.created_at),
            "started_at": aware(self.started_at) if self.started_at else None,
            "finished_at": aware(self.finished_at) if self.finished_at else None,
        }


class DuplicateJob(Exception):
    """The owner already made a job with this Idempotency-Key: ``existing`` is its row."""

    def __init__(self, existing: JobRecord) -> None:
        super().__init__(existing.id)
        self.existing = existing


class JobStore:
    """Reads and writes job rows; every method is one short transaction."""

    def __init__(self, engine: Engine, check_room: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._check_room = check_room

    def add(self, **fields: Any) -> JobRecord:
        """Insert a new job row (state ``queued`` unless given).

        Raises :class:`DuplicateJob` with the existing row when the owner already used the
        row's ``idempotency_key``. New work: refused before the row is written when the disk is
        below its reserve (507 ``storage_full``) or cannot be written (503), and 507 if the
        database finds no room.
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
        except IntegrityError:
            key = fields.get("idempotency_key")
            existing = self.by_idempotency_key(fields["owner"], key) if key else None
            if existing is None:
                raise
            raise DuplicateJob(existing) from None
        except OperationalError as exc:
            refusal = storage_error(exc, "the job")
            if refusal is not None:
                raise refusal from exc
            raise
        return record

    def by_idempotency_key(self, owner: str, key: str) -> JobRecord | None:
        """The owner's job made with Idempotency-Key ``key``, if any."""
        with self._sessions() as session:
            return session.scalar(
                select(JobRecord).where(JobRecord.owner == owner, JobRecord.idempotency_key == key)
            )

    def update(self, job_id: str, *, only_if: Iterable[str] | None = None, **fields: Any) -> bool:
        """Set ``fields`` on a row (when its state is in ``only_if``, if given); True if set."""
        statement = update(JobRecord).where(JobRecord.id == job_id)
        if only_if is not None:
            statement = statement.where(JobRecord.state.in_(list(only_if)))
        with self._sessions.begin() as session:
            result = session.execute(statement.values(updated_at=utcnow(), **fields))
        return bool(result.rowcount)  # type: ignore[attr-defined]

    def start(self, job_id: str, worker: str, batch_size: int = 1) -> bool:
        """Mark a queued (or redelivered running) job as running here; count the attempt.

        A distributed worker starts only a job it holds (its lease).
        """
        statement = (
            update(JobRecord)
            .where(JobRecord.id == job_id, JobRecord.state.in_(list(ACTIVE_STATES)))
            .where(or_(JobRecord.worker.is_(None), JobRecord.worker == worker))
            .values(
                state="running",
                worker=worker,
                started_at=utcnow(),
                updated_at=utcnow(),
                attempts=JobRecord.attempts + 1,
                batch_size=batch_size,
            )
        )
        with self._sessions.begin() as session:
            return bool(session.execute(statement).rowcount)  # type: ignore[attr-defined]

    def finish(
        self, job_id: str, state: str, *, usage: dict[str, float] | None = None, **fields: Any
    ) -> bool:
        """Record the end of a job (once: a finished row is never changed again).

        ``usage``: what it used, written as its usage row in the same transaction, so a job
        counts once whatever redeliveries and crashes happen around it.
        """
        if state not in FINISHED_STATES:
            raise ValueError(f"not a final state: {state!r}")
        if usage is None:
            return self.update(
                job_id, only_if=ACTIVE_STATES, state=state, finished_at=utcnow(), **fields
            )
        from .accounts import add_usage

        now = utcnow()
        with self._sessions.begin() as session:
            changed = session.execute(
                update(JobRecord)
                .where(JobRecord.id == job_id, JobRecord.state.in_(list(ACTIVE_STATES)))
                .values(state=state, finished_at=now, updated_at=now, **fields)
            ).rowcount  # type: ignore[attr-defined]
            if not changed:
                return False
            owner, kind = session.execute(
                select(JobRecord.owner, JobRecord.kind).where(JobRecord.id == job_id)
            ).one()
            add_usage(session, job_id, owner, kind, state, usage)
        return True

    def claim(self, record: JobRecord, worker: str) -> JobRecord | None:
        """Take an unfinished job over from a dead process (only one claimant wins).

        Returns the row as it now is (queued, held by ``worker``; a job that ran in a batch
        of several is refunded that attempt and runs alone next), or None if another took it.
        """
        values: dict[str, Any] = {"state": "queued", "stage": None, "step": 0, "total": 0}
        if record.state == "running":
            values = _after_holder_died(record)
        values.update(worker=worker, updated_at=utcnow())
        statement = (
            update(JobRecord)
            .where(JobRecord.id == record.id, JobRecord.state.in_(list(ACTIVE_STATES)))
            .where(
                JobRecord.worker.is_(None)
                if record.worker is None
                else JobRecord.worker == record.worker
            )
            .values(**values)
        )
        with self._sessions.begin() as session:
            if not session.execute(statement).rowcount:  # type: ignore[attr-defined]
                return None
        return self.get(record.id)

    def get_many(self, job_ids: Iterable[str]) -> dict[str, JobRecord]:
        """Rows by id (missing ones left out)."""
        wanted = [i for i in job_ids if "\x00" not in i]
        if not wanted:
            return {}
        with self._sessions() as session:
            rows = session.scalars(select(JobRecord).where(JobRecord.id.in_(wanted)))
            return {row.id: row for row in rows}

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

    def unfinished(self, limit: int | None = None) -> list[JobRecord]:
        """Queued and running jobs, oldest first."""
        statement = (
            select(JobRecord)
            .where(JobRecord.state.in_(list(ACTIVE_STATES)))
            .order_by(JobRecord.created_at, JobRecord.id)
        )
        if limit is not None:
            statement = statement.limit(limit)
        with self._sessions() as session:
            return list(session.scalars(statement))

    def count_active(self, owner: str | None = None, kind: str | None = None) -> dict[str, int]:
        """Queued and running jobs (of ``owner``, of ``kind``, if given), by state."""
        conditions = [JobRecord.state.in_(list(ACTIVE_STATES))]
        if owner is not None:
            conditions.append(JobRecord.owner == owner)
        if kind is not None:
            conditions.append(JobRecord.kind == kind)
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

    # --- holding jobs (the distributed mode: the row is the truth) ---------------------------
    def take(
        self, job_id: str, worker: str, lease_seconds: float, max_attempts: int
    ) -> tuple[str, JobRecord | None]:
        """A worker takes a delivered job: hold it with a lease until it starts and ends.

        Returns ``(outcome, row)``: ``taken``; ``missing`` (no row); ``finished``; ``held``
        (a live lease of another delivery holds it); ``poison`` (its solo runs took their
        worker down ``max_attempts`` times: fail it). A job whose holder died while it ran
        in a batch with others is refunded that attempt and marked ``suspect`` (it runs
        alone next), so batch-mates are never charged for another job's crash.
        """
        now = utcnow()
        with self._sessions.begin() as session:
            row = session.scalar(select(JobRecord).where(JobRecord.id == job_id).with_for_update())
            if row is None:
                return "missing", None
            if row.state in FINISHED_STATES:
                return "finished", row
            if row.lease_expires_at is not None and aware(row.lease_expires_at) > now:
                return "held", row
            values: dict[str, Any] = {}
            if row.state == "running":  # its holder died while it ran
                values = _after_holder_died(row)
                if row.batch_size <= 1 and row.attempts >= max_attempts:
                    return "poison", row
            values.update(
                worker=worker,
                lease_expires_at=now + dt.timedelta(seconds=lease_seconds),
                deliveries=row.deliveries + 1,
                updated_at=now,
            )
            changed = session.execute(
                update(JobRecord).where(*_unchanged(row, now)).values(**values)
            ).rowcount  # type: ignore[attr-defined]
            if not changed:
                return "held", row  # someone else changed it between our read and write
            for key, value in values.items():
                setattr(row, key, value)
            return "taken", row

    def renew(
        self, job_ids: Iterable[str], worker: str, lease_seconds: float
    ) -> tuple[set[str], set[str]]:
        """Extend ``worker``'s leases; returns (ids still held, ids asked to cancel)."""
        ids = list(job_ids)
        if not ids:
            return set(), set()
        now = utcnow()
        mine = (
            JobRecord.id.in_(ids),
            JobRecord.worker == worker,
            JobRecord.state.in_(list(ACTIVE_STATES)),
        )
        with self._sessions.begin() as session:
            session.execute(
                update(JobRecord)
                .where(*mine)
                .values(lease_expires_at=now + dt.timedelta(seconds=lease_seconds))
            )
            rows = session.execute(
                select(JobRecord.id, JobRecord.cancel_requested).where(*mine)
            ).all()
        return {r.id for r in rows}, {r.id for r in rows if r.cancel_requested}

    def let_go(self, job_id: str, worker: str) -> bool:
        """Give back a job this worker holds but never started (it goes back to the queue)."""
        statement = (
            update(JobRecord)
            .where(JobRecord.id == job_id, JobRecord.worker == worker)
            .where(JobRecord.state == "queued")
            .values(worker=None, lease_expires_at=None, updated_at=utcnow())
        )
        with self._sessions.begin() as session:
            return bool(session.execute(statement).rowcount)  # type: ignore[attr-defined]

    def orphans(self, older_than: dt.datetime) -> list[JobRecord]:
        """Unfinished rows nobody holds: no lease or an expired one, unchanged since
        ``older_than`` (so a submission still being sent is not taken for lost)."""
        now = utcnow()
        with self._sessions() as session:
            return list(
                session.scalars(
                    select(JobRecord)
                    .where(JobRecord.state.in_(list(ACTIVE_STATES)))
                    .where(
                        or_(
                            JobRecord.lease_expires_at.is_(None),
                            JobRecord.lease_expires_at < now,
                        )
                    )
                    .where(JobRecord.updated_at < older_than)
                    .order_by(JobRecord.created_at, JobRecord.id)
                )
            )

    def requeue(self, row: JobRecord, max_attempts: int) -> str:
        """Put back in the queue a job whose holder died: ``requeued``, ``poison`` (fail
        it) or ``changed`` (someone else moved it since ``row`` was read)."""
        values: dict[str, Any] = {}
        if row.state == "running":
            values = _after_holder_died(row)
            if row.batch_size <= 1 and row.attempts >= max_attempts:
                return "poison"
        now = utcnow()
        values.update(state="queued", worker=None, lease_expires_at=None, updated_at=now)
        with self._sessions.begin() as session:
            changed = session.execute(
                update(JobRecord).where(*_unchanged(row, now)).values(**values)
            ).rowcount  # type: ignore[attr-defined]
        return "requeued" if changed else "changed"


def _after_holder_died(row: JobRecord) -> dict[str, Any]:
    """What a running job's row becomes when its holder died: back to queued; a job that ran
    in a batch of several is refunded the attempt and runs alone next (``suspect``)."""
    values: dict[str, Any] = {"state": "queued", "stage": None, "step": 0, "total": 0}
    if row.batch_size > 1:
        values.update(attempts=max(0, row.attempts - 1), suspect=True, batch_size=0)
    return values


def _unchanged(row: JobRecord, now: dt.datetime) -> tuple[Any, ...]:
    """Conditions that hold only while the row is as ``row`` was read and nobody holds it
    (optimistic locking: SQLite has no row locks, and PostgreSQL's lock covers only take)."""
    lease = JobRecord.lease_expires_at
    return (
        JobRecord.id == row.id,
        JobRecord.state == row.state,
        JobRecord.worker.is_(None) if row.worker is None else JobRecord.worker == row.worker,
        JobRecord.attempts == row.attempts,
        JobRecord.deliveries == row.deliveries,
        or_(lease.is_(None), lease <= now),
    )
