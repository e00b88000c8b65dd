"""POST /generate-image, GET /images, GET /images/<filename>: generation and the history."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from flask import Blueprint, current_app, jsonify, redirect, request, send_file, url_for
from flask.typing import ResponseReturnValue
from pydantic import BaseModel, ConfigDict, Field, create_model

from ..errors import ResourceNotFound
from ..image_service import get_image_service
from ..schemas import UtcDateTime, safe_text
from ..storage import ImageRecord, TranscriptRecord, get_storage
from ..storage.base import aware
from .identity import client_owner
from .jobs import respond, submit
from .openapi import Content, endpoint
from .responses import Generation, ImagePage, JobAccepted, TranscriptRow

__all__ = ["bp"]

bp = Blueprint("images", __name__)

MAX_PAGE_SIZE = 100
ONE_YEAR = 365 * 24 * 3600


def image_json(record: ImageRecord, transcript: TranscriptRecord | None = None) -> dict[str, Any]:
    """A history row as the API shows it, with the URL of its file and its transcript."""
    return record.as_dict() | {
        "url": url_for("images.get_image", filename=record.filename, _external=False),
        "transcript": (
            {"id": transcript.id, "text": transcript.text, "language": transcript.language}
            if transcript is not None
            else None
        ),
    }


def _generate_model(app: Any) -> type[BaseModel]:
    return get_image_service(app).request_model


def _list_query(app: Any) -> type[BaseModel]:
    return create_model(
        "ImageListQuery",
        __config__=ConfigDict(extra="ignore"),
        page=(Annotated[int, Field(ge=1, le=1_000_000)], Field(1, description="Page number.")),
        per_page=(
            Annotated[int, Field(ge=1, le=MAX_PAGE_SIZE)],
            Field(20, description="Images per page."),
        ),
        model=(safe_text(200) | None, Field(None, description="Only this image model.")),
        since=(UtcDateTime | None, Field(None, description="Made at or after (ISO 8601).")),
        until=(UtcDateTime | None, Field(None, description="Made before (ISO 8601).")),
    )


@bp.post("/generate-image")
@endpoint(
    body=_generate_model,
    responses={200: Generation, 202: JobAccepted},
    errors=(409, 503, 507),
    idempotent=True,
    tags=("images",),
)
def generate_image(body: Any) -> ResponseReturnValue:
    """Generate images from a prompt: wait for them, or get a job with `"async": true`."""
    service = get_image_service(current_app)
    return respond(submit("generate", service.prepare(service.resolve(body))))


@bp.get("/images")
@endpoint(query=_list_query, responses={200: ImagePage}, tags=("images",))
def list_images(query: Any) -> ResponseReturnValue:
    """The caller's images, newest first; `page`, `per_page`, `model`, `since`, `until`."""
    per_page = query.per_page
    records, total = get_storage(current_app).list_images(
        client_owner(),
        limit=per_page,
        offset=(query.page - 1) * per_page,
        model=query.model or None,
        since=query.since,
        until=query.until,
    )
    transcripts = get_storage(current_app).transcripts(
        client_owner(), [r.transcript_id for r in records if r.transcript_id]
    )
    return jsonify(
        images=[image_json(r, transcripts.get(r.transcript_id or "")) for r in records],
        page=query.page,
        per_page=per_page,
        total=total,
        pages=(total + per_page - 1) // per_page,
    )


def _image_query(app: Any) -> type[BaseModel]:
    from .gpt_image import OUTPUT_FORMATS

    return create_model(
        "ImageFileQuery",
        __config__=ConfigDict(extra="ignore"),
        format=(
            Literal[OUTPUT_FORMATS],  # type: ignore[valid-type]
            Field("png", description="png (the stored file), jpeg or webp (converted)."),
        ),
    )


@bp.get("/images/<path:filename>")
@endpoint(
    query=_image_query,
    responses={
        200: Content(
            {
                "image/png": {"type": "string", "format": "binary"},
                "image/jpeg": {"type": "string", "format": "binary"},
                "image/webp": {"type": "string", "format": "binary"},
            },
            "The PNG (with its parameters in a `parameters` text chunk)",
            {"ETag": "SHA-256 of the file", "Cache-Control": "Immutable; private behind auth"},
        ),
        302: Content(
            {},
            "With S2I_S3_PRESIGNED_REDIRECT_SECONDS: a short-lived presigned URL of the object",
            {"Location": "The presigned URL"},
        ),
        304: None,
    },
    errors=(404,),
    tags=("images",),
    path={"filename": "The image's file name, as listed"},
)
def get_image(filename: str, query: Any = None) -> ResponseReturnValue:
    """Serve one PNG (or it as JPEG/WebP: `format`), only if the history records it for the
    caller."""
    storage = get_storage(current_app)
    settings = current_app.config["S2I_SETTINGS"]
    record = storage.get_image(client_owner(), filename)
    if record is None:
        raise ResourceNotFound("no such image")
    if query is not None and query.format != "png":
        return _converted(storage, record, query.format)
    # Files never change under their id. Behind auth, only private caches may keep them.
    scope = "private" if settings.api_keys or settings.admin_api_keys else "public"
    if request.if_none_match.contains(record.sha256):  # answered without touching the store
        response = current_app.response_class(status=304)
        response.set_etag(record.sha256)
        response.headers["Cache-Control"] = f"{scope}, max-age={ONE_YEAR}, immutable"
        return response
    expires = settings.s3_presigned_redirect_seconds
    if expires:
        url = storage.images.presigned_url(record.filename, expires)
        if url is not None:
            response = redirect(url, code=302)
            # The URL expires: caches may keep the redirect for a fraction of its life only.
            response.headers["Cache-Control"] = f"private, max-age={max(expires // 2, 1)}"
            return response
    source = storage.image_source(record)
    if source is None:
        raise ResourceNotFound("no such image")
    response = send_file(
        source, mimetype="image/png", etag=record.sha256, conditional=True, max_age=ONE_YEAR
    )
    response.headers["Cache-Control"] = f"{scope}, max-age={ONE_YEAR}, immutable"
    return response


def _converted(storage: Any, record: ImageRecord, output_format: str) -> ResponseReturnValue:
    """The stored PNG converted to ``output_format`` (made on request, not stored)."""
    from .gpt_image import convert_image, media_type

    data = storage.image_bytes(record)
    if data is None:
        raise ResourceNotFound("no such image")
    response = current_app.response_class(
        convert_image(data, output_format, 90), mimetype=media_type(output_format)
    )
    response.set_etag(f"{record.sha256}-{output_format}")
    response.headers["Cache-Control"] = "private, max-age=3600"
    return response.make_conditional(request)


@bp.delete("/images/<path:filename>")
@endpoint(
    responses={204: None},
    errors=(404,),
    tags=("images",),
    path={"filename": "The image's file name (or id), as listed"},
)
def delete_image(filename: str) -> ResponseReturnValue:
    """Delete one of the caller's images: its history row and its file together."""
    name = filename if filename.endswith(".png") else f"{filename}.png"
    if not get_storage(current_app).delete_image(client_owner(), name):
        raise ResourceNotFound("no such image")
    return "", 204


@bp.get("/transcripts/<transcript_id>")
@endpoint(
    responses={200: TranscriptRow},
    errors=(404,),
    tags=("images",),
    path={"transcript_id": "The transcript's id (`transcript.id` of /speech-to-image)"},
)
def get_transcript(transcript_id: str) -> ResponseReturnValue:
    """A transcript the caller's images were made from, with those images."""
    found = get_storage(current_app).get_transcript(client_owner(), transcript_id)
    if found is None:
        raise ResourceNotFound("no such transcript")
    transcript, records = found
    return jsonify(
        id=transcript.id,
        text=transcript.text,
        language=transcript.language,
        duration=transcript.duration,
        created_at=aware(transcript.created_at).isoformat(),
        images=[image_json(r, transcript) for r in records],
    )
