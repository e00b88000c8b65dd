"""POST /generate-image, GET /images, GET /images/<filename>: generation and the history."""

from __future__ import annotations

import datetime as dt
from typing import Any

from flask import Blueprint, current_app, jsonify, request, send_file, url_for
from flask.typing import ResponseReturnValue

from ..errors import InvalidRequest, ResourceNotFound
from ..image_service import get_image_service, model_key
from ..jobs import Job, get_job_runner
from ..storage import ImageRecord, get_storage
from .identity import client_owner
from .jobs import respond

__all__ = ["bp"]

bp = Blueprint("images", __name__)

MAX_PAGE_SIZE = 100
ONE_YEAR = 365 * 24 * 3600


def image_json(record: ImageRecord) -> dict[str, Any]:
    """A history row as the API shows it, with the URL of its file."""
    return record.as_dict() | {
        "url": url_for("images.get_image", filename=record.filename, _external=False)
    }


@bp.post("/generate-image")
def generate_image() -> ResponseReturnValue:
    """Generate images from a prompt: wait for them, or get a job with `"async": true`."""
    payload = request.get_json(silent=True)
    if not isinstance(payload, dict):
        raise InvalidRequest(
            "send a JSON object with at least `prompt` (Content-Type: application/json)"
        )
    fields = {k: v for k, v in payload.items() if k != "async"}
    service = get_image_service(current_app)
    item = service.prepare(service.validate(fields))
    job = Job(
        kind="generate",
        owner=client_owner(),
        work=item,
        model=model_key(item.choice.model),
        batch_key=item.batch_key(),
        images=item.request.num_images,
        steps=item.request.steps,
    )
    return respond(get_job_runner(current_app).submit(job))


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"`{name}` must be a whole number, not {raw!r}") from None
    if not low <= value <= high:
        raise InvalidRequest(f"`{name}` must be from {low} to {high}, got {value}")
    return value


def _date_arg(name: str) -> dt.datetime | None:
    raw = request.args.get(name)
    if not raw:
        return None
    try:
        moment = dt.datetime.fromisoformat(raw)
    except ValueError:
        raise InvalidRequest(f"`{name}` must be an ISO 8601 date or time, not {raw!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


@bp.get("/images")
def list_images() -> ResponseReturnValue:
    """The caller's images, newest first; `page`, `per_page`, `model`, `since`, `until`."""
    page = _int_arg("page", 1, 1, 1_000_000)
    per_page = _int_arg("per_page", 20, 1, MAX_PAGE_SIZE)
    records, total = get_storage(current_app).list_images(
        client_owner(),
        limit=per_page,
        offset=(page - 1) * per_page,
        model=request.args.get("model") or None,
        since=_date_arg("since"),
        until=_date_arg("until"),
    )
    return jsonify(
        images=[image_json(r) for r in records],
        page=page,
        per_page=per_page,
        total=total,
        pages=(total + per_page - 1) // per_page,
    )


@bp.get("/images/<path:filename>")
def get_image(filename: str) -> ResponseReturnValue:
    """Serve one PNG, only if the history records it for the caller."""
    storage = get_storage(current_app)
    record = storage.get_image(client_owner(), filename)
    path = storage.image_path(record) if record is not None else None
    if record is None or path is None:
        raise ResourceNotFound("no such image")
    response = send_file(
        path, mimetype="image/png", etag=record.sha256, conditional=True, max_age=ONE_YEAR
    )
    # Files never change under their id. Behind auth, only private caches may keep them.
    settings = current_app.config["S2I_SETTINGS"]
    scope = "private" if settings.api_keys or settings.admin_api_keys else "public"
    response.headers["Cache-Control"] = f"{scope}, max-age={ONE_YEAR}, immutable"
    return response
