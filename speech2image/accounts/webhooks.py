"""Webhooks: when a job ends, its document is POSTed to the callback URL, signed, with retries.

A request names a callback URL (``Callback-URL`` header), or its key has a default one. The
delivery is a row (``webhook_deliveries``) written before the job is accepted, so it survives
restarts; a dispatcher thread in each API process (never a job worker) sends the deliveries
whose job has ended, and retries failures with exponential back-off until
``S2I_WEBHOOK_MAX_ATTEMPTS``. Several processes may run dispatchers: a delivery is claimed
with a conditional update before it is sent, so one process sends each attempt.

Signature: ``X-S2I-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>.<body>">`` with the
key's webhook secret (or ``S2I_WEBHOOK_SECRET``). Only http(s) URLs; hosts that resolve to a
private, loopback, link-local or otherwise reserved address are refused unless
``S2I_WEBHOOK_ALLOW_PRIVATE`` is set.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import delete, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import sessionmaker

from ..storage.accounts import DeliveryRecord
from ..storage.base import new_id, utcnow
from ..storage.jobs import FINISHED_STATES, JobRecord

__all__ = ["DeliveryStore", "Dispatcher", "sign", "url_problem"]

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 3600.0
CLAIM_SECONDS = 60.0  # a claimed attempt not finished in this long is tried again


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The hex HMAC-SHA256 of ``"<timestamp>.<body>"``."""
    message = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def url_syntax_problem(url: str) -> str | None:
    """Why ``url`` is not an http(s) URL with a host (None: it is)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return "must be an http or https URL"
    if not host:
        return "must name a host"
    if parts.username or parts.password:
        return "must not carry credentials"
    return None


def url_problem(url: str, allow_private: bool) -> str | None:
    """Why the service will not call ``url`` (None: it will)."""
    problem = url_syntax_problem(url)
    if problem is not None or allow_private:
        return problem
    host = urlsplit(url).hostname or ""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (OSError, UnicodeError):
        return f"names a host that does not resolve ({host})"
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if not ip.is_global or ip.is_multicast:
            return "resolves to a private, loopback or link-local address"
    return None


class DeliveryStore:
    """Delivery rows: add, claim what is due, record attempts, read a job's."""

    def __init__(self, engine: Engine) -> None:
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    def add(self, job_id: str, owner: str, url: str) -> DeliveryRecord:
        """A pending delivery of ``job_id``'s end (sent once the job has ended)."""
        record = DeliveryRecord(
            id=new_id(),
            job_id=job_id,
            owner=owner,
            url=url,
            state="pending",
            attempts=0,
            created_at=utcnow(),
        )
        with self._sessions.begin() as session:
            session.add(record)
        return record

    def drop(self, delivery_id: str) -> None:
        """Remove a delivery whose job was never accepted."""
        with self._sessions.begin() as session:
            session.execute(delete(DeliveryRecord).where(DeliveryRecord.id == delivery_id))

    def for_job(self, job_id: str) -> list[DeliveryRecord]:
        """A job's deliveries."""
        with self._sessions() as session:
            return list(
                session.scalars(
                    select(DeliveryRecord)
                    .where(DeliveryRecord.job_id == job_id)
                    .order_by(DeliveryRecord.created_at)
                )
            )

    def claim_due(self, limit: int = 20) -> list[tuple[DeliveryRecord, JobRecord]]:
        """Pending deliveries of ended jobs that are due, each claimed by this caller."""
        now = utcnow()
        with self._sessions() as session:
            rows = session.execute(
                select(DeliveryRecord, JobRecord)
                .join(JobRecord, JobRecord.id == DeliveryRecord.job_id)
                .where(DeliveryRecord.state == "pending")
                .where(JobRecord.state.in_(list(FINISHED_STATES)))
                .where(
                    (DeliveryRecord.next_attempt_at.is_(None))
                    | (DeliveryRecord.next_attempt_at <= now)
                )
                .order_by(DeliveryRecord.created_at)
                .limit(limit)
            ).all()
        claimed = []
        for delivery, job in rows:
            # Only one process sends an attempt: the one whose update still finds it unclaimed.
            with self._sessions.begin() as session:
                won = session.execute(
                    update(DeliveryRecord)
                    .where(
                        DeliveryRecord.id == delivery.id,
                        DeliveryRecord.state == "pending",
                        DeliveryRecord.attempts == delivery.attempts,
                    )
                    .values(
                        attempts=delivery.attempts + 1,
                        next_attempt_at=now + dt.timedelta(seconds=CLAIM_SECONDS),
                    )
                ).rowcount  # type: ignore[attr-defined]
            if won:
                delivery.attempts += 1
                claimed.append((delivery, job))
        return claimed

    def record(
        self,
        delivery: DeliveryRecord,
        *,
        status: int | None,
        error: str | None,
        retry_in: float | None,
    ) -> None:
        """The outcome of an attempt: delivered, retried after ``retry_in`` s, or failed."""
        now = utcnow()
        if status is not None and 200 <= status < 300:
            values: dict[str, Any] = {"state": "delivered", "delivered_at": now}
        elif retry_in is None:
            values = {"state": "failed"}
        else:
            values = {"next_attempt_at": now + dt.timedelta(seconds=retry_in)}
        values.update(last_status=status, last_error=error)
        with self._sessions.begin() as session:
            session.execute(
                update(DeliveryRecord).where(DeliveryRecord.id == delivery.id).values(**values)
            )


class Dispatcher:
    """A background thread that sends due deliveries (never a job worker's thread)."""

    def __init__(
        self,
        store: DeliveryStore,
        document: Any,
        secret_for: Any,
        *,
        allow_private: bool,
        timeout: float,
        max_attempts: int,
        retry_seconds: float,
        poll_seconds: float,
    ) -> None:
        self.store = store
        self.document = document  # JobRecord -> the job document (dict)
        self.secret_for = secret_for  # owner -> signing secret
        self.allow_private = allow_private
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.retry_seconds = retry_seconds
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Run in a daemon thread."""
        self._thread = threading.Thread(target=self._loop, name="webhooks", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread after its current attempt."""
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.run_once()
            except Exception:  # the database is away: next round
                log.warning("webhook dispatch failed this round", exc_info=True)

    def run_once(self) -> int:
        """Send every due delivery once; how many were attempted."""
        claimed = self.store.claim_due()
        for delivery, job in claimed:
            self._attempt(delivery, job)
        return len(claimed)

    def _attempt(self, delivery: DeliveryRecord, job: JobRecord) -> None:
        status: int | None = None
        error: str | None = None
        problem = url_problem(delivery.url, self.allow_private)  # resolved again: DNS changes
        if problem is not None:
            self.store.record(delivery, status=None, error=f"the URL {problem}", retry_in=None)
            return
        body = json.dumps(self.document(job)).encode()
        timestamp = int(time.time())
        signature = sign(self.secret_for(delivery.owner), timestamp, body)
        request = urllib.request.Request(
            delivery.url,
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "User-Agent": "speech2image-webhooks",
                "X-S2I-Event": f"job.{job.state}",
                "X-S2I-Delivery": delivery.id,
                "X-S2I-Signature": f"t={timestamp},v1={signature}",
            },
        )
        try:
            with _NO_REDIRECTS.open(request, timeout=self.timeout) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            status, error = exc.code, f"answered {exc.code}"
        except (OSError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
        delivered = status is not None and 200 <= status < 300
        retry_in = None
        if not delivered and delivery.attempts < self.max_attempts:
            retry_in = min(self.retry_seconds * 2 ** (delivery.attempts - 1), MAX_BACKOFF_SECONDS)
        self.store.record(delivery, status=status, error=error, retry_in=retry_in)
        log.info(
            "webhook of job %s: attempt %d %s",
            job.id,
            delivery.attempts,
            "delivered" if delivered else (error or status),
        )


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A redirect could point at an address the URL check refused: never follow one.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_NO_REDIRECTS = urllib.request.build_opener(_NoRedirect)
