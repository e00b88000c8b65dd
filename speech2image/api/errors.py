"""One JSON error shape for every error, produced here and nowhere else."""

from __future__ import annotations

import logging
import math
from typing import Any

from flask import Flask, g, jsonify, request
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException, InternalServerError

from ..errors import DATABASE_ERRORS, DatabaseUnavailable, ServiceError, error_body
from ..storage.space import storage_error
from . import openai

__all__ = ["error_response", "register_error_handlers"]

log = logging.getLogger("speech2image.api")

DATABASE_RETRY_AFTER = 5.0

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "unprocessable_entity",
    429: "rate_limited",
    500: "internal_error",
    503: "service_unavailable",
}


def error_response(
    status: int,
    message: str,
    code: str | None = None,
    details: dict[str, Any] | None = None,
    retry_after: float | None = None,
) -> ResponseReturnValue:
    """``{"error": {"status", "code", "message", "request_id", ...details}}`` with ``status``."""
    body: dict[str, Any] = {
        "status": status,
        "code": code or _CODES.get(status, "error"),
        "message": message,
        "request_id": getattr(g, "request_id", None),
    }
    if details:
        body["details"] = details
    response = jsonify(error=body)
    response.status_code = status
    if retry_after is not None:
        response.headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    return response


def _openai_surface() -> bool:
    """Under /v1 (matched or not), OpenAI's clients expect OpenAI's error shape."""
    return request.path == openai.PREFIX or request.path.startswith(openai.PREFIX + "/")


def _handle_http(exc: HTTPException) -> ResponseReturnValue:
    response = _http_error(exc)
    if isinstance(exc, ServiceError) and exc.retry_after is not None:
        # Our own back-off: the rate limiter must not replace it with its window later.
        g.retry_after = response.headers.get("Retry-After")  # type: ignore[union-attr]
    if exc.code == 401:  # RFC 9110: a 401 names the scheme that would be accepted
        response.headers["WWW-Authenticate"] = 'Bearer realm="speech2image"'  # type: ignore[union-attr]
    return response


def _http_error(exc: HTTPException) -> ResponseReturnValue:
    if _openai_surface():
        return openai.http_error(exc)
    status = exc.code or 500
    if isinstance(exc, ServiceError):  # the body a failed job carries too
        body = error_body(exc)
        return error_response(
            status, body["message"] or "", body["code"], body.get("details"), exc.retry_after
        )
    message = exc.description or exc.name
    if status == 429:
        message = f"rate limit exceeded: {exc.description}"
    response = error_response(status, message)
    if status == 405 and exc.valid_methods:  # type: ignore[attr-defined]
        response.headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined,union-attr]
    return response


def _handle_database_down(exc: Exception) -> ResponseReturnValue:
    # A full disk (SQLite's "database or disk is full") is 507, a read-only one 503: the
    # database answers, but cannot store. Neither is what a retry in a moment fixes.
    refusal = storage_error(exc, "the request's data")
    if refusal is not None:
        log.error("the history database cannot store: %s", str(exc).splitlines()[0])
        return _handle_http(refusal)
    # A refused connection, a connect or statement timeout, an exhausted pool: the database,
    # not this request, is the problem; the client may retry.
    log.warning("database unavailable: %s", str(exc).splitlines()[0] if str(exc) else exc)
    return _handle_http(
        DatabaseUnavailable(
            "the history database is not answering; retry shortly",
            retry_after=DATABASE_RETRY_AFTER,
        )
    )


def _handle_unexpected(exc: Exception) -> ResponseReturnValue:
    original = exc.original_exception if isinstance(exc, InternalServerError) else exc
    log.error("unhandled error", exc_info=original)
    message = "internal server error; see the log for this request id"
    if _openai_surface():
        return openai.openai_error(500, message)
    return error_response(500, message)


def register_error_handlers(app: Flask) -> None:
    """Route every HTTP error and every unexpected exception to the JSON shape."""
    app.register_error_handler(HTTPException, _handle_http)
    for error in DATABASE_ERRORS:
        app.register_error_handler(error, _handle_database_down)
    for body_error in _malformed_body_errors():
        app.register_error_handler(body_error, _handle_malformed_body)
    app.register_error_handler(Exception, _handle_unexpected)


def _malformed_body_errors() -> tuple[type[Exception], ...]:
    # What gunicorn raises while the view reads a body that is malformed (a bad chunk size)
    # or cut short (the client went away): the client's fault, never a 500.
    try:
        from gunicorn.http.errors import NoMoreData, ParseException
    except ImportError:  # pragma: no cover - gunicorn is a runtime dependency
        return ()
    return (ParseException, NoMoreData)


def _handle_malformed_body(exc: Exception) -> ResponseReturnValue:
    message = f"the request body is malformed or was cut short: {exc}"
    if _openai_surface():
        return openai.openai_error(400, message, code="malformed_body")
    return error_response(400, message, "malformed_body")
