"""Who is calling: the owner of records (API key or the local identity) and the rate-limit key."""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, current_app, g, request
from limits import parse
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import Forbidden, Unauthorized

from ..errors import AuthFailuresLimited

__all__ = [
    "ENDPOINT_SCOPES",
    "LOCAL_OWNER",
    "client_owner",
    "operators_only",
    "rate_limit_key",
    "register_identity",
]

LOCAL_OWNER = "local"

log = logging.getLogger(__name__)
WS_KEY_PREFIX = "openai-insecure-api-key."


def _presented_key() -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip() or None
    # A browser's WebSocket cannot send headers: OpenAI's realtime convention is the key as a
    # subprotocol, `openai-insecure-api-key.KEY` (api/realtime.py).
    for protocol in request.headers.get("Sec-WebSocket-Protocol", "").split(","):
        if protocol.strip().startswith(WS_KEY_PREFIX):
            return protocol.strip()[len(WS_KEY_PREFIX) :] or None
    return request.headers.get("X-API-Key") or None


def _owner_for(key: str) -> str:
    # Records store a digest, never the key itself.
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _matches(given: bytes, keys: list[str]) -> bool:
    # Compare bytes: compare_digest refuses non-ASCII str, and headers may hold anything.
    return any(hmac.compare_digest(given, key.encode()) for key in keys)


def _is_public(endpoint: str | None) -> bool:
    # Declared with @endpoint(public=True) (health, the spec, the web page that asks for a
    # key), or the docs UI's files.
    if endpoint in ("static", "docs.show"):
        return True
    view = current_app.view_functions.get(endpoint or "")
    return bool(getattr(getattr(view, "__openapi__", None), "public", False))


#: The scopes a database key needs per endpoint (all of them); endpoints not named here need
#: only a valid key, and operator endpoints the ``admin`` scope (``operators_only``).
ENDPOINT_SCOPES: dict[str, tuple[str, ...]] = {
    "speech.transcribe_audio": ("transcribe",),
    "pipeline.speech_to_image": ("transcribe", "generate"),
    "images.generate_image": ("generate",),
    "openai_audio.create_transcription": ("transcribe",),
    "openai_audio.create_translation": ("transcribe",),
    "openai_images.create_image": ("generate",),
    "openai_images.create_image_edit": ("edit",),
    "openai_images.create_image_variation": ("edit",),
    "edit.edit_image": ("edit",),
    "conversations.create_conversation": ("generate",),
    "conversations.take_turn": ("generate", "edit"),
    "conversations.undo_turn": ("edit",),
    "drafts.create_draft": ("generate",),
    "realtime.realtime": ("transcribe",),
}


def _database_key(presented: str) -> bool:
    """Identify a key made at run time (looked up on every request: revocation is at once)."""
    from ..storage.accounts import KEY_PREFIX

    accounts = current_app.extensions.get("accounts")
    if accounts is None or not presented.startswith(KEY_PREFIX):
        return False
    try:
        record = accounts.keys.by_secret(presented)
    except SQLAlchemyError as exc:
        from ..jobs.records import database_down

        raise database_down() from exc
    if record is None or not record.usable():
        return False
    g.owner = record.owner
    g.is_admin = "admin" in record.scopes
    g.api_key = record
    g.key_name = record.name
    missing = [s for s in ENDPOINT_SCOPES.get(request.endpoint or "", ()) if s not in record.scopes]
    if missing:
        raise Forbidden(f"this key lacks the scope {', '.join(missing)} this endpoint needs")
    return True


def _identify() -> None:
    settings = current_app.config["S2I_SETTINGS"]
    keys: list[str] = settings.api_keys + settings.admin_api_keys
    g.owner = LOCAL_OWNER
    auth = bool(keys) or settings.auth_required
    g.is_admin = not auth  # auth off: the one local identity may do everything
    if not auth or _is_public(request.endpoint):
        return
    if request.method == "OPTIONS":  # a CORS preflight never carries credentials
        return
    presented = _presented_key()
    given = (presented or "").encode("utf-8", "surrogateescape")
    if presented is not None and _database_key(presented):
        return
    if presented is not None and _matches(given, keys):
        # A valid key is never refused for others' failures: behind one proxy or NAT, every
        # client shares the address, and anyone could lock everyone out. Keys are long random
        # secrets; the failure limit only slows a client that keeps sending wrong ones.
        g.owner = _owner_for(presented)
        g.is_admin = _matches(given, settings.admin_api_keys)
        return
    _refuse_if_guessing(settings.ratelimit_auth_failures)
    _count_auth_failure(settings.ratelimit_auth_failures)
    raise Unauthorized("a valid API key is required (Authorization: Bearer KEY or X-API-Key)")


def _auth_failure_counter(limit_text: str) -> tuple[Any, Any, tuple[str, ...]] | None:
    limiter = current_app.extensions.get("s2i_limiter")
    if limiter is None or not limiter.enabled:
        return None
    # The limiter's current strategy: Redis, or memory while Redis is down.
    prefix = current_app.config["S2I_SETTINGS"].queue_prefix  # the limiter's key prefix
    ids = (prefix, "auth-failures", request.remote_addr or "unknown")
    return limiter.limiter, parse(limit_text), ids


def _refuse_if_guessing(limit_text: str) -> None:
    """429 for a wrong or missing key from an address past its failed-authentication limit."""
    counter = _auth_failure_counter(limit_text)
    if counter is None:
        return
    strategy, limit, ids = counter
    try:
        if strategy.test(limit, *ids):
            return
        reset = strategy.get_window_stats(limit, *ids).reset_time
    except Exception:  # the limit storage is down: the request limits handle that (fallback)
        log.warning("cannot read the failed-authentication count", exc_info=True)
        return
    raise AuthFailuresLimited(
        f"too many failed authentications from this address (limit {limit}); retry later",
        retry_after=max(1.0, reset - time.time()),
    )


def _count_auth_failure(limit_text: str) -> None:
    counter = _auth_failure_counter(limit_text)
    if counter is None:
        return
    strategy, limit, ids = counter
    try:
        strategy.hit(limit, *ids)
    except Exception:
        log.warning("cannot count a failed authentication", exc_info=True)


def operators_only(view: Callable[..., Any]) -> Callable[..., Any]:
    """Refuse the view (403) to callers without an admin key when auth is on."""

    @functools.wraps(view)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        if not getattr(g, "is_admin", False):
            raise Forbidden(
                "an operator endpoint: it needs a key from S2I_ADMIN_API_KEYS or with the "
                "admin scope"
            )
        return view(*args, **kwargs)

    return guarded


def client_owner() -> str:
    """The owner of the current request's records."""
    return getattr(g, "owner", LOCAL_OWNER)


def rate_limit_key() -> str:
    """Limits count per API key when auth is on, else per client address."""
    owner = client_owner()
    if owner != LOCAL_OWNER:
        return owner
    return "addr:" + (request.remote_addr or "unknown")


def register_identity(app: Flask) -> None:
    """Authenticate every request before its view (register before the rate limiter).

    With ``S2I_TRUSTED_PROXIES`` set, the client's address (for limits, failed-authentication
    counts and logs) and scheme come from the ``X-Forwarded-For`` and ``X-Forwarded-Proto``
    entries those proxies appended; the entries a client wrote itself are never trusted.
    """
    proxies = app.config["S2I_SETTINGS"].trusted_proxies
    if proxies:
        from werkzeug.middleware.proxy_fix import ProxyFix

        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=proxies, x_proto=proxies)  # type: ignore[method-assign]
    app.before_request(_identify)
