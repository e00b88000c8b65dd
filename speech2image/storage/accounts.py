"""Accounts: API keys (hashed), usage rows written with each job's end, webhook deliveries.

A key's secret is shown once when it is made; only its SHA-256 is stored (the secret is 32
random bytes, so a fast hash is enough: there is nothing to guess). Its short ``prefix``
names it in lists and logs. Every request looks its key up (one indexed read), so a revoked
key is refused at its next request in every process.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    Integer,
    String,
    Text,
    func,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column, sessionmaker

from .base import Base, aware, new_id, utcnow

__all__ = [
    "KEY_PREFIX",
    "SCOPES",
    "ApiKeyRecord",
    "DeliveryRecord",
    "DuplicateKeyName",
    "KeyStore",
    "UsageRecord",
    "hash_secret",
    "key_owner",
    "usage_totals",
]

KEY_PREFIX = "s2i_"
SCOPES = ("transcribe", "generate", "edit", "admin")
USAGE_FIELDS = ("audio_seconds", "images", "pixel_steps", "device_seconds")
LAST_USED_EVERY = dt.timedelta(seconds=60)  # last_used_at is written at most this often


def hash_secret(secret: str) -> str:
    """The stored form of a key's secret."""
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def key_owner(key_id: str) -> str:
    """The owner of a database key's records (its id, never its secret)."""
    return "key:" + key_id


class ApiKeyRecord(Base):
    """One API key: its name, scopes, limits and state; the secret only as a hash."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[str]] = mapped_column(JSON)
    models: Mapped[list[str] | None] = mapped_column(JSON)
    quotas: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    webhook_url: Mapped[str | None] = mapped_column(Text)
    webhook_secret: Mapped[str | None] = mapped_column(String(64))
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))

    @property
    def owner(self) -> str:
        """The owner string of this key's records."""
        return key_owner(self.id)

    def usable(self, now: dt.datetime | None = None) -> bool:
        """Not revoked, not expired."""
        now = now or utcnow()
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or aware(self.expires_at) > now

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, without the hash or the webhook secret."""

        def when(moment: dt.datetime | None) -> str | None:
            return aware(moment).isoformat() if moment is not None else None

        return {
            "id": self.id,
            "name": self.name,
            "prefix": self.prefix,
            "scopes": list(self.scopes),
            "models": self.models,
            "quotas": self.quotas,
            "webhook_url": self.webhook_url,
            "expires_at": when(self.expires_at),
            "last_used_at": when(self.last_used_at),
            "revoked_at": when(self.revoked_at),
            "created_at": when(self.created_at),
        }


class UsageRecord(Base):
    """What one finished job used; its id is the job's, so a job counts once."""

    __tablename__ = "usage"

    job_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16))
    audio_seconds: Mapped[float] = mapped_column(Float)
    images: Mapped[int] = mapped_column(Integer)
    pixel_steps: Mapped[int] = mapped_column(BigInteger)
    device_seconds: Mapped[float] = mapped_column(Float)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), index=True)


class DeliveryRecord(Base):
    """A webhook delivery of one job's end: retried with back-off until it lands or gives up."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(32), index=True)
    owner: Mapped[str] = mapped_column(String(64))
    url: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), index=True)  # pending, delivered, failed
    attempts: Mapped[int] = mapped_column(Integer)
    next_attempt_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    delivered_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (shown on the job)."""
        return {
            "url": self.url,
            "state": self.state,
            "attempts": self.attempts,
            "last_status": self.last_status,
            "last_error": self.last_error,
            "delivered_at": aware(self.delivered_at).isoformat() if self.delivered_at else None,
        }


class DuplicateKeyName(Exception):
    """Another key has this name."""


class KeyStore:
    """API keys: create, look up by secret, list, rename, revoke."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    def create(
        self,
        name: str,
        scopes: list[str],
        *,
        models: list[str] | None = None,
        quotas: dict[str, Any] | None = None,
        expires_at: dt.datetime | None = None,
        webhook_url: str | None = None,
    ) -> tuple[ApiKeyRecord, str]:
        """A new key and its secret (shown once). Raises DuplicateKeyName."""
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        record = ApiKeyRecord(
            id=new_id(),
            name=name,
            prefix=secret[:12],
            secret_hash=hash_secret(secret),
            scopes=list(scopes),
            models=models,
            quotas=quotas,
            webhook_url=webhook_url,
            webhook_secret=secrets.token_hex(32),
            expires_at=expires_at,
            created_at=utcnow(),
        )
        try:
            with self._sessions.begin() as session:
                session.add(record)
        except IntegrityError:
            raise DuplicateKeyName(name) from None
        return record, secret

    def by_secret(self, secret: str) -> ApiKeyRecord | None:
        """The key with this secret (revoked and expired ones too); marks it used."""
        digest = hash_secret(secret)
        with self._sessions() as session:
            record = session.scalar(select(ApiKeyRecord).where(ApiKeyRecord.secret_hash == digest))
        if record is not None and record.usable():
            now = utcnow()
            last = record.last_used_at
            if last is None or now - aware(last) > LAST_USED_EVERY:
                with self._sessions.begin() as session:
                    session.execute(
                        update(ApiKeyRecord)
                        .where(ApiKeyRecord.id == record.id)
                        .values(last_used_at=now)
                    )
                record.last_used_at = now
        return record

    def get(self, ref: str) -> ApiKeyRecord | None:
        """A key by id, name or prefix."""
        with self._sessions() as session:
            for column in (ApiKeyRecord.id, ApiKeyRecord.name, ApiKeyRecord.prefix):
                found = session.scalars(select(ApiKeyRecord).where(column == ref)).all()
                if len(found) == 1:
                    return found[0]
        return None

    def by_owner(self, owner: str) -> ApiKeyRecord | None:
        """The database key whose records are ``owner``'s."""
        if not owner.startswith("key:"):
            return None
        with self._sessions() as session:
            return session.get(ApiKeyRecord, owner.removeprefix("key:"))

    def names(self, owners: list[str]) -> dict[str, str]:
        """Key names by owner (database keys only)."""
        ids = [o.removeprefix("key:") for o in owners if o.startswith("key:")]
        if not ids:
            return {}
        with self._sessions() as session:
            rows = session.execute(
                select(ApiKeyRecord.id, ApiKeyRecord.name).where(ApiKeyRecord.id.in_(ids))
            ).all()
        return {key_owner(i): n for i, n in rows}

    def list(self) -> list[ApiKeyRecord]:
        """Every key, oldest first."""
        with self._sessions() as session:
            return list(session.scalars(select(ApiKeyRecord).order_by(ApiKeyRecord.created_at)))

    def change(self, key_id: str, **fields: Any) -> ApiKeyRecord | None:
        """Set fields (name, scopes, models, quotas, webhook_url, expires_at); None if gone."""
        try:
            with self._sessions.begin() as session:
                record = session.get(ApiKeyRecord, key_id)
                if record is None:
                    return None
                for name, value in fields.items():
                    setattr(record, name, value)
        except IntegrityError:
            raise DuplicateKeyName(fields.get("name", "")) from None
        return record

    def revoke(self, key_id: str) -> ApiKeyRecord | None:
        """Revoke a key (once; later calls keep the first time)."""
        with self._sessions.begin() as session:
            record = session.get(ApiKeyRecord, key_id)
            if record is not None and record.revoked_at is None:
                record.revoked_at = utcnow()
        return record


def add_usage(session: Session, job_id: str, owner: str, kind: str, state: str, use: dict) -> bool:
    """Insert a job's usage row inside the caller's transaction (the job's final write)."""
    if session.get(UsageRecord, job_id) is not None:
        return False
    session.add(
        UsageRecord(
            job_id=job_id,
            owner=owner,
            kind=kind,
            state=state,
            audio_seconds=float(use.get("audio_seconds", 0.0)),
            images=int(use.get("images", 0)),
            pixel_steps=int(use.get("pixel_steps", 0)),
            device_seconds=float(use.get("device_seconds", 0.0)),
            created_at=utcnow(),
        )
    )
    return True


def usage_totals(
    engine: Engine,
    owner: str | None,
    since: dt.datetime,
    until: dt.datetime | None = None,
) -> dict[str, float | int]:
    """Sums of the usage rows of ``owner`` (everyone: None) in [since, until)."""
    columns = [func.coalesce(func.sum(getattr(UsageRecord, f)), 0) for f in USAGE_FIELDS]
    statement = select(func.count(), *columns).where(UsageRecord.created_at >= since)
    if until is not None:
        statement = statement.where(UsageRecord.created_at < until)
    if owner is not None:
        statement = statement.where(UsageRecord.owner == owner)
    with Session(engine) as session:
        jobs, *sums = session.execute(statement).one()
    totals: dict[str, float | int] = {"jobs": int(jobs)}
    for field, value in zip(USAGE_FIELDS, sums, strict=True):
        totals[field] = round(float(value), 3) if "seconds" in field else int(value)
    return totals
