"""The OpenAI-compatible surface under /v1, on the same services, jobs, limits and history.

``POST /v1/audio/transcriptions``, ``POST /v1/audio/translations``,
``POST /v1/images/generations``, ``GET /v1/models`` and ``GET /v1/models/<id>`` take and
answer what the official ``openai`` clients send and expect; errors here use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``. API keys work as ``Authorization: Bearer``
(see :mod:`speech2image.api.identity`), so an SDK's ``api_key`` is the service's API key.
"""

from __future__ import annotations

import base64
import re
import time
from typing import Annotated, Any, Literal

from flask import Blueprint, Response, current_app, jsonify, request, url_for
from flask.typing import ResponseReturnValue
from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
from pydantic_core import PydanticCustomError
from werkzeug.exceptions import HTTPException

from ..editing import DEFAULT_STRENGTH
from ..errors import InvalidRequest, ResourceNotFound, ServiceError
from ..image_service import get_image_service
from ..kinds import TranscribeWork
from ..schemas import MIN_SIDE, safe_text, whole
from ..speech_service import MAX_PROMPT_CHARS, get_speech_service
from ..storage import get_storage
from .gpt_image import (
    BACKGROUNDS,
    GPT_IMAGE_MODELS,
    MODERATIONS,
    OUTPUT_FORMATS,
    QUALITIES,
    convert_image,
    gpt_image_fields,
    usage,
)
from .identity import client_owner
from .jobs import submit, wait_for
from .openapi import Content, Upload, endpoint
from .speech import _without_none, language_type, submit_with_upload
from .streams import SSE_STREAM, TRANSCRIPT_OR_STREAM, image_stream, transcript_stream
from .transcript_formats import RESPONSE_FORMATS, render_transcript

__all__ = [
    "IMAGE_ALIASES",
    "PREFIX",
    "WHISPER_ALIASES",
    "audio_bp",
    "bp",
    "http_error",
    "images_bp",
    "openai_error",
]

PREFIX = "/v1"
bp = Blueprint("openai", __name__, url_prefix=PREFIX)
# Children of ``bp``, so each carries its own rate limit.
audio_bp = Blueprint("openai_audio", __name__)
images_bp = Blueprint("openai_images", __name__)

WHISPER_ALIASES = ("whisper-1",)  # OpenAI's name for the default Whisper model
# Generate with the automatic model choice: the retired DALL·E names and today's gpt-image-*.
IMAGE_ALIASES = ("dall-e-2", "dall-e-3", *GPT_IMAGE_MODELS)
GRANULARITIES = ("word", "segment")
IMAGE_FORMATS = ("url", "b64_json")
# OpenAI fields with no meaning here: accepted and ignored, so stock clients work unchanged.
IGNORED_IMAGE_FIELDS = ("style",)
VARIATION_PROMPT = "a variation of this picture"
VARIATION_STRENGTH = 0.6
MAX_PARTIAL_IMAGES = 3  # as OpenAI
SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
SEGMENT_FIELDS = (
    "id",
    "seek",
    "start",
    "end",
    "text",
    "tokens",
    "temperature",
    "avg_logprob",
    "compression_ratio",
    "no_speech_prob",
)

# Extras of POST /v1/images/generations: the native fields with no OpenAI name.
IMAGE_EXTRAS = ("negative_prompt", "steps", "seed", "guidance_scale", "scheduler", "loras")
ERROR_STATUSES = (400, 401, 409, 413, 415, 422, 429, 500, 503)

_ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


# --- request and answer models (they validate requests and make the OpenAPI spec) ----------
class OpenAIErrorInfo(BaseModel):
    """What went wrong, as OpenAI's clients read it."""

    message: str
    type: str = Field(description="invalid_request_error, authentication_error, ...")
    param: str | None = Field(description="The request field at fault, if one is.")
    code: str | None = Field(description="This service's stable error code.")


class OpenAIErrorBody(BaseModel):
    """OpenAI's error shape (the /v1 routes only)."""

    error: OpenAIErrorInfo


class TranscriptionSegment(BaseModel):
    """One decoded segment."""

    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float


class TranscriptionWord(BaseModel):
    """One word with its timing."""

    word: str
    start: float
    end: float


class Transcription(BaseModel):
    """`json` has the text only; `verbose_json` adds language, duration, segments (and words)."""

    text: str
    task: str | None = None
    language: str | None = None
    duration: float | None = None
    segments: list[TranscriptionSegment] | None = None
    words: list[TranscriptionWord] | None = None


class ImageData(BaseModel):
    """One image: a URL (needs the same API key) or the PNG in base64."""

    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str


class ImagesResponse(BaseModel):
    """Generated images."""

    created: int
    data: list[ImageData]
    model: str = Field(description="The model that made them (after the automatic choice).")
    output_format: str | None = None
    quality: str | None = None
    background: str | None = None
    size: str | None = None
    usage: dict[str, Any] | None = Field(None, description="Tokens in and out (estimated).")


class ModelObject(BaseModel):
    """A model a /v1 request may name."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    kind: Literal["whisper", "image"]


class ModelList(BaseModel):
    """Every model a /v1 request may name."""

    object: Literal["list"]
    data: list[ModelObject]


def _errors(*statuses: int) -> dict[int, Any]:
    return {status: OpenAIErrorBody for status in statuses}


def _audio_form(app: Any) -> type[BaseModel]:
    settings = app.config["S2I_SETTINGS"]
    names = tuple(dict.fromkeys((*WHISPER_ALIASES, settings.whisper_model)))
    return create_model(
        "OpenAIAudioForm",
        # OpenAI's clients may send fields this service has no use for: ignore them.
        __config__=ConfigDict(extra="ignore", populate_by_name=True),
        file=(Upload, Field(description="The audio file (any common format).")),
        model=(
            Literal[names],  # type: ignore[valid-type]
            Field(WHISPER_ALIASES[0], description="whisper-1 is the configured Whisper model."),
        ),
        # A multipart form cannot send a null, only leave a field out: none is nullable.
        language=(
            language_type(),
            Field(None, description="ISO 639-1 code of the speech; empty: detect it."),
        ),
        prompt=(
            safe_text(MAX_PROMPT_CHARS),
            Field(None, description="Whisper's initial prompt: spellings of names and jargon."),
        ),
        response_format=(
            Literal[RESPONSE_FORMATS],  # type: ignore[valid-type]
            Field("json", description="json, text, srt, verbose_json or vtt."),
        ),
        temperature=(
            Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)],
            Field(None, description="Sampling temperature; none: 0, then 0.4 and 0.8."),
        ),
        timestamp_granularities=(
            Literal[GRANULARITIES],  # type: ignore[valid-type]
            Field(
                None,
                alias="timestamp_granularities[]",
                description="word and/or segment (repeat the field); word adds `words`.",
            ),
        ),
        stream=(
            bool,
            Field(
                False,
                description="Server-sent events: `transcript.text.delta` as segments are "
                "decoded, then `transcript.text.done`.",
            ),
        ),
    )


def _image_body(app: Any) -> type[BaseModel]:
    settings = app.config["S2I_SETTINGS"]
    native = get_image_service(app).request_model
    extras: dict[str, Any] = {}
    for name in ("prompt", *IMAGE_EXTRAS):
        if name not in native.model_fields:  # `loras` only where a LoRA folder is configured
            continue
        info = native.model_fields[name]
        annotation = info.annotation
        if info.metadata:
            annotation = Annotated[(annotation, *info.metadata)]  # type: ignore[misc]
        if name == "prompt":
            extras[name] = (annotation, Field(description=info.description))
        else:
            extras[name] = (annotation | None, Field(None, description=info.description))
    models = ("auto", *IMAGE_ALIASES, *sorted(get_image_service(app).models))
    widths = "|".join(str(w) for w in range(MIN_SIDE, settings.max_width + 1, 8))
    heights = "|".join(str(h) for h in range(MIN_SIDE, settings.max_height + 1, 8))
    return create_model(
        "OpenAIImageRequest",
        __config__=ConfigDict(extra="forbid", strict=True),
        model=(
            Literal[models] | None,  # type: ignore[valid-type]
            Field(
                None,
                description="gpt-image-* (or the retired dall-e-2/3): the automatic choice; "
                "or a configured model.",
            ),
        ),
        n=(
            whole(ge=1, le=settings.max_num_images) | None,
            Field(None, description="Images to make."),
        ),
        size=(
            # The sizes this server makes, spelled out so the schema says exactly that.
            Annotated[str, Field(pattern=f"^(auto|({widths})x({heights}))$")] | None,
            Field(None, description="WIDTHxHEIGHT, each a multiple of 8 within the limits."),
        ),
        response_format=(Literal[IMAGE_FORMATS], Field("url")),  # type: ignore[valid-type]
        user=(safe_text(256) | None, Field(None, description="Accepted; the API key is who.")),
        style=(str | None, Field(None, description="Accepted and ignored.")),
        **gpt_image_body_fields(),
        stream=(
            bool | None,
            Field(
                None,
                description="Server-sent events: `image_generation.partial_image` per preview "
                "frame, then `image_generation.completed` per image (as b64_json).",
            ),
        ),
        partial_images=(
            whole(ge=0, le=MAX_PARTIAL_IMAGES) | None,
            Field(None, description="Preview frames to stream (with `stream`); default 0."),
        ),
        **extras,
    )


def gpt_image_body_fields() -> dict[str, Any]:
    """The gpt-image fields of /v1/images requests (see api/gpt_image.py)."""
    return {
        "quality": (
            Literal[QUALITIES] | None,  # type: ignore[valid-type]
            Field(None, description="low, medium, high, auto: fewer or more denoising steps."),
        ),
        "background": (
            Literal[BACKGROUNDS] | None,  # type: ignore[valid-type]
            Field(None, description="opaque or auto; transparent is refused (400)."),
        ),
        "moderation": (
            Literal[MODERATIONS] | None,  # type: ignore[valid-type]
            Field(None, description="auto or low; accepted."),
        ),
        "output_format": (
            Literal[OUTPUT_FORMATS] | None,  # type: ignore[valid-type]
            Field(None, description="png (default), jpeg or webp."),
        ),
        "output_compression": (
            whole(ge=0, le=100) | None,
            Field(None, description="jpeg/webp quality kept, 0-100 (default 100)."),
        ),
    }


# --- errors -------------------------------------------------------------------------------
def openai_error(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> Response:
    """``{"error": {"message", "type", "param", "code"}}`` with ``status``."""
    kind = "server_error" if status >= 500 else _ERROR_TYPES.get(status, "invalid_request_error")
    response = jsonify(error={"message": message, "type": kind, "param": param, "code": code})
    response.status_code = status
    return response


def http_error(exc: HTTPException) -> Response:
    """An HTTP error of a /v1 request in OpenAI's shape (api/errors.py routes it here)."""
    status = exc.code or 500
    if isinstance(exc, ServiceError):
        response = openai_error(
            status,
            exc.description or exc.name,
            param=(exc.details or {}).get("field"),
            code=getattr(exc, "openai_code", exc.error),
        )
        if exc.retry_after is not None:
            response.headers["Retry-After"] = str(max(1, round(exc.retry_after + 0.5)))
        return response
    message = exc.description or exc.name
    if status == 429:
        message = f"rate limit exceeded: {exc.description}"
    code = "invalid_api_key" if status == 401 else exc.name.lower().replace(" ", "_")
    response = openai_error(status, message, code=code)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="speech2image"'
    if status == 405 and getattr(exc, "valid_methods", None):
        response.headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
    return response


def _field(name: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, details={"field": name})


# --- audio --------------------------------------------------------------------------------
def _whisper_model(requested: str | None) -> str:
    """The Whisper model a request names: an alias of the default, or the configured name."""
    service = get_speech_service(current_app)
    configured = current_app.config["S2I_SETTINGS"].whisper_model
    name = (requested or "").strip() or WHISPER_ALIASES[0]
    if name in WHISPER_ALIASES or name in (configured, service.model_name):
        return service.model_name
    raise _field(
        "model",
        f"`model` must be {' or '.join((*WHISPER_ALIASES, configured))}, not {name!r}",
    )


def _audio(task: str, form: Any) -> ResponseReturnValue:
    _whisper_model(form.model)
    response_format = form.response_format
    # Repeated fields: the form model saw the first; every one must be known.
    granularities = request.form.getlist("timestamp_granularities[]") + request.form.getlist(
        "timestamp_granularities"
    )
    for item in granularities:
        if item not in GRANULARITIES:
            raise _field(
                "timestamp_granularities[]",
                f"`timestamp_granularities[]` items must be word or segment, not {item!r}",
            )
    options = get_speech_service(current_app).validate_options(
        form.language or None, task, "word" in granularities, form.prompt, form.temperature
    )
    job = submit_with_upload(form.file, "transcribe", TranscribeWork(options))
    if form.stream:
        return transcript_stream(job)
    return _render_transcript(wait_for(job), response_format, "word" in granularities)


def _render_transcript(body: dict[str, Any], response_format: str, words: bool) -> Response:
    """A verbose job result in OpenAI's shape for ``response_format``."""

    def openai_json(body: dict[str, Any], verbose: bool) -> dict[str, Any]:
        if not verbose:
            return {"text": body["text"]}
        answer: dict[str, Any] = {
            "task": body["task"],
            "language": body["language"],
            "duration": body["duration"],
            "text": body["text"],
            "segments": [{k: s[k] for k in SEGMENT_FIELDS} for s in body["segments"]],
        }
        if words:
            answer["words"] = [
                {"word": w["word"], "start": w["start"], "end": w["end"]}
                for w in body.get("words") or []
            ]
        return answer

    return render_transcript(body, response_format, openai_json)


_AUDIO_ENDPOINT = {
    "form": _audio_form,
    "responses": {
        200: TRANSCRIPT_OR_STREAM,
        **_errors(*ERROR_STATUSES),
    },
    "tags": ("openai",),
    "idempotent": True,
}


@audio_bp.post("/audio/transcriptions")
@endpoint(**_AUDIO_ENDPOINT)
def create_transcription(form: Any) -> ResponseReturnValue:
    """Transcribe audio in its own language (OpenAI's createTranscription)."""
    return _audio("transcribe", form)


@audio_bp.post("/audio/translations")
@endpoint(**_AUDIO_ENDPOINT)
def create_translation(form: Any) -> ResponseReturnValue:
    """Translate speech into English text (OpenAI's createTranslation)."""
    return _audio("translate", form)


# --- images -------------------------------------------------------------------------------
def _image_fields(payload: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The native generation fields of an OpenAI request, and its response format."""
    fields = {k: v for k, v in payload.items() if k not in IGNORED_IMAGE_FIELDS and v is not None}
    response_format = fields.pop("response_format", "url")
    fields.pop("user", None)  # the API key says who asks
    model = fields.get("model")
    if model is None or model in IMAGE_ALIASES:
        fields["model"] = "auto"
    if "n" in fields:
        fields["num_images"] = fields.pop("n")
    size = fields.pop("size", None)
    if size is not None and size != "auto":
        match = SIZE.match(size) if isinstance(size, str) else None
        if match is None:
            raise _field("size", f"`size` must look like 512x512 (WIDTHxHEIGHT), not {size!r}")
        fields["width"], fields["height"] = int(match[1]), int(match[2])
    return fields, response_format


def _openai_param(field: str | None) -> str | None:
    """The OpenAI name of a native field named in an error."""
    return {"num_images": "n", "width": "size", "height": "size"}.get(field or "", field)


@images_bp.post("/images/generations")
@endpoint(
    body=_image_body,
    responses={
        200: Content(
            {"application/json": ImagesResponse, "text/event-stream": SSE_STREAM},
            "The images; with `stream`, server-sent events (`image_generation.partial_image`, "
            "then `image_generation.completed`)",
        ),
        **_errors(*ERROR_STATUSES),
    },
    tags=("openai",),
    idempotent=True,
)
def create_image(body: Any) -> ResponseReturnValue:
    """Generate images (OpenAI's createImage), plus this service's extra fields."""
    payload = body.model_dump(exclude_none=True)
    stream, partial_images = payload.pop("stream", False), payload.pop("partial_images", 0)
    fields, response_format = _image_fields(payload)
    service = get_image_service(current_app)
    settings = current_app.config["S2I_SETTINGS"]
    default_steps = (
        settings.default_steps
        or service.profile(service.chooser.choose(fields["prompt"], fields["model"]).model).steps
    )
    fields, output = gpt_image_fields(fields, default_steps, settings.max_steps)
    try:
        item = service.prepare(service.validate(fields))
    except InvalidRequest as exc:
        details = dict(exc.details or {})
        if "field" in details:
            details["field"] = _openai_param(details["field"])
        for error in details.get("errors") or []:
            error["field"] = _openai_param(error["field"])
        raise InvalidRequest(exc.description, details=details or None) from None
    job = submit("generate", item)
    if stream:
        size = f"{item.request.width}x{item.request.height}"
        return image_stream(job, partial_images, size, _b64_images)
    result = wait_for(job)
    return images_answer(result, response_format, output)


def images_answer(
    result: dict[str, Any], response_format: str, output: dict[str, Any]
) -> ResponseReturnValue:
    """The /v1/images answer of a generation or edit result, in the asked output format."""
    data = [
        _image_item(image, response_format, result["prompt"], output) for image in result["images"]
    ]
    parameters = result["parameters"]
    return jsonify(
        created=int(time.time()),
        data=data,
        model=result["model"],
        output_format=output["output_format"],
        quality=output["quality"],
        background="opaque",
        size=f"{parameters['width']}x{parameters['height']}",
        usage=usage(result["prompt"], len(data), parameters["width"], parameters["height"]),
    )


def _b64_images(result: dict[str, Any]) -> list[str]:
    """The images of a generation result as base64 PNGs (for streamed answers)."""
    return [_image_item(image, "b64_json", "")["b64_json"] for image in result["images"]]


def _image_item(
    image: dict[str, Any], response_format: str, prompt: str, output: dict[str, Any] | None = None
) -> dict[str, Any]:
    output_format = (output or {}).get("output_format", "png")
    if response_format == "url":
        url = url_for("images.get_image", filename=image["filename"], _external=True)
        if output_format != "png":
            url += f"?format={output_format}"
        return {"url": url, "revised_prompt": prompt}
    storage = get_storage(current_app)
    record = storage.get_image(client_owner(), image["filename"])
    data = storage.image_bytes(record) if record is not None else None
    if data is None:  # removed between generation and answer (a cleanup ran)
        raise ResourceNotFound("the generated image is gone")
    data = convert_image(data, output_format, (output or {}).get("output_compression", 100))
    return {"b64_json": base64.b64encode(data).decode(), "revised_prompt": prompt}


# --- models -------------------------------------------------------------------------------
def _models() -> list[dict[str, Any]]:
    """Every model id a /v1 request may name: configured models and OpenAI's aliases."""
    settings = current_app.config["S2I_SETTINGS"]
    created = int(current_app.config["S2I_STARTED_AT"])
    whisper = settings.whisper_model
    entries = [(whisper, "speech2image", "whisper")]
    entries += [(alias, "speech2image", "whisper") for alias in WHISPER_ALIASES]
    entries += [("auto", "speech2image", "image")]
    entries += [(name, "speech2image", "image") for name in get_image_service(current_app).models]
    entries += [(alias, "speech2image", "image") for alias in IMAGE_ALIASES]
    return [
        {"id": model_id, "object": "model", "created": created, "owned_by": owner, "kind": kind}
        for model_id, owner, kind in entries
    ]


@bp.get("/models")
@endpoint(responses={200: ModelList, **_errors(401, 429, 500)}, tags=("openai",))
def list_models() -> ResponseReturnValue:
    """The configured Whisper and image models, with the OpenAI names that map onto them."""
    return jsonify(object="list", data=_models())


@bp.get("/models/<path:model_id>")
@endpoint(
    responses={200: ModelObject, **_errors(400, 401, 404, 429, 500)},
    tags=("openai",),
    path={"model_id": "A model id from GET /v1/models."},
)
def get_model(model_id: str) -> ResponseReturnValue:
    """One model by id."""
    for model in _models():
        if model["id"] == model_id:
            return jsonify(model)
    raise ResourceNotFound(f"no model {model_id!r}", details={"field": "model"})


bp.register_blueprint(audio_bp)
bp.register_blueprint(images_bp)


# --- image edits and variations -------------------------------------------------------------
def _edit_form(app: Any, *, variations: bool = False) -> type[BaseModel]:
    settings = app.config["S2I_SETTINGS"]
    models = ("auto", *IMAGE_ALIASES, *sorted(get_image_service(app).models))
    widths = "|".join(str(w) for w in range(MIN_SIDE, settings.max_width + 1, 8))
    heights = "|".join(str(h) for h in range(MIN_SIDE, settings.max_height + 1, 8))
    fields: dict[str, Any] = {
        "image": (Upload, Field(None, description="The image to edit (PNG, JPEG or WebP).")),
        "images": (
            Upload,
            Field(None, alias="image[]", description="Same as `image` (the first is edited)."),
        ),
        "model": (
            Literal[models],  # type: ignore[valid-type]
            Field(None, description="gpt-image-* (the automatic choice) or a configured model."),
        ),
        "n": (
            Annotated[int, Field(ge=1, le=settings.max_num_images)],
            Field(None, description="Images to make."),
        ),
        "size": (
            Annotated[str, Field(pattern=f"^(auto|({widths})x({heights}))$")],
            Field(None, description="WIDTHxHEIGHT or auto (the image's own size)."),
        ),
        "response_format": (Literal[IMAGE_FORMATS], Field("url")),  # type: ignore[valid-type]
        "user": (safe_text(256), Field(None, description="Accepted; the API key is who.")),
    }
    if not variations:
        native = get_image_service(app).request_model.model_fields["prompt"]
        prompt_type = Annotated[(native.annotation, *native.metadata)]  # type: ignore[misc]
        fields["prompt"] = (prompt_type, Field(description="What the edited image shows."))
        fields["mask"] = (
            Upload,
            Field(
                None,
                description="A PNG the size of the image: its transparent pixels are edited, "
                "the others come back unchanged.",
            ),
        )
        for name, (annotation, info) in gpt_image_body_fields().items():
            fields[name] = (_without_none(annotation), info)
        fields["stream"] = (
            bool,
            Field(
                None,
                description="Server-sent events: `image_edit.partial_image` per preview frame, "
                "then `image_edit.completed` per image (as b64_json).",
            ),
        )
        fields["partial_images"] = (
            whole(ge=0, le=MAX_PARTIAL_IMAGES),
            Field(None, description="Preview frames to stream (with `stream`); default 0."),
        )

    def needs_image(form: Any) -> Any:
        if form.image is None and form.images is None:
            raise PydanticCustomError("missing", "send the image as multipart field `image`")
        return form

    return create_model(
        "OpenAIImageVariationForm" if variations else "OpenAIImageEditForm",
        __config__=ConfigDict(
            extra="forbid",
            populate_by_name=True,
            json_schema_extra={"anyOf": [{"required": ["image"]}, {"required": ["image[]"]}]},
        ),
        __validators__={"needs_image": model_validator(mode="after")(needs_image)},
        **fields,
    )


def _mask_from_alpha(mask: Any) -> Any:
    """OpenAI's mask (transparent = edit) as a native one (white = edit)."""
    from PIL import ImageOps

    from ..editing import InvalidImage

    if "A" not in mask.getbands():
        raise InvalidImage(
            "`mask` must be a PNG with an alpha channel (transparent = edit)",
            details={"field": "mask"},
        )
    return ImageOps.invert(mask.getchannel("A"))


def _edit_answer(form: Any, prompt: str, mask: Any | None, strength: float) -> ResponseReturnValue:
    from ..editing import decode_image
    from .edit import submit_edit

    settings = current_app.config["S2I_SETTINGS"]
    upload = form.image or form.images
    source = decode_image(upload.read(), max_pixels=settings.max_image_pixels, field="image")
    fields: dict[str, Any] = {"prompt": prompt}
    payload = form.model_dump(exclude_none=True, by_alias=False)
    payload.pop("prompt", None)
    stream, partial_images = payload.pop("stream", False), payload.pop("partial_images", 0)
    native, response_format = _image_fields(
        {k: v for k, v in payload.items() if k not in ("image", "images", "mask")}
    )
    native.pop("prompt", None)
    fields |= native
    service = get_image_service(current_app)
    default_steps = (
        settings.default_steps
        or service.profile(service.chooser.choose(prompt, fields["model"]).model).steps
    )
    fields, output = gpt_image_fields(fields, default_steps, settings.max_steps)
    job = submit_edit(fields, source, mask, strength=strength)
    if stream:
        request = job.work.item.request
        size = f"{request.width}x{request.height}"
        return image_stream(job, partial_images, size, _b64_images, events="image_edit")
    return images_answer(wait_for(job), response_format, output)


@images_bp.post("/images/edits")
@endpoint(
    form=_edit_form,
    responses={200: ImagesResponse, **_errors(*ERROR_STATUSES)},
    tags=("openai",),
    idempotent=True,
)
def create_image_edit(form: Any) -> ResponseReturnValue:
    """Edit an image with a prompt; a mask's transparent pixels say where (createImageEdit)."""
    from ..editing import decode_image

    mask = None
    if form.mask is not None:
        settings = current_app.config["S2I_SETTINGS"]
        decoded = decode_image(form.mask.read(), max_pixels=settings.max_image_pixels, field="mask")
        mask = _mask_from_alpha(decoded)
    return _edit_answer(form, form.prompt, mask, 1.0 if mask is not None else DEFAULT_STRENGTH)


@images_bp.post("/images/variations")
@endpoint(
    form=lambda app: _edit_form(app, variations=True),
    responses={200: ImagesResponse, **_errors(*ERROR_STATUSES)},
    tags=("openai",),
    idempotent=True,
)
def create_image_variation(form: Any) -> ResponseReturnValue:
    """Variations of an image (createImageVariation): its own prompt if it carries one."""
    import io
    import json

    from PIL import Image

    upload = form.image or form.images
    data = upload.read()
    upload.stream.seek(0)
    prompt = VARIATION_PROMPT
    try:
        info = Image.open(io.BytesIO(data)).info.get("parameters")
        found = json.loads(info).get("prompt") if info else None
        if isinstance(found, str) and found.strip():
            prompt = found.strip()
    except Exception:  # not our PNG, or no parameters: the neutral prompt; decoded below
        pass
    return _edit_answer(form, prompt, None, VARIATION_STRENGTH)
