"""POST /drafts: a quick, small image of the transcript so far (while a person speaks).

Each draft is a ``draft`` job (kinds/draft.py): few steps (``S2I_DRAFT_STEPS``), small
(``S2I_DRAFT_SIZE``, within the configured limits), a fixed seed so successive drafts differ
only by the words, the lowest priority. A new draft supersedes the caller's earlier ones: those
still queued or running are cancelled. At most ``S2I_DRAFTS_MAX_ACTIVE`` drafts are queued or
running at once across all clients; past it, 429 `drafts_busy` (the page skips that draft).
"""

from __future__ import annotations

from typing import Any, Literal

from flask import Blueprint, current_app, jsonify, url_for
from flask.typing import ResponseReturnValue
from pydantic import BaseModel, ConfigDict, Field, create_model
from werkzeug.exceptions import TooManyRequests

from ..errors import ServiceError
from ..image_service import get_image_service
from ..jobs import JobState, get_job_runner
from ..schemas import safe_text, whole
from ..storage import get_storage
from .identity import client_owner
from .jobs import submit
from .openapi import endpoint
from .responses import JobAccepted

__all__ = ["bp"]

bp = Blueprint("drafts", __name__)


class DraftsBusy(ServiceError, TooManyRequests):
    """As many drafts as allowed are queued or running (all clients): skip this one."""

    error = "drafts_busy"


def _draft_body(app: Any) -> type[BaseModel]:
    """The request: the words so far, and optionally a configured model and the seed."""
    models = ("auto", *sorted(get_image_service(app).models))
    return create_model(
        "DraftRequest",
        __config__=ConfigDict(extra="forbid", strict=True),
        prompt=(safe_text(1000, required=True), Field(description="The words so far.")),
        model=(
            Literal[models] | None,  # type: ignore[valid-type]
            Field(None, description="A configured model, or auto (the default)."),
        ),
        seed=(
            whole(ge=0, le=2**32 - 1) | None,
            Field(
                None,
                description="Fixed seed (default S2I_DRAFT_SEED): drafts differ only "
                "by their words.",
            ),
        ),
    )


@bp.post("/drafts")
@endpoint(
    body=_draft_body,
    responses={202: JobAccepted},
    errors=(409, 422, 429, 503),
    tags=("images",),
)
def create_draft(body: Any) -> ResponseReturnValue:
    """Draw a quick draft of the words so far; earlier drafts of the caller are cancelled."""
    settings = current_app.config["S2I_SETTINGS"]
    service = get_image_service(current_app)
    size = min(settings.draft_size, settings.max_width, settings.max_height)
    fields: dict[str, Any] = {
        "prompt": body.prompt,
        "model": body.model or "auto",
        "steps": min(settings.draft_steps, settings.max_steps),
        "width": size,
        "height": size,
        "seed": settings.draft_seed if body.seed is None else body.seed,
        "num_images": 1,
    }
    item = service.prepare(service.validate(fields))
    runner = get_job_runner(current_app)
    owner = client_owner()
    earlier, _ = runner.list_jobs(owner, states=(JobState.QUEUED, JobState.RUNNING), limit=100)
    for job in earlier:
        if job.kind == "draft":
            runner.cancel(owner, job.id)
    # Counted from the job rows: the same in both modes, across every API process.
    active = get_storage(current_app).jobs.count_active(kind="draft")
    if sum(active.values()) >= settings.drafts_max_active:
        raise DraftsBusy(
            f"{settings.drafts_max_active} drafts are being drawn already; skip this one",
            retry_after=1,
        )
    job = submit("draft", item)
    body_out = job.snapshot() | {
        "url": url_for("jobs.get_job", job_id=job.id),
        "events": url_for("jobs.job_events", job_id=job.id),
    }
    response = jsonify(body_out)
    response.status_code = 202
    response.headers["Location"] = body_out["url"]
    return response
