"""Accounts: keys in the database, usage per key, quotas at admission.

:class:`Accounts` lives on the app (``app.extensions['accounts']``). The job views call
:func:`admit` for every job before it is handed to a runner: the key's model allow-list and
its quotas are checked there, before any model work.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from typing import Any

from flask import Flask, current_app, g
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import Forbidden, TooManyRequests

from ..errors import InvalidRequest, ServiceBusy, ServiceError
from ..storage.accounts import KeyStore, usage_totals
from ..storage.base import utcnow
from .quotas import MemoryCounter, QuotaExceeded, Quotas, RedisCounter
from .webhooks import DeliveryStore, Dispatcher, url_problem

__all__ = [
    "CALLBACK_HEADER",
    "Accounts",
    "QuotaExceededError",
    "admit",
    "deliveries_of",
    "get_accounts",
    "register_callback",
]

CALLBACK_HEADER = "Callback-URL"

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
        self.deliveries = DeliveryStore(storage.engine)
        self._dispatcher: Dispatcher | None = None
        self._lock = threading.Lock()

    # --- webhooks ------------------------------------------------------------------------
    def start_dispatcher(self) -> Dispatcher:
        """Send due webhook deliveries from a thread of this process (started once)."""
        with self._lock:
            if self._dispatcher is None:
                s = self.settings
                self._dispatcher = Dispatcher(
                    self.deliveries,
                    _job_document,
                    self.webhook_secret,
                    allow_private=s.webhook_allow_private,
                    timeout=s.webhook_timeout_seconds,
                    max_attempts=s.webhook_max_attempts,
                    retry_seconds=s.webhook_retry_seconds,
                    poll_seconds=s.webhook_poll_seconds,
                )
                self._dispatcher.start()
            return self._dispatcher

    def resume_deliveries(self) -> None:
        """At start-up: deliveries left pending by an earlier process are sent from here."""
        from sqlalchemy import exists, select

        from ..storage.accounts import DeliveryRecord

        try:
            with self.engine.connect() as connection:
                pending = connection.scalar(
                    select(exists().where(DeliveryRecord.state == "pending"))
                )
        except SQLAlchemyError:
            log.warning("cannot look for pending webhook deliveries", exc_info=True)
            return
        if pending:
            self.start_dispatcher()

    def webhook_secret(self, owner: str) -> str:
        """The secret that signs ``owner``'s webhooks ('' when there is none)."""
        key = self.keys.by_owner(owner)
        if key is not None and key.webhook_secret:
            return key.webhook_secret
        secret = self.settings.webhook_secret
        return secret.get_secret_value() if secret is not None else ""

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
    from ..kinds import get_job_kinds
    from ..moderation import check_prompt

    for prompt in get_job_kinds(current_app).prompts(job):
        check_prompt(prompt)  # before any quota is reserved
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
    except RedisError as exc:
        raise ServiceBusy(
            "quotas cannot be counted now (Redis is not answering); retry in a moment",
            retry_after=5,
        ) from exc


def _job_document(record: Any) -> dict[str, Any]:
    """What a webhook carries: the job as GET /jobs/<id> shows it."""
    from ..jobs.records import job_from_row

    return job_from_row(record).snapshot()


def register_callback(job: Any) -> str | None:
    """Write the pending webhook delivery of ``job`` (its ``Callback-URL`` header, or its key's
    default URL) before the job is accepted; returns the delivery's id. 400 for a URL the
    service will not call, or when there is no secret to sign with."""
    from flask import request

    accounts: Accounts | None = current_app.extensions.get("accounts")
    key = getattr(g, "api_key", None)
    url = request.headers.get(CALLBACK_HEADER) or (key.webhook_url if key is not None else None)
    if accounts is None or not url:
        return None
    problem = url_problem(url, accounts.settings.webhook_allow_private)
    if problem is not None:
        raise InvalidRequest(f"`{CALLBACK_HEADER}` {problem}", details={"field": CALLBACK_HEADER})
    if not accounts.webhook_secret(job.owner):
        raise InvalidRequest(
            "webhooks need a secret to sign with: use a key made at run time, or set "
            "S2I_WEBHOOK_SECRET",
            details={"field": CALLBACK_HEADER},
        )
    try:
        delivery = accounts.deliveries.add(job.id, job.owner, url)
    except SQLAlchemyError as exc:
        from ..jobs.records import database_down

        raise database_down() from exc
    accounts.start_dispatcher()
    return delivery.id


def drop_callback(delivery_id: str | None) -> None:
    """Remove the delivery of a job that was not accepted."""
    if delivery_id is not None:
        get_accounts().deliveries.drop(delivery_id)


def deliveries_of(job_id: str) -> list[dict[str, Any]]:
    """The webhook delivery attempts of a job, as its document shows them."""
    accounts: Accounts | None = current_app.extensions.get("accounts")
    if accounts is None:
        return []
    try:
        return [d.as_dict() for d in accounts.deliveries.for_job(job_id)]
    except SQLAlchemyError:
        return []
