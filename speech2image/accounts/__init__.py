"""Accounts: keys in the database, usage per key, quotas at admission.

:class:`Accounts` lives on the app (``app.extensions['accounts']``). The job views call
:func:`admit` for every job before it is handed to a runner: the key's model allow-list and
its quotas are checked there, before any model work.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from flask import Flask, current_app, g
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import Forbidden, TooManyRequests

from ..errors import ServiceError
from ..storage.accounts import KeyStore, usage_totals
from ..storage.base import utcnow
from .quotas import MemoryCounter, QuotaExceeded, Quotas, RedisCounter

__all__ = ["Accounts", "QuotaExceededError", "admit", "get_accounts"]

log = logging.getLogger(__name__)


class QuotaExceededError(ServiceError, TooManyRequests):
    """The request would pass one of its key's quotas."""

    error = "quota_exceeded"
    openai_code = "insufficient_quota"


class ModelNotAllowed(ServiceError, Forbidden):
    """The key may not use this model."""

    error = "model_not_allowed"


class Accounts:
    """Keys, usage sums and quotas of one deployment."""

    def __init__(self, settings: Any, storage: Any, redis: Any = None) -> None:
        self.settings = settings
        self.engine = storage.engine
        self.keys = KeyStore(storage.engine)
        counter = (
            RedisCounter(redis, settings.queue_prefix) if redis is not None else MemoryCounter()
        )
        self.quotas = Quotas(settings.quota_default, counter, self.used)

    def init_app(self, app: Flask) -> None:
        """Store on the app as ``app.extensions['accounts']``."""
        app.extensions["accounts"] = self

    def used(self, owner: str | None, since: dt.datetime, until: dt.datetime) -> dict[str, Any]:
        """Usage-row totals of ``owner`` (everyone: None) in [since, until)."""
        return usage_totals(self.engine, owner, since, until)

    def usage_by_owner(self) -> dict[str, dict[str, float]]:
        """Totals per owner since the start (for the Prometheus counters)."""
        from sqlalchemy import func, select
        from sqlalchemy.orm import Session

        from ..storage.accounts import USAGE_FIELDS, UsageRecord

        columns = [func.sum(getattr(UsageRecord, f)) for f in USAGE_FIELDS]
        with Session(self.engine) as session:
            rows = session.execute(
                select(UsageRecord.owner, *columns).group_by(UsageRecord.owner)
            ).all()
        return {
            owner: {f: float(v or 0) for f, v in zip(USAGE_FIELDS, sums, strict=True)}
            for owner, *sums in rows
        }


def get_accounts(app: Flask | None = None) -> Accounts:
    """The app's accounts service."""
    return (app or current_app).extensions["accounts"]


def admit(job: Any) -> None:
    """Refuse a job its key may not run: a model outside its allow-list (403), a quota it
    would pass (429 ``quota_exceeded``). Reserves its estimated use under the quotas."""
    accounts: Accounts | None = current_app.extensions.get("accounts")
    if accounts is None:
        return
    key = getattr(g, "api_key", None)
    if key is not None and key.models and job.model:
        short = job.model.split(":", 1)[-1]
        if job.model not in key.models and short not in key.models:
            raise ModelNotAllowed(
                f"this key may not use the model {short!r} (allowed: {', '.join(key.models)})",
                details={"field": "model"},
            )
    caps = key.quotas if key is not None else None
    if not caps and not accounts.quotas.default:
        return
    from ..kinds import get_job_kinds

    estimate = get_job_kinds(current_app).estimate_usage(job)
    now = utcnow()
    try:
        accounts.quotas.reserve(job.owner, caps, estimate, now)
    except QuotaExceeded as exc:
        raise QuotaExceededError(
            f"this request would pass the {exc.quota} quota: used {exc.used:g}, "
            f"requested {exc.requested:g}, cap {exc.cap:g}; it resets at "
            f"{exc.resets.isoformat()}",
            details={
                "quota": exc.quota,
                "used": exc.used,
                "requested": exc.requested,
                "cap": exc.cap,
                "resets_at": exc.resets.isoformat(),
            },
            retry_after=max(1.0, (exc.resets - now).total_seconds()),
        ) from None
    except SQLAlchemyError as exc:
        from ..jobs.records import database_down

        raise database_down() from exc
