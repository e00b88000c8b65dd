"""POST /edit-image (img2img, inpainting) and GET /lineage/<id> (what an image was edited from)."""

from __future__ import annotations

from typing import Annotated, Any

from flask import Blueprint, current_app, jsonify
from flask.typing import ResponseReturnValue
from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
from pydantic_core import PydanticCustomError

from ..editing import DEFAULT_STRENGTH, decode_image, history_image, prepare_edit
from ..errors import ResourceNotFound
from ..image_service import get_image_service
from ..speech_service import get_speech_service
from ..storage import get_storage
from .identity import client_owner
from .images import image_json
from .jobs import respond, submit
from .openapi import Upload, endpoint
from .responses import Generation, ImageRow, JobAccepted, _Open
from .speech import _without_none

__all__ = ["bp", "image_fields", "read_upload", "submit_edit"]

bp = Blueprint("edit", __name__)

IMAGE_ID = Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
MAX_LINEAGE = 100  # ancestors shown at most (a chain of edits is rarely that long)


class EditResult(Generation):
    """An edit's images, the image it started from and its settings."""

    parent_id: str | None = None
    edit: dict[str, Any] = Field(default_factory=dict)


class Lineage(_Open):
    """An image with the images it was edited from (nearest first) and its direct edits."""

    image: ImageRow
    ancestors: list[ImageRow]
    children: list[ImageRow]


def image_fields(app: Any, *, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """/generate-image's fields as optional form fields (LoRAs and `async` left out)."""
    request_model = get_image_service(app).request_model
    fields: dict[str, Any] = {}
    for name, info in request_model.model_fields.items():
        if name in ("async_", "loras", *exclude):
            continue
        annotation = _without_none(info.annotation)  # a form field is left out, never null
        if info.metadata:
            annotation = Annotated[(annotation, *info.metadata)]  # type: ignore[misc]
        required = name == "prompt"
        fields[name] = (
            annotation,
            Field(... if required else None, description=info.description),
        )
    return fields


def _one_source(form: Any) -> Any:
    if form.image is None and form.image_id is None:
        raise PydanticCustomError(
            "source", "send `image` (a file) or `image_id` (an image of your history)"
        )
    return form


def _edit_form(app: Any) -> type[BaseModel]:
    return create_model(
        "EditImageForm",
        __config__=ConfigDict(
            extra="forbid",
            json_schema_extra={"anyOf": [{"required": ["image"]}, {"required": ["image_id"]}]},
        ),
        __validators__={"one_source": model_validator(mode="after")(_one_source)},
        image=(Upload, Field(None, description="The image to edit (PNG, JPEG or WebP).")),
        image_id=(
            IMAGE_ID,
            Field(
                None,
                description="Or: an image of your history. With `image` too, the upload is "
                "edited and recorded as made from this image (e.g. retouched on the client).",
            ),
        ),
        mask=(
            Upload,
            Field(
                None,
                description="Inpainting: white where the picture may change, black where it "
                "stays (those pixels come back unchanged). Same size as the image.",
            ),
        ),
        strength=(
            Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)],
            Field(DEFAULT_STRENGTH, description="How far from the source: 0 < s <= 1."),
        ),
        mask_blur=(
            Annotated[int, Field(ge=0, le=64)],
            Field(0, description="Pixels of soft edge on the mask."),
        ),
        async_=(bool, Field(False, alias="async", description="Answer 202 with a job at once.")),
        **image_fields(app),
    )


def read_upload(upload: Any, field: str) -> Any:
    """An uploaded image part decoded with the service's limits."""
    settings = current_app.config["S2I_SETTINGS"]
    return decode_image(upload.read(), max_pixels=settings.max_image_pixels, field=field)


def submit_edit(
    fields: dict[str, Any],
    source: Any,
    mask: Any | None,
    *,
    strength: float,
    mask_blur: int = 0,
    parent_id: str | None = None,
) -> Any:
    """Validate an edit, store its input and submit its job (the caller's)."""
    import io

    work, data = prepare_edit(
        get_image_service(current_app),
        fields,
        source,
        mask,
        strength=strength,
        mask_blur=mask_blur,
        parent_id=parent_id,
    )
    path = get_speech_service(current_app).store_upload(io.BytesIO(data))
    return submit("edit", work, input=path)


@bp.post("/edit-image")
@endpoint(
    form=_edit_form,
    responses={200: EditResult, 202: JobAccepted},
    errors=(404, 409, 415, 422, 503, 507),
    idempotent=True,
    tags=("images",),
)
def edit_image(form: Any) -> ResponseReturnValue:
    """Edit an image (upload or history id) with a prompt; a mask limits where it changes."""
    parent_id = None
    if form.image_id is not None:
        source = history_image(get_storage(current_app), client_owner(), form.image_id)
        parent_id = form.image_id
    if form.image is not None:
        source = read_upload(form.image, "image")
    mask = read_upload(form.mask, "mask") if form.mask is not None else None
    fields = form.model_dump(
        exclude={"image", "image_id", "mask", "strength", "mask_blur", "async_"},
        exclude_none=True,
    )
    job = submit_edit(
        fields,
        source,
        mask,
        strength=form.strength,
        mask_blur=form.mask_blur,
        parent_id=parent_id,
    )
    return respond(job)


@bp.get("/lineage/<image_id>")
@endpoint(
    responses={200: Lineage},
    errors=(404,),
    tags=("images",),
    path={"image_id": "The image's id"},
)
def lineage(image_id: str) -> ResponseReturnValue:
    """An image, the images it was edited from (nearest first) and the edits made of it."""
    storage = get_storage(current_app)
    owner = client_owner()
    record = storage.image_by_id(owner, image_id)
    if record is None:
        raise ResourceNotFound("no such image")
    ancestors = []
    seen = {record.id}
    parent = record.parent_id
    while parent and parent not in seen and len(ancestors) < MAX_LINEAGE:
        found = storage.image_by_id(owner, parent)
        if found is None:  # deleted: the chain is known up to here
            break
        ancestors.append(found)
        seen.add(found.id)
        parent = found.parent_id
    return jsonify(
        image=image_json(record),
        ancestors=[image_json(r) for r in ancestors],
        children=[image_json(r) for r in storage.child_images(owner, record.id)],
    )
