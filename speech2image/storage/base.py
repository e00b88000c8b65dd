"""What every table of the history shares: the declarative base, ids and UTC times."""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy.orm import DeclarativeBase

__all__ = ["Base", "aware", "keyed_id", "new_id", "utcnow"]

_KEYED = uuid.UUID("6f1c2d4e-8b1a-4f7e-9c55-5e2a1b0d7c3f")


def utcnow() -> dt.datetime:
    """Now, timezone-aware UTC."""
    return dt.datetime.now(dt.UTC)


def new_id() -> str:
    """A server-made id: 32 hex digits."""
    return uuid.uuid4().hex


def keyed_id(key: str, part: str | int) -> str:
    """A stable id for ``part`` of ``key`` (image N of job J): a job run twice stores once."""
    return uuid.uuid5(_KEYED, f"{key}/{part}").hex


class Base(DeclarativeBase):
    """Declarative base of the history tables."""


def aware(moment: dt.datetime) -> dt.datetime:
    """``moment`` as timezone-aware UTC (SQLite gives naive datetimes back)."""
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
