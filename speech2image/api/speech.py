"""POST /transcribe-audio (transcript in five formats) and POST /speech-to-image."""

from __future__ import annotations

from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from flask import Blueprint, current_app
from flask.typing import ResponseReturnValue
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    create_model,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ..errors import InvalidRequest
from ..image_service import get_image_service
from ..jobs import Job
from ..kinds import SpeechToImageWork, TranscribeWork
from ..prompting import UnderstandSteps
from ..schemas import check_text, invalid_request, parse_json_text, safe_text
from ..speech_service import (
    MAX_PROMPT_CHARS,
    TASKS,
    WHISPER_LANGUAGES,
    TranscribeOptions,
    get_speech_service,
)
from .jobs import respond, submit, wait_for, wants_async
from .openapi import Upload, endpoint
from .responses import Generation, JobAccepted
from .streams import TRANSCRIPT_OR_STREAM, transcript_stream
from .transcript_formats import RESPONSE_FORMATS, render_transcript

__all__ = ["RESPONSE_FORMATS", "bp", "language_type", "pipeline_bp"]

bp = Blueprint("speech", __name__)
# Its own blueprint, so it carries the generation rate limit rather than transcription's.
pipeline_bp = Blueprint("pipeline", __name__)

VERBOSE_ONLY = ("segments", "words", "duration_after_vad", "batch_size")


def _language(value: Any) -> Any:
    # Codes compare in lower case; empty means "detect".
    return value.lower() if isinstance(value, str) else value


# Optional form fields are never null: a multipart form cannot send a null, only leave it out.
FormSwitch = bool


def _whisper_languages() -> tuple[str, ...]:
    # The service's own copy of Whisper's codes: an API process never imports faster-whisper.
    codes = set(WHISPER_LANGUAGES) | {c.upper() for c in WHISPER_LANGUAGES}
    return tuple(sorted(codes))


def language_type() -> Any:
    """A form's `language`: a code Whisper knows (either case), or empty for "detect"."""
    return Annotated[
        Literal[("", *_whisper_languages())],  # type: ignore[valid-type]
        BeforeValidator(_language),
    ]


def _audio_fields(app: Any) -> dict[str, Any]:
    """The fields every audio upload form shares (the file and the transcription options)."""
    return {
        "audio": (Upload, Field(None, description="The audio file (any common format).")),
        "file": (Upload, Field(None, description="Same as `audio` (OpenAI's name).")),
        "language": (
            language_type(),
            Field(None, description="ISO 639-1 code of the speech; empty or absent: detect it."),
        ),
        "task": (
            Literal[TASKS],  # type: ignore[valid-type]
            Field("transcribe", description="`translate`: English text from any language."),
        ),
        "word_timestamps": (bool, Field(False, description="Word-level timestamps.")),
        "prompt": (
            safe_text(MAX_PROMPT_CHARS),
            Field(
                None,
                description="Whisper's initial prompt: spellings of names and jargon it should "
                "prefer (e.g. ComfyUI).",
            ),
        ),
        "temperature": (
            Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)],
            Field(None, description="Fixed sampling temperature; absent: 0, then 0.4 and 0.8."),
        ),
        "async_": (
            bool,
            Field(False, alias="async", description="Answer 202 with a job at once."),
        ),
    }


def _needs_audio(form: Any) -> Any:
    if form.audio is None and form.file is None:
        raise PydanticCustomError(
            "missing", "send the audio as multipart/form-data field `audio` (or `file`)"
        )
    return form


# The schema says what _needs_audio checks: one of the two file fields.
AUDIO_REQUIRED = ConfigDict(
    extra="forbid",
    json_schema_extra={"anyOf": [{"required": ["audio"]}, {"required": ["file"]}]},
)


def _without_none(annotation: Any) -> Any:
    args = [a for a in get_args(annotation) if a is not type(None)]
    if get_origin(annotation) in (Union, UnionType) and len(args) == 1:
        return args[0]
    return annotation


def _transcribe_form(app: Any) -> type[BaseModel]:
    return create_model(
        "TranscribeAudioForm",
        __config__=AUDIO_REQUIRED,
        __validators__={"needs_audio": model_validator(mode="after")(_needs_audio)},
        **_audio_fields(app),
        response_format=(
            Literal[RESPONSE_FORMATS],  # type: ignore[valid-type]
            Field("json", description="json, text, srt, vtt or verbose_json."),
        ),
        stream=(
            bool,
            Field(
                False,
                description="Answer server-sent events: `transcript.text.delta` per decoded "
                "segment, then `transcript.text.done` with the text and the whole result.",
            ),
        ),
    )


def _speech_to_image_form(app: Any) -> type[BaseModel]:
    image_model = get_image_service(app).request_model
    image_fields = {}
    for name, info in image_model.model_fields.items():
        if name in ("prompt", "async_"):
            continue
        annotation = _without_none(info.annotation)
        if info.metadata:
            annotation = Annotated[(annotation, *info.metadata)]  # type: ignore[misc]
        image_fields[name] = (
            annotation,
            Field(None, description=f"{info.description} Overrides `options`."),
        )
    # `options` travels as a JSON part (encoding application/json): described as the object.
    full = image_model.model_json_schema()
    options_schema = {
        "type": "object",
        "title": "ImageOptions",
        "properties": {k: v for k, v in full["properties"].items() if k not in ("prompt", "async")},
        "additionalProperties": False,
    }
    return create_model(
        "SpeechToImageForm",
        __config__=AUDIO_REQUIRED,
        __validators__={"needs_audio": model_validator(mode="after")(_needs_audio)},
        **_audio_fields(app),
        options=(
            Annotated[str, BeforeValidator(_options_text), WithJsonSchema(options_schema)],
            Field(
                None,
                description="JSON object of /generate-image fields (not `prompt`: the speech "
                "is the prompt). Separate form fields override it.",
            ),
        ),
        understand=(
            FormSwitch,
            Field(
                None,
                description="Turn the speech into a prompt (translate, clean, spoken "
                "negatives); default true. Each step's own field wins.",
            ),
        ),
        translate=(FormSwitch, Field(None, description="Translate speech to English.")),
        clean=(FormSwitch, Field(None, description="Drop fillers and framing.")),
        negatives=(
            FormSwitch,
            Field(None, description='Spoken "without X" goes to the negative prompt.'),
        ),
        **image_fields,
    )


def _options_text(value: Any) -> Any:
    if not isinstance(value, str):
        raise ValueError("must be a JSON object sent as a form field")
    return check_text(value)


def _options(form: Any) -> TranscribeOptions:
    return TranscribeOptions(
        form.language or None,
        form.task,
        form.word_timestamps,
        form.prompt or None,
        form.temperature,
    )


def submit_with_upload(upload: Any, kind: str, work: Any) -> Job:
    """Store the upload under a server-made name and submit the job that needs it."""
    path = get_speech_service(current_app).store_upload(upload.stream)
    return submit(kind, work, input=path)


@bp.post("/transcribe-audio")
@endpoint(
    form=_transcribe_form,
    responses={
        200: TRANSCRIPT_OR_STREAM,
        202: JobAccepted,
    },
    errors=(409, 415, 422, 503),
    idempotent=True,
    tags=("speech",),
)
def transcribe_audio(form: Any) -> ResponseReturnValue:
    """Transcribe (or translate to English) the uploaded audio."""
    options = _options(form)
    job = submit_with_upload(form.audio or form.file, "transcribe", TranscribeWork(options))
    if form.stream:
        return transcript_stream(job, result=True)
    if wants_async():
        return respond(job)
    return render(wait_for(job), form.response_format)


@pipeline_bp.post("/speech-to-image")
@endpoint(
    form=_speech_to_image_form,
    responses={200: Generation, 202: JobAccepted},
    errors=(409, 415, 422, 503, 507),
    idempotent=True,
    tags=("speech", "images"),
)
def speech_to_image(form: Any) -> ResponseReturnValue:
    """Audio in, images out: transcribe, choose the model from the words, generate."""
    service = get_image_service(current_app)
    fields: dict[str, Any] = {}
    if form.options is not None:
        fields = parse_json_text(form.options, "options")
        if not isinstance(fields, dict):
            raise InvalidRequest(
                "`options` must be a JSON object of image fields", details={"field": "options"}
            )
        if "prompt" in fields:
            raise InvalidRequest(
                "`options` must not contain `prompt`: the speech is the prompt",
                details={"field": "options.prompt"},
            )
        fields.pop("async", None)
        try:
            service.request_model.model_validate({**fields, "prompt": "placeholder"})
        except ValidationError as exc:
            raise invalid_request(exc, service.request_model, prefix="options.") from None
    shared = {"audio", "file", "language", "task", "word_timestamps", "options", "async_"}
    shared |= {"prompt", "temperature"}
    shared |= {"understand", *UNDERSTAND_STEPS}
    given = form.model_dump(include=form.model_fields_set - shared, exclude_none=True)
    fields.update(given)
    # Check the merged image fields now, with a stand-in prompt, before any audio is decoded,
    # and that the image model can be had: a transcription must not be spent on a sure 503.
    service.ensure_available(service.validate({**fields, "prompt": "placeholder"}).model)
    options = _options(form)
    steps = _understand_steps(form)
    job = submit_with_upload(
        form.audio or form.file, "speech_to_image", SpeechToImageWork(options, fields, steps)
    )
    return respond(job)


UNDERSTAND_STEPS = ("translate", "clean", "negatives")


def _understand_steps(form: Any) -> UnderstandSteps:
    """Spoken-prompt understanding: `understand` sets every step; a step's own field wins."""
    understand = True if form.understand is None else form.understand
    return UnderstandSteps(
        **{
            step: understand if getattr(form, step) is None else getattr(form, step)
            for step in UNDERSTAND_STEPS
        }
    )


def _native_json(body: dict[str, Any], verbose: bool) -> dict[str, Any]:
    """The native JSON answer: the whole result, or without the verbose-only fields."""
    return body if verbose else {k: v for k, v in body.items() if k not in VERBOSE_ONLY}


def render(body: dict[str, Any], response_format: str) -> ResponseReturnValue:
    """Turn a verbose transcription result into the requested response format."""
    return render_transcript(body, response_format, _native_json)
