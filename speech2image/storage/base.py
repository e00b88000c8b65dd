"""What every table of the history shares: the declarative base, ids and UTC times."""

from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy.orm import DeclarativeBase

__all__ = ["Base", "aware", "keyed_id", "new_id", "utcnow"]


def utcnow() -> dt.datetime:
    """Now, timezone-aware UTC."""
    return dt.datetime.now(dt.UTC)


def new_id() -> str:
    """A server-made id: 32 hex digits."""
    return uuid.uuid4().hex


_KEYED = uuid.UUID("6f0c2a57-93a4-4c1e-9d7b-2f1d8c5e4a10")


def keyed_id(key: str, part: str) -> str:
    """A stable id (32 hex digits) for ``part`` of the thing ``key`` names, e.g. a job's image."""
    return uuid.uuid5(_KEYED, f"{key}:{part}").hex


class Base(DeclarativeBase):
    """Declarative base of the history tables."""


def aware(moment: dt.datetime) -> dt.datetime:
    """``moment`` as timezone-aware UTC (SQLite gives naive datetimes back)."""
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
