"""Domain errors. Each subclasses a werkzeug HTTP exception so one handler formats them all."""

from __future__ import annotations

import re
from typing import Any

import sqlalchemy.exc
from werkzeug.exceptions import (
    BadRequest,
    Conflict,
    GatewayTimeout,
    Gone,
    HTTPException,
    InternalServerError,
    NotFound,
    ServiceUnavailable,
    TooManyRequests,
    UnprocessableEntity,
    UnsupportedMediaType,
)

__all__ = [
    "DATABASE_ERRORS",
    "AudioError",
    "AudioTooLong",
    "AuthFailuresLimited",
    "DatabaseUnavailable",
    "IdempotencyConflict",
    "InputExpired",
    "InternalError",
    "InvalidAudio",
    "InvalidRequest",
    "JobFailedRepeatedly",
    "JobInterrupted",
    "JobTimeout",
    "ModelUnavailable",
    "QueueFull",
    "RemoteJobError",
    "ResourceNotFound",
    "ServiceBusy",
    "ServiceError",
    "ShuttingDown",
    "StorageFull",
    "StorageReadOnly",
    "StorageUnavailable",
    "TooManyStreams",
    "UnsupportedAudio",
    "error_body",
    "error_from_body",
    "redact_paths",
]

# An absolute or home-relative path: not part of a word, a hub id ("org/model") or a URL.
_SERVER_PATH = re.compile(r"""(?<![\w.~/:-])~?/[^\s'"()\[\],;]*[^\s'"()\[\],;.]""")


def redact_paths(text: str) -> str:
    """``text`` with each file system path cut to ``.../<last part>``: the name, not the layout."""
    return _SERVER_PATH.sub(_last_part, text)


def _last_part(match: re.Match[str]) -> str:
    parts = [part for part in match.group().split("/") if part not in ("", "~")]
    return ".../" + parts[-1] if parts else "..."


class ServiceError(HTTPException):
    """Base of the service's own errors: an HTTP status, a stable error code and a message."""

    error = "error"

    def __init__(
        self,
        description: str | None = None,
        *,
        details: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(description)
        self.details = details or {}
        self.retry_after = retry_after


class InvalidRequest(ServiceError, BadRequest):
    """A request field is missing or malformed."""

    error = "invalid_request"


class ResourceNotFound(ServiceError, NotFound):
    """The resource does not exist, or does not belong to the caller."""

    error = "not_found"


class AudioError(ServiceError):
    """Base of audio decoding errors."""


class UnsupportedAudio(AudioError, UnsupportedMediaType):
    """The upload is not audio in an accepted container."""

    error = "unsupported_audio"


class InvalidAudio(AudioError, UnprocessableEntity):
    """The upload is audio but cannot be used (absurd sample rate, corrupt stream)."""

    error = "invalid_audio"


class AudioTooLong(InvalidAudio):
    """The decoded audio passed the duration cap."""

    error = "audio_too_long"


class ModelUnavailable(ServiceError, ServiceUnavailable):
    """A model cannot be loaded or has no room; others may still serve.

    The engines explain with server paths (the model cache, a local checkpoint); the message
    goes to clients, so the paths are taken out here (the loader keeps them for /status).
    """

    error = "model_unavailable"

    def __init__(self, description: str | None = None, **kwargs: Any) -> None:
        super().__init__(redact_paths(description) if description else description, **kwargs)


class QueueFull(ServiceError, TooManyRequests):
    """The caller has too much work waiting; retry later."""

    error = "queue_full"


class TooManyStreams(ServiceError, TooManyRequests):
    """The caller already holds as many event streams as one client may."""

    error = "too_many_streams"


class ServiceBusy(ServiceError, ServiceUnavailable):
    """The whole queue is full; retry later."""

    error = "service_busy"


class ShuttingDown(ServiceError, ServiceUnavailable):
    """The server is stopping: it finishes its running jobs and takes no new work."""

    error = "shutting_down"


class DatabaseUnavailable(ServiceError, ServiceUnavailable):
    """The history database did not answer in time, or refused the connection."""

    error = "database_unavailable"


class AuthFailuresLimited(ServiceError, TooManyRequests):
    """The address failed authentication too often; it is refused for a while."""

    error = "rate_limited"


class StorageFull(ServiceError):
    """The image folder or the history database has no space left; nothing was stored."""

    code = 507  # Insufficient Storage (werkzeug has no class for it)
    error = "storage_full"


class StorageReadOnly(ServiceError, ServiceUnavailable):
    """The image folder or the history cannot be written (read-only, or no permission)."""

    error = "storage_read_only"


class StorageUnavailable(ServiceError, ServiceUnavailable):
    """The image store (a folder or an object store) cannot be reached or written now."""

    error = "storage_unavailable"


class IdempotencyConflict(ServiceError, Conflict):
    """An Idempotency-Key was used before for a different kind of request."""

    error = "idempotency_key_reused"


# --- how jobs end badly (a job's error is the same JSON body an HTTP error has) -----------
class InternalError(ServiceError, InternalServerError):
    """Something unexpected failed; the log has the traceback, the client a generic message."""

    error = "internal_error"
    description = "internal error"


class JobTimeout(ServiceError, GatewayTimeout):
    """The job ran longer than S2I_JOB_TIME_LIMIT and was stopped."""

    error = "job_timeout"


class InputExpired(ServiceError, Gone):
    """The upload a queued job needs is no longer stored."""

    error = "upload_expired"


class JobFailedRepeatedly(ServiceError, InternalServerError):
    """The job took its worker down too often: it is not tried again."""

    error = "job_failed_repeatedly"


class JobInterrupted(ServiceError, ServiceUnavailable):
    """The server stopped before the job finished, and the job cannot run again."""

    error = "interrupted"


class RemoteJobError(ServiceError):
    """A job error rebuilt from its JSON body (it happened in another process or earlier)."""


# What a database that refuses, times out or runs out of pooled connections raises (503).
DATABASE_ERRORS = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,
)


def error_body(error: BaseException) -> dict[str, Any]:
    """The JSON body of any error: ``{"status", "code", "message", ["details"]}``.

    The service's own errors keep their status, code and message; a database outage is
    ``database_unavailable``; anything else is a generic ``internal_error`` (never its text).
    """
    if isinstance(error, DATABASE_ERRORS):
        error = DatabaseUnavailable("the history database is not answering; retry shortly")
    if not isinstance(error, ServiceError):
        error = InternalError()
    body: dict[str, Any] = {
        "status": error.code,
        "code": error.error,
        "message": error.description,
    }
    if error.details:
        body["details"] = error.details
    return body


def error_from_body(body: dict[str, Any]) -> ServiceError:
    """The error an :func:`error_body` describes (for a job that failed elsewhere)."""
    error = RemoteJobError(str(body.get("message", "the job failed")), details=body.get("details"))
    error.code = int(body.get("status", 500))
    error.error = str(body.get("code", "internal_error"))
    return error
