"""POST /transcribe-audio: multipart upload in, transcript out in five formats."""

from __future__ import annotations

import dataclasses
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from flask.typing import ResponseReturnValue

from ..engines.whisper import TranscriptSegment
from ..errors import InvalidRequest
from ..speech_service import TranscriptionResult, get_speech_service

__all__ = ["RESPONSE_FORMATS", "bp"]

bp = Blueprint("speech", __name__)

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")


@bp.post("/transcribe-audio")
def transcribe_audio() -> ResponseReturnValue:
    """Transcribe (or translate to English) the uploaded audio."""
    service = get_speech_service(current_app)
    upload = request.files.get("audio") or request.files.get("file")
    if upload is None:
        raise InvalidRequest("send the audio as multipart/form-data field `audio` (or `file`)")
    response_format = (request.form.get("response_format") or "json").strip().lower()
    if response_format not in RESPONSE_FORMATS:
        raise InvalidRequest(
            f"`response_format` must be one of {', '.join(RESPONSE_FORMATS)}, "
            f"not {response_format!r}"
        )
    options = service.validate_options(
        request.form.get("language"), request.form.get("task"), request.form.get("word_timestamps")
    )
    with service.stored_upload(upload.stream) as path:
        result = service.transcribe_file(path, options)
    return render(result, response_format)


def render(result: TranscriptionResult, response_format: str) -> ResponseReturnValue:
    """Turn a transcription into the requested response format."""
    transcript = result.transcript
    if response_format == "text":
        return Response(transcript.text + "\n", mimetype="text/plain")
    if response_format == "srt":
        return Response(to_srt(transcript.segments), mimetype="application/x-subrip")
    if response_format == "vtt":
        return Response(to_vtt(transcript.segments), mimetype="text/vtt")
    body: dict[str, Any] = {
        "text": transcript.text,
        "language": transcript.language,
        "language_probability": transcript.language_probability,
        "duration": transcript.duration,
        "task": transcript.task,
        "model": result.model,
        "processing_time": result.timings["total"],
        "timings": result.timings,
    }
    if response_format == "verbose_json":
        body["duration_after_vad"] = transcript.duration_after_vad
        body["segments"] = [dataclasses.asdict(s) for s in transcript.segments]
        words = [w for s in transcript.segments for w in (s.words or [])]
        body["words"] = [dataclasses.asdict(w) for w in words] if words else None
    return jsonify(body)


def _timestamp(seconds: float, separator: str) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def to_srt(segments: list[TranscriptSegment]) -> str:
    """SubRip subtitles, one cue per segment."""
    cues = [
        f"{i}\n{_timestamp(s.start, ',')} --> {_timestamp(s.end, ',')}\n{s.text.strip()}\n"
        for i, s in enumerate(segments, start=1)
    ]
    return "\n".join(cues)


def to_vtt(segments: list[TranscriptSegment]) -> str:
    """WebVTT subtitles, one cue per segment."""
    cues = [
        f"{_timestamp(s.start, '.')} --> {_timestamp(s.end, '.')}\n{s.text.strip()}\n"
        for s in segments
    ]
    return "WEBVTT\n\n" + "\n".join(cues)
