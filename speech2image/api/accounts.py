"""Keys at run time (/admin/keys) and usage per key (/usage)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from flask import Blueprint, current_app, g, jsonify
from flask.typing import ResponseReturnValue
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    create_model,
)
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.exceptions import Forbidden

from ..accounts import get_accounts
from ..accounts.quotas import METRICS, PERIODS, period_window
from ..errors import ResourceNotFound, ServiceError
from ..jobs.records import database_down
from ..schemas import UtcDateTime
from ..storage.accounts import SCOPES, DuplicateKeyName
from ..storage.base import utcnow
from .identity import client_owner, operators_only
from .openapi import endpoint
from .responses import _Open

__all__ = ["bp"]

bp = Blueprint("accounts", __name__)

KEY_ID = {"key_id": "The key's id, name or prefix"}
Scope = Literal["transcribe", "generate", "edit", "admin"]


class KeyNameTaken(ServiceError):
    """Another key has this name."""

    code = 409
    error = "key_name_taken"


def _text_only(value: Any) -> Any:
    if value is not None and not isinstance(value, str):
        raise ValueError("must be an ISO 8601 string")
    return value


def _iso_date(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return dt.date.fromisoformat(value)
        except ValueError:
            raise ValueError(f"must be a date as YYYY-MM-DD, not {value!r}") from None
    return value


#: An http(s) URL with a plain host name or IPv4 address (urlsplit takes every match).
WebhookUrl = Annotated[
    str,
    Field(
        max_length=2048, pattern=r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?([/?#][^\s\x00-\x1f]*)?$"
    ),
]
ModelName = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[\w.:/@-]+$")]
#: An expiry: an ISO 8601 string only (never a number of seconds).
Expiry = Annotated[UtcDateTime, BeforeValidator(_text_only)]
Day = Annotated[
    dt.date,
    BeforeValidator(_iso_date),
    WithJsonSchema({"type": "string", "format": "date", "description": "YYYY-MM-DD"}),
]

#: Caps by name, e.g. {"images:day": 100}: only the known metric and period pairs.
QuotaCaps = create_model(
    "QuotaCaps",
    __config__=ConfigDict(extra="forbid", populate_by_name=False),
    **{
        f"{metric}_{period}": (
            float | None,
            Field(None, ge=0, allow_inf_nan=False, strict=True, alias=f"{metric}:{period}"),
        )
        for metric in METRICS
        for period in PERIODS
    },
)


def _caps(value: Any) -> dict[str, float] | None:
    return None if value is None else value.model_dump(by_alias=True, exclude_none=True)


class KeyCreate(BaseModel):
    """A new key."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=100, pattern=r"^[\w.@-]+$")
    scopes: list[Scope] = Field(default_factory=lambda: ["transcribe", "generate", "edit"])
    models: list[ModelName] | None = Field(
        None, max_length=50, description="Allowed image/speech models; null: all."
    )
    quotas: QuotaCaps | None = Field(  # type: ignore[valid-type]
        None, description='Caps such as {"images:day": 100}; null: S2I_QUOTA_DEFAULT.'
    )
    expires_at: Expiry | None = None
    webhook_url: WebhookUrl | None = None


class KeyChange(BaseModel):
    """Fields to change (rename, scopes, models, quotas, expiry, webhook)."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, min_length=1, max_length=100, pattern=r"^[\w.@-]+$")
    scopes: list[Scope] | None = None
    models: list[ModelName] | None = Field(None, max_length=50)
    quotas: QuotaCaps | None = None  # type: ignore[valid-type]
    expires_at: Expiry | None = None
    webhook_url: WebhookUrl | None = None


class KeyView(_Open):
    """A key as lists show it: never its secret or hash."""

    id: str
    name: str
    prefix: str
    scopes: list[str]
    revoked_at: str | None


class KeyCreated(KeyView):
    """A new key, with its secret (shown this once)."""

    secret: str


class KeyList(_Open):
    """Every key."""

    keys: list[KeyView]


class UsageQuery(BaseModel):
    """Which key and period."""

    model_config = ConfigDict(extra="forbid")
    key: str | None = Field(None, max_length=100, description="A key's id, name or prefix (admin)")
    period: Literal["day", "month"] = "day"
    date: Day | None = Field(None, description="A day within the period; default: today")


class UsageView(_Open):
    """Totals of one key over one period."""

    key: str | None
    period: str
    start: str
    end: str
    usage: dict[str, float]


def _key(ref: str) -> Any:
    record = get_accounts().keys.get(ref)
    if record is None:
        raise ResourceNotFound("no such key")
    return record


def _scopes_known(scopes: list[str]) -> list[str]:
    return [s for s in SCOPES if s in scopes]


@bp.post("/admin/keys")
@endpoint(
    body=KeyCreate,
    responses={201: KeyCreated},
    errors=(403, 409),
    tags=("accounts",),
    operators=True,
)
@operators_only
def create_key(body: Any) -> ResponseReturnValue:
    """Make a key; its secret is in this answer only (only a hash is kept)."""
    try:
        record, secret = get_accounts().keys.create(
            body.name,
            _scopes_known(body.scopes),
            models=body.models,
            quotas=_caps(body.quotas),
            expires_at=body.expires_at,
            webhook_url=body.webhook_url,
        )
    except DuplicateKeyName:
        raise KeyNameTaken(f"a key named {body.name!r} exists", details={"field": "name"}) from None
    answer = record.as_dict() | {"secret": secret, "webhook_secret": record.webhook_secret}
    return jsonify(answer), 201


@bp.get("/admin/keys")
@endpoint(responses={200: KeyList}, errors=(403,), tags=("accounts",), operators=True)
@operators_only
def list_keys() -> ResponseReturnValue:
    """Every key (prefix, scopes, last use, revocation), oldest first."""
    return jsonify(keys=[r.as_dict() for r in get_accounts().keys.list()])


@bp.patch("/admin/keys/<key_id>")
@endpoint(
    body=KeyChange,
    responses={200: KeyView},
    errors=(403, 404, 409),
    tags=("accounts",),
    path=KEY_ID,
    operators=True,
)
@operators_only
def change_key(key_id: str, body: Any) -> ResponseReturnValue:
    """Rename a key, or change its scopes, models, quotas, expiry or webhook."""
    record = _key(key_id)
    fields = body.model_dump(exclude_unset=True)
    if "quotas" in fields:
        fields["quotas"] = _caps(body.quotas)
    if "scopes" in fields:
        fields["scopes"] = _scopes_known(fields["scopes"] or [])
    if fields.get("name") is None:
        fields.pop("name", None)
    try:
        changed = get_accounts().keys.change(record.id, **fields)
    except DuplicateKeyName:
        raise KeyNameTaken("another key has this name", details={"field": "name"}) from None
    if changed is None:
        raise ResourceNotFound("no such key")
    return jsonify(changed.as_dict())


@bp.delete("/admin/keys/<key_id>")
@endpoint(
    responses={200: KeyView}, errors=(403, 404), tags=("accounts",), path=KEY_ID, operators=True
)
@operators_only
def revoke_key(key_id: str) -> ResponseReturnValue:
    """Revoke a key: refused from its next request on, in every process."""
    record = get_accounts().keys.revoke(_key(key_id).id)
    if record is None:
        raise ResourceNotFound("no such key")
    return jsonify(record.as_dict())


@bp.get("/usage")
@endpoint(query=UsageQuery, responses={200: UsageView}, errors=(403, 404), tags=("accounts",))
def usage(query: Any) -> ResponseReturnValue:
    """What the caller's key used in a day or month (admins: any key's, with `key`)."""
    owner, name = client_owner(), getattr(g, "key_name", None)
    if query.key is not None:
        if not getattr(g, "is_admin", False):
            raise Forbidden("only an admin may read another key's usage")
        record = _key(query.key)
        owner, name = record.owner, record.name
    day = query.date or utcnow().date()
    moment = dt.datetime(day.year, day.month, day.day, 12, tzinfo=dt.UTC)
    start, end = period_window(query.period, moment)
    try:
        totals = get_accounts().used(owner, start, end)
    except SQLAlchemyError as exc:
        raise database_down() from exc
    settings = current_app.config["S2I_SETTINGS"]
    caps = dict(settings.quota_default)
    if getattr(g, "api_key", None) is not None and query.key is None:
        caps.update(g.api_key.quotas or {})
    return jsonify(
        key=name,
        period=query.period,
        start=start.isoformat(),
        end=end.isoformat(),
        usage=totals,
        quotas={k: v for k, v in caps.items() if k.endswith(":" + query.period)},
    )
