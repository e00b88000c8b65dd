"""A verbose transcription result as an HTTP answer: text, SubRip, WebVTT or JSON.

The one renderer behind POST /transcribe-audio and the OpenAI-compatible /v1/audio routes:
the text formats are the same on both; each surface passes the JSON shape it answers with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Response, jsonify

from .openapi import Content
from .responses import Transcription

__all__ = [
    "RESPONSE_FORMATS",
    "TRANSCRIPT_RESPONSE",
    "JsonShape",
    "render_transcript",
    "to_srt",
    "to_vtt",
]

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
_TEXT_TYPES = {"text": "text/plain", "srt": "application/x-subrip", "vtt": "text/vtt"}
# The 200 answer of a transcription route, for the OpenAPI description.
TRANSCRIPT_RESPONSE = Content(
    {
        "application/json": Transcription,
        **{media_type: {"type": "string"} for media_type in _TEXT_TYPES.values()},
    },
    "The transcript in the requested `response_format`",
)
# The JSON a surface answers with: (verbose result, whether verbose_json was asked) -> body.
JsonShape = Callable[[dict[str, Any], bool], dict[str, Any]]


def render_transcript(body: dict[str, Any], response_format: str, shape: JsonShape) -> Response:
    """A verbose transcription result in ``response_format``; its JSON shaped by ``shape``."""
    if response_format == "text":
        text = body["text"] + "\n"
    elif response_format == "srt":
        text = to_srt(body["segments"])
    elif response_format == "vtt":
        text = to_vtt(body["segments"])
    else:
        return jsonify(shape(body, response_format == "verbose_json"))
    return Response(text, mimetype=_TEXT_TYPES[response_format])


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
