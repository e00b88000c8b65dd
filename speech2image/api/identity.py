"""Who is calling: the owner of records (API key or the local identity) and the rate-limit key."""

from __future__ import annotations

import hashlib
import hmac

from flask import Flask, current_app, g, request
from werkzeug.exceptions import Unauthorized

__all__ = ["LOCAL_OWNER", "client_owner", "rate_limit_key", "register_identity"]

LOCAL_OWNER = "local"


def _presented_key() -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip() or None
    return request.headers.get("X-API-Key") or None


def _owner_for(key: str) -> str:
    # Records store a digest, never the key itself.
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _identify() -> None:
    keys: list[str] = current_app.config["S2I_SETTINGS"].api_keys
    g.owner = LOCAL_OWNER
    if not keys or request.endpoint in ("system.health", "static"):
        return
    presented = _presented_key()
    # Compare bytes: compare_digest refuses non-ASCII str, and headers may hold anything.
    given = (presented or "").encode("utf-8", "surrogateescape")
    if presented is None or not any(hmac.compare_digest(given, k.encode()) for k in keys):
        raise Unauthorized("a valid API key is required (Authorization: Bearer KEY or X-API-Key)")
    g.owner = _owner_for(presented)


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
    """Authenticate every request before its view (register before the rate limiter)."""
    app.before_request(_identify)
