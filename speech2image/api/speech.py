"""POST /transcribe-audio (transcript in five formats) and POST /speech-to-image."""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from flask.typing import ResponseReturnValue

from ..errors import InvalidRequest
from ..image_service import get_image_service
from ..jobs import Job, get_job_runner
from ..prompting import UnderstandSteps
from ..speech_service import TranscribeOptions, discard_upload, get_speech_service
from ..tasks import SpeechToImageWork, TranscribeWork
from .identity import client_owner
from .jobs import respond, wait_for, wants_async

__all__ = ["RESPONSE_FORMATS", "bp", "pipeline_bp"]

bp = Blueprint("speech", __name__)
# Its own blueprint, so it carries the generation rate limit rather than transcription's.
pipeline_bp = Blueprint("pipeline", __name__)

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
VERBOSE_ONLY = ("segments", "words", "duration_after_vad")


def _upload_and_options() -> tuple[Any, TranscribeOptions]:
    """The uploaded file and the validated transcription options (nothing stored yet)."""
    service = get_speech_service(current_app)
    upload = request.files.get("audio") or request.files.get("file")
    if upload is None:
        raise InvalidRequest("send the audio as multipart/form-data field `audio` (or `file`)")
    options = service.validate_options(
        request.form.get("language"), request.form.get("task"), request.form.get("word_timestamps")
    )
    return upload, options


def _submit_with_upload(upload: Any, make_job: Any) -> Job:
    """Store the upload under a server-made name and submit the job that will remove it."""
    path = get_speech_service(current_app).store_upload(upload.stream)
    try:
        job = make_job(path)
        job.cleanup = lambda: discard_upload(path)  # however the job ends
        return get_job_runner(current_app).submit(job)
    except BaseException:
        discard_upload(path)
        raise


@bp.post("/transcribe-audio")
def transcribe_audio() -> ResponseReturnValue:
    """Transcribe (or translate to English) the uploaded audio."""
    upload, options = _upload_and_options()
    response_format = (request.form.get("response_format") or "json").strip().lower()
    if response_format not in RESPONSE_FORMATS:
        raise InvalidRequest(
            f"`response_format` must be one of {', '.join(RESPONSE_FORMATS)}, "
            f"not {response_format!r}"
        )
    job = _submit_with_upload(
        upload,
        lambda path: Job(
            kind="transcribe", owner=client_owner(), work=TranscribeWork(path, options)
        ),
    )
    if wants_async():
        return respond(job)
    return render(wait_for(job), response_format)


@pipeline_bp.post("/speech-to-image")
def speech_to_image() -> ResponseReturnValue:
    """Audio in, images out: transcribe, choose the model from the words, generate."""
    upload, options = _upload_and_options()
    raw = request.form.get("options") or "{}"
    try:
        fields = json.loads(raw)
    except ValueError:
        raise InvalidRequest("`options` must be a JSON object of image fields") from None
    if not isinstance(fields, dict):
        raise InvalidRequest("`options` must be a JSON object of image fields")
    if "prompt" in fields:
        raise InvalidRequest("`options` must not contain `prompt`: the speech is the prompt")
    for name in ("negative_prompt", "model", "scheduler"):
        if name in request.form:
            fields[name] = request.form[name]
    for name in ("width", "height", "steps", "seed", "num_images"):
        if name in request.form:
            fields[name] = _form_int(name)
    fields.pop("async", None)
    steps = _understand_steps()
    # Check the image fields now, with a stand-in prompt, before any audio is decoded, and
    # that the image model can be had: a transcription must not be spent on a certain 503.
    images = get_image_service(current_app)
    images.ensure_available(images.validate({**fields, "prompt": "placeholder"}).model)
    job = _submit_with_upload(
        upload,
        lambda path: Job(
            kind="speech_to_image",
            owner=client_owner(),
            work=SpeechToImageWork(path, options, fields, steps),
        ),
    )
    return respond(job)


UNDERSTAND_STEPS = ("translate", "clean", "negatives")


def _form_switch(name: str, default: bool) -> bool:
    """A true/false form field; absent or empty means ``default``."""
    value = (request.form.get(name) or "").strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise InvalidRequest(
        f"`{name}` must be true or false, not {request.form[name]!r}", details={"field": name}
    )


def _understand_steps() -> UnderstandSteps:
    """Spoken-prompt understanding: `understand` sets every step; a step's own field wins."""
    understand = _form_switch("understand", True)
    return UnderstandSteps(**{step: _form_switch(step, understand) for step in UNDERSTAND_STEPS})


def _form_int(name: str) -> int:
    try:
        return int(request.form[name])
    except ValueError:
        raise InvalidRequest(f"`{name}` must be a whole number", details={"field": name}) from None


def render(body: dict[str, Any], response_format: str) -> ResponseReturnValue:
    """Turn a verbose transcription result into the requested response format."""
    segments = body["segments"]
    if response_format == "text":
        return Response(body["text"] + "\n", mimetype="text/plain")
    if response_format == "srt":
        return Response(to_srt(segments), mimetype="application/x-subrip")
    if response_format == "vtt":
        return Response(to_vtt(segments), mimetype="text/vtt")
    if response_format == "json":
        body = {k: v for k, v in body.items() if k not in VERBOSE_ONLY}
    return jsonify(body)


def _timestamp(seconds: float, separator: str) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def to_srt(segments: list[dict[str, Any]]) -> str:
    """SubRip subtitles, one cue per segment."""
    cues = [
        f"{i}\n{_timestamp(s['start'], ',')} --> {_timestamp(s['end'], ',')}\n{s['text'].strip()}\n"
        for i, s in enumerate(segments, start=1)
    ]
    return "\n".join(cues)


def to_vtt(segments: list[dict[str, Any]]) -> str:
    """WebVTT subtitles, one cue per segment."""
    cues = [
        f"{_timestamp(s['start'], '.')} --> {_timestamp(s['end'], '.')}\n{s['text'].strip()}\n"
        for s in segments
    ]
    return "WEBVTT\n\n" + "\n".join(cues)
