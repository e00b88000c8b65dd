"""History database (SQLAlchemy) and image files (an image store), kept consistent.

Files are named by server-made ids. A batch of images is written to the image store (each
write atomic), then its rows are committed in one transaction; any failure removes every file
of the batch and rolls the rows back, so nothing half-written is left. New work stops at the
disk reserve, and deleting and cleaning up work on a full disk (see :mod:`.space`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    delete,
    event,
    func,
    select,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column, sessionmaker

from ..errors import StorageReadOnly
from ..imagestore import ImageStore, LocalImageStore
from . import migrate
from .base import Base, aware, new_id, utcnow
from .conversations import ConversationStore
from .jobs import JobStore
from .layout import history_location
from .space import SpareFile, check_room, spare_path, storage_error

__all__ = [
    "FILENAME_PATTERN",
    "ORPHAN_GRACE_SECONDS",
    "ImageRecord",
    "NewImage",
    "NewTranscript",
    "Storage",
    "TranscriptRecord",
    "get_storage",
    "make_engine",
]

log = logging.getLogger(__name__)

FILENAME_PATTERN = re.compile(r"^[0-9a-f]{32}\.png$")
ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
ORPHAN_GRACE_SECONDS = 600

T = TypeVar("T")


class TranscriptRecord(Base):
    """A transcript that images were generated from."""

    __tablename__ = "transcripts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    text: Mapped[str] = mapped_column(Text)
    language: Mapped[str | None] = mapped_column(String(8))
    duration: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ImageRecord(Base):
    """One generated image: who asked, what was asked, how it was made, where it lies."""

    __tablename__ = "images"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    filename: Mapped[str] = mapped_column(String(64), unique=True)
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str | None] = mapped_column(Text)
    model: Mapped[str] = mapped_column(String(128), index=True)
    model_reason: Mapped[str] = mapped_column(Text)
    seed: Mapped[int] = mapped_column(BigInteger)
    steps: Mapped[int] = mapped_column(Integer)
    guidance_scale: Mapped[float] = mapped_column(Float)
    scheduler: Mapped[str] = mapped_column(String(32))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON)
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)
    transcript_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("transcripts.id", ondelete="SET NULL"), index=True
    )
    # The image an edit started from (no foreign key: deleting a parent keeps its children).
    parent_id: Mapped[str | None] = mapped_column(String(32), index=True, nullable=True)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready row (the API adds the URL): every column but the owner and the hash."""
        row = {c.key: getattr(self, c.key) for c in self.__table__.columns if c.key not in _PRIVATE}
        row["created_at"] = aware(self.created_at).isoformat()
        return row


_PRIVATE = ("owner", "sha256")  # image columns the API does not show


@dataclasses.dataclass(frozen=True)
class NewImage:
    """An encoded image and its record fields, before it is stored."""

    png: bytes
    prompt: str
    negative_prompt: str | None
    model: str
    model_reason: str
    seed: int
    steps: int
    guidance_scale: float
    scheduler: str
    width: int
    height: int
    parameters: dict[str, Any]
    id: str = dataclasses.field(default_factory=new_id)
    parent_id: str | None = None  # the image it was edited from

    def record(self, owner: str, created_at: dt.datetime, transcript_id: str | None) -> ImageRecord:
        """Its history row: every field but the PNG, which the row names, sizes and hashes."""
        fields = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "png"
        }
        return ImageRecord(
            **fields,
            owner=owner,
            filename=f"{self.id}.png",
            bytes=len(self.png),
            sha256=hashlib.sha256(self.png).hexdigest(),
            created_at=created_at,
            transcript_id=transcript_id,
        )


@dataclasses.dataclass(frozen=True)
class NewTranscript:
    """A transcript to store with the images generated from it."""

    text: str
    language: str | None
    duration: float | None
    id: str = dataclasses.field(default_factory=new_id)


class Storage:
    """The image history: rows in a SQL database, PNGs in an image store; and the job rows."""

    def __init__(
        self,
        database_url: str,
        image_dir: Path,
        *,
        images: ImageStore | None = None,
        migrate_schema: bool = True,
        connect_timeout: float = 5.0,
        statement_timeout: float = 10.0,
        reserve_bytes: int = 0,
    ) -> None:
        self.image_dir = Path(image_dir).resolve()  # the local store's folder
        self.image_dir.mkdir(parents=True, exist_ok=True)
        self.images: ImageStore = images or LocalImageStore(self.image_dir)
        # An older release kept the SQLite history in the image folder: moved out if it can be.
        database_url = history_location(database_url, self.image_dir)
        self.sqlite_path = _sqlite_file(database_url)
        self.spare: SpareFile | None = None
        if self.sqlite_path is not None:
            self.sqlite_path.parent.mkdir(parents=True, exist_ok=True)
            self.spare = SpareFile(spare_path(self.sqlite_path))
        #: New work is refused (507) below this many free bytes; see :meth:`check_room`.
        self.reserve_bytes = reserve_bytes
        self.engine = make_engine(
            database_url, connect_timeout=connect_timeout, statement_timeout=statement_timeout
        )
        if migrate_schema:
            self.with_room(lambda: migrate.upgrade(self.engine))
        if self.spare is not None:
            self.spare.ensure(reserve_bytes)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.jobs = JobStore(self.engine, check_room=self.check_room)
        self.conversations = ConversationStore(self.engine)

    def init_app(self, app: Any) -> None:
        """Store on a Flask app as ``app.extensions['storage']``; take S2I_DISK_RESERVE_BYTES."""
        app.extensions["storage"] = self
        settings = app.config.get("S2I_SETTINGS")
        if settings is not None:
            self.reserve_bytes = int(settings.disk_reserve_bytes)

    # --- the disk ------------------------------------------------------------------------
    def places(self) -> list[Path]:
        """The local folders new work writes to: the SQLite history's and the image folder."""
        found = [self.sqlite_path.parent] if self.sqlite_path is not None else []
        folder = getattr(self.images, "folder", None)
        return found + ([Path(folder)] if folder is not None else [])

    def check_room(self) -> None:
        """Refuse new work before it writes anything: 507 below the disk reserve, 503 read-only.

        Job rows (``JobStore.add``) and image batches (:meth:`save_images`) call it; a runner
        that writes rows some other way must call it before writing them.
        """
        check_room(self.places(), self.reserve_bytes)
        if self.spare is not None:
            self.spare.ensure(self.reserve_bytes)  # back once there is room for it

    def with_room(self, work: Callable[[], T]) -> T:
        """Run ``work``, a write that frees space (a delete, a cleanup), even on a full disk."""
        if self.spare is None:
            return work()
        return self.spare.with_room(work, reserve=self.reserve_bytes)

    def _check_images_writable(self) -> None:
        """503 when the image folder cannot be written, before a row whose file must go goes."""
        folder = getattr(self.images, "folder", None)
        if folder is not None and Path(folder).is_dir() and not os.access(folder, os.W_OK):
            raise StorageReadOnly(
                "the image folder cannot be written (a read-only file system, or no "
                "permission): images cannot be removed until it is writable again"
            )

    def close(self) -> None:
        """Dispose of the connection pool."""
        self.engine.dispose()

    # --- writing -------------------------------------------------------------------------
    def save_images(
        self, owner: str, images: list[NewImage], transcript: NewTranscript | None = None
    ) -> list[ImageRecord]:
        """Store a batch of images (and the transcript they came from), or nothing at all.

        Idempotent for stable ids (see ``keyed_id``): a batch already stored is returned as it
        was stored, so a job that runs again after a crash or a redelivery stores nothing twice.
        """
        existing = self._stored(images)
        if images and len(existing) == len(images):
            return [existing[image.id] for image in images]
        self.check_room()  # before the first byte
        transcript_id = transcript.id if transcript is not None else None
        now = utcnow()
        records = [image.record(owner, now, transcript_id) for image in images]
        written: list[str] = []
        try:
            for image, record in zip(images, records, strict=True):
                self.images.put(record.filename, image.png)
                written.append(record.filename)
            with self._sessions.begin() as session:
                if transcript is not None:
                    session.add(
                        TranscriptRecord(
                            id=transcript.id,
                            owner=owner,
                            text=transcript.text,
                            language=transcript.language,
                            duration=transcript.duration,
                        )
                    )
                    session.flush()  # the images refer to it
                session.add_all(records)
        except IntegrityError:
            # The same job stored this batch meanwhile (a redelivered task ran twice at once):
            # its files are the ones the committed rows name, so they stay.
            stored = self._stored(images)
            if images and len(stored) == len(images):
                return [stored[image.id] for image in images]
            self._discard(written)
            raise
        except BaseException as exc:
            self._discard(written)
            refusal = storage_error(exc, "the images")
            if refusal is not None:
                log.error("cannot store %d image(s): %s", len(images), exc)
                raise refusal from None
            raise
        return records

    def _stored(self, images: list[NewImage]) -> dict[str, ImageRecord]:
        with self._sessions() as session:
            return {
                record.id: record
                for record in session.scalars(
                    select(ImageRecord).where(ImageRecord.id.in_([i.id for i in images]))
                )
            }

    def _discard(self, names: list[str]) -> None:
        for name in names:
            try:
                self.images.delete(name)
            except Exception:  # the orphan sweep removes it later
                log.exception("could not remove %s after a failed save", name)

    # --- reading -------------------------------------------------------------------------
    def get_image(self, owner: str, filename: str) -> ImageRecord | None:
        """The owner's record for ``filename``, or None (also for any malformed name)."""
        if not FILENAME_PATTERN.fullmatch(filename):
            return None
        with self._sessions() as session:
            return session.scalar(
                select(ImageRecord).where(
                    ImageRecord.filename == filename, ImageRecord.owner == owner
                )
            )

    def image_by_id(self, owner: str, image_id: str) -> ImageRecord | None:
        """The caller's image with this id (its file name without ``.png``), else None."""
        if not ID_PATTERN.fullmatch(image_id):
            return None
        return self.get_image(owner, f"{image_id}.png")

    def child_images(self, owner: str, parent_id: str) -> list[ImageRecord]:
        """The caller's images edited from ``parent_id``, oldest first."""
        with self._sessions() as session:
            rows = session.scalars(
                select(ImageRecord)
                .where(ImageRecord.owner == owner, ImageRecord.parent_id == parent_id)
                .order_by(ImageRecord.created_at, ImageRecord.id)
            )
            return list(rows)

    def transcripts(self, owner: str, ids: list[str]) -> dict[str, TranscriptRecord]:
        """The owner's transcripts among ``ids``, by id (for the history listing)."""
        wanted = sorted(set(ids))
        if not wanted:
            return {}
        with self._sessions() as session:
            rows = session.scalars(
                select(TranscriptRecord).where(
                    TranscriptRecord.id.in_(wanted), TranscriptRecord.owner == owner
                )
            ).all()
        return {row.id: row for row in rows}

    def image_source(self, record: ImageRecord) -> Path | BinaryIO | None:
        """What to serve for ``record``: a local file or the object's bytes; None if gone."""
        return self.images.source(record.filename)

    def image_bytes(self, record: ImageRecord) -> bytes | None:
        """The PNG of ``record``, or None if its file is gone."""
        source = self.image_source(record)
        if source is None:
            return None
        if isinstance(source, Path):
            try:
                return source.read_bytes()
            except FileNotFoundError:
                return None
        return source.read()

    def list_images(
        self,
        owner: str,
        *,
        limit: int = 20,
        offset: int = 0,
        model: str | None = None,
        since: dt.datetime | None = None,
        until: dt.datetime | None = None,
    ) -> tuple[list[ImageRecord], int]:
        """The owner's images newest first, and how many match in all."""
        conditions = [ImageRecord.owner == owner]
        # Stored times are UTC; SQLite compares them as text, so compare in UTC too.
        since = since.astimezone(dt.UTC) if since else None
        until = until.astimezone(dt.UTC) if until else None
        if model:
            conditions.append(ImageRecord.model == model)
        if since:
            conditions.append(ImageRecord.created_at >= since)
        if until:
            conditions.append(ImageRecord.created_at < until)
        with self._sessions() as session:
            total = session.scalar(select(func.count()).select_from(ImageRecord).where(*conditions))
            rows = session.scalars(
                select(ImageRecord)
                .where(*conditions)
                .order_by(ImageRecord.created_at.desc(), ImageRecord.id.desc())
                .limit(limit)
                .offset(offset)
            ).all()
        return list(rows), int(total or 0)

    def ping(self) -> None:
        """Raise if the database does not answer."""
        with self.engine.connect() as connection:
            connection.execute(select(1))

    def get_transcript(
        self, owner: str, transcript_id: str
    ) -> tuple[TranscriptRecord, list[ImageRecord]] | None:
        """The owner's transcript and the images made from it (newest first), or None."""
        if not ID_PATTERN.fullmatch(transcript_id):
            return None
        with self._sessions() as session:
            transcript = session.scalar(
                select(TranscriptRecord).where(
                    TranscriptRecord.id == transcript_id, TranscriptRecord.owner == owner
                )
            )
            if transcript is None:
                return None
            images = session.scalars(
                select(ImageRecord)
                .where(ImageRecord.transcript_id == transcript_id, ImageRecord.owner == owner)
                .order_by(ImageRecord.created_at.desc(), ImageRecord.id.desc())
            ).all()
        return transcript, list(images)

    # --- removing ------------------------------------------------------------------------
    def delete_image(self, owner: str, filename: str) -> bool:
        """Remove the owner's image, row and file together; False when there is none.

        The row goes first (in its transaction), then the file: a file left by a failure
        between the two has no row, so nobody is served it and the orphan sweep removes it.
        """
        if not FILENAME_PATTERN.fullmatch(filename):
            return False
        self._check_images_writable()

        def delete_row() -> int:
            with self._sessions.begin() as session:
                return int(
                    session.execute(
                        delete(ImageRecord).where(
                            ImageRecord.filename == filename, ImageRecord.owner == owner
                        )
                    ).rowcount  # type: ignore[attr-defined]
                )

        if not self.with_room(delete_row):  # works on a full disk too
            return False
        try:
            self.images.delete(filename)
        except Exception:  # the orphan sweep removes it later
            log.exception("could not remove %s after deleting its row", filename)
        return True

    def stats(self) -> dict[str, int]:
        """Image count and total bytes."""
        with self._sessions() as session:
            count, total = session.execute(
                select(func.count(ImageRecord.id), func.coalesce(func.sum(ImageRecord.bytes), 0))
            ).one()
        return {"count": int(count), "bytes": int(total)}

    # --- retention -----------------------------------------------------------------------
    def cleanup(
        self,
        *,
        max_age: dt.timedelta | None = None,
        max_count: int = 0,
        max_bytes: int = 0,
        now: dt.datetime | None = None,
    ) -> dict[str, int]:
        """Remove images past the age, count and byte limits (oldest first), rows and files."""
        now = now or utcnow()
        doomed: dict[str, tuple[str, int]] = {}
        with self._sessions() as session:
            rows = session.execute(
                select(
                    ImageRecord.id, ImageRecord.filename, ImageRecord.bytes, ImageRecord.created_at
                ).order_by(ImageRecord.created_at.desc(), ImageRecord.id.desc())
            ).all()
        kept_count = kept_bytes = 0
        for image_id, filename, size, created in rows:  # newest first
            too_old = max_age is not None and aware(created) < now - max_age
            over_count = max_count and kept_count >= max_count
            over_bytes = max_bytes and kept_bytes + size > max_bytes
            if too_old or over_count or over_bytes:
                doomed[image_id] = (filename, size)
            else:
                kept_count += 1
                kept_bytes += size
        removed_files = 0
        if doomed:
            self._check_images_writable()

            def delete_rows() -> None:
                with self._sessions.begin() as session:
                    for chunk in _chunks(list(doomed), 500):
                        session.execute(delete(ImageRecord).where(ImageRecord.id.in_(chunk)))

            self.with_room(delete_rows)  # works on a full disk too
            for filename, _ in doomed.values():
                if self._delete_file(filename):
                    removed_files += 1
        orphans = self._remove_orphans()
        return {
            "images_removed": len(doomed),
            "files_removed": removed_files,
            "bytes_removed": sum(size for _, size in doomed.values()),
            "orphan_files_removed": orphans,
        }

    def _remove_orphans(self) -> int:
        """Delete files that no row names (left by a crash), once they are clearly stale."""
        # A save in progress has files whose rows are not committed yet: leave young files.
        cutoff = utcnow() - dt.timedelta(seconds=ORPHAN_GRACE_SECONDS)
        candidates = [
            item.name
            for item in self.images.objects()
            if (FILENAME_PATTERN.fullmatch(item.name) or item.name.endswith(".tmp"))
            and item.modified < cutoff
        ]
        if not candidates:
            return 0
        with self._sessions() as session:
            known = set(session.scalars(select(ImageRecord.filename)))
        return sum(1 for name in candidates if name not in known and self._delete_file(name))

    def _delete_file(self, name: str) -> bool:
        try:
            return self.images.delete(name)
        except OSError as exc:  # the next cleanup's orphan sweep tries again
            log.error("could not remove %s: %s", name, exc)
            return False


def _sqlite_file(database_url: str) -> Path | None:
    """The file of a SQLite URL (None for other databases and in-memory SQLite)."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database).resolve()


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def make_engine(
    database_url: str, *, connect_timeout: float = 5.0, statement_timeout: float = 10.0
) -> Engine:
    """An engine for the history database whose every wait is bounded.

    PostgreSQL gets a connect timeout and a server-side statement timeout, and on the client
    side TCP keepalives, a TCP user timeout and a bound on every wait for the server (see
    ``answer_timeout``); SQLite gets WAL, foreign keys and a busy timeout. A database that does
    not answer then fails the call within the timeouts (an OperationalError, answered 503)
    instead of hanging a thread.
    """
    url = make_url(database_url)
    connect_args: dict[str, Any] = {}
    answer_within = answer_timeout(connect_timeout, statement_timeout)
    if url.get_backend_name() == "sqlite":
        connect_args = {"check_same_thread": False, "timeout": statement_timeout}
    elif url.get_backend_name() == "postgresql":
        connect_args["connect_timeout"] = max(1, math.ceil(connect_timeout))  # whole seconds
        options = url.query.get("options")
        timeout_option = f"-c statement_timeout={int(statement_timeout * 1000)}"
        connect_args["options"] = f"{options} {timeout_option}" if options else timeout_option
        # libpq: a network path that drops packets fails the connection (the kernel gives up
        # on unacknowledged data, or on keepalive probes of an idle pooled connection).
        connect_args |= {
            "keepalives": 1,
            "keepalives_idle": max(1, math.ceil(statement_timeout)),
            "keepalives_interval": max(1, math.ceil(connect_timeout / 3)),
            "keepalives_count": 3,
            "tcp_user_timeout": int(answer_within * 1000),
        }
    engine = create_engine(
        url,
        connect_args=connect_args,
        pool_pre_ping=True,
        pool_timeout=connect_timeout + statement_timeout,  # waiting for a pooled connection
    )
    if url.get_backend_name() == "sqlite":
        busy_ms = int(statement_timeout * 1000)
        event.listen(engine, "connect", lambda conn, _record: _sqlite_pragmas(conn, busy_ms))
    elif url.get_backend_name() == "postgresql" and url.get_driver_name() == "psycopg":
        bounded = _bounded_psycopg_connection(answer_within)
        event.listen(
            engine, "do_connect", lambda _dialect, _record, args, kw: bounded.connect(*args, **kw)
        )
    return engine


def answer_timeout(connect_timeout: float, statement_timeout: float) -> float:
    """How long a client waits for any answer of PostgreSQL before it drops the connection.

    The server stops a statement at ``statement_timeout`` and says so; this bound is for a
    server or a network path that stops answering altogether (a stalled proxy, a frozen host),
    which the TCP options cannot see when the peer's kernel still acknowledges every packet.
    """
    return statement_timeout + connect_timeout


def _bounded_psycopg_connection(seconds: float) -> Any:
    """A psycopg connection class whose every wait for the server ends after ``seconds``."""
    import psycopg
    from psycopg import errors as pg_errors

    # psycopg raises this (an OperationalError) when a wait's timeout expires.
    wait_timeout = getattr(pg_errors, "_WaitTimeout", psycopg.OperationalError)

    class BoundedConnection(psycopg.Connection):  # type: ignore[type-arg]
        def wait(self, gen: Any, *args: Any, **kwargs: Any) -> Any:
            if len(args) < 2:  # (interval, timeout) may come by position
                kwargs.setdefault("timeout", seconds)
            try:
                return super().wait(gen, *args, **kwargs)
            except wait_timeout:
                # A statement is in flight and its answer may still come: the connection is
                # in an unknown state. Close it (the pool then drops it) and free the thread.
                self.close()
                raise psycopg.OperationalError(
                    f"the database did not answer within {seconds:g} s; connection closed"
                ) from None

    return BoundedConnection


def _sqlite_pragmas(connection: Any, busy_ms: int) -> None:
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
    cursor.close()


def get_storage(app: Any) -> Storage:
    """The app's storage."""
    return app.extensions["storage"]
