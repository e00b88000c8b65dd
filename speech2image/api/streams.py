"""Server-sent event streams in OpenAI's shapes: a transcript as it is decoded, images as
they form.

A job shows what it has so far in ``Job.partial`` (``text``: the transcript so far;
``preview``: the newest preview frame), which its snapshots carry in both modes. These
streams turn snapshots into events:

- :func:`transcript_stream`: ``transcript.text.delta`` per decoded segment, then
  ``transcript.text.done`` with the whole text and usage (``POST /v1/audio/transcriptions``
  and ``POST /transcribe-audio`` with ``stream=true``). The deltas joined are the final text.
- :func:`image_stream`: ``image_generation.partial_image`` per preview frame (at most
  ``partial_images``), then one ``image_generation.completed`` per image (the image
  endpoints with ``stream=true``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import Response, current_app, stream_with_context

from ..errors import error_body
from ..jobs import Job, get_job_runner
from .identity import rate_limit_key
from .jobs import KEEPALIVE_SECONDS, StreamSlots
from .openapi import Content
from .transcript_formats import TRANSCRIPT_RESPONSE

__all__ = [
    "SSE_STREAM",
    "TRANSCRIPT_OR_STREAM",
    "event_stream",
    "image_stream",
    "transcript_stream",
]

#: The OpenAPI description of a stream: one JSON event per `data:` line.
SSE_STREAM = {
    "type": "object",
    "properties": {
        "event": {"type": "string", "description": "The event's `type`."},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
    "required": ["data"],
}
#: A transcription's 200: the transcript, or with `stream=true` its events.
TRANSCRIPT_OR_STREAM = Content(
    {**TRANSCRIPT_RESPONSE.media, "text/event-stream": SSE_STREAM},
    "The transcript in the requested `response_format`; with `stream=true`, server-sent "
    "events (`transcript.text.delta`, then `transcript.text.done`)",
)


def sse(event: dict[str, Any]) -> str:
    """One event: its `type` as the SSE event name, the JSON as data."""
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"


def event_stream(
    job: Job, events: Callable[[dict[str, Any]], Iterator[dict[str, Any]]]
) -> Response:
    """An SSE response of ``events(snapshot)`` for each change of ``job`` until it ends.

    The stream holds one of the caller's stream slots (429/503 past the limits). A client that
    leaves cancels the job unless someone else waits for it.
    """
    runner = get_job_runner(current_app)
    slots: StreamSlots = current_app.extensions["sse_slots"]
    holder = rate_limit_key()
    slots.acquire(holder)

    def stream() -> Iterator[str]:
        with job.waiting():
            finished = False
            try:
                for snapshot in runner.watch(job, KEEPALIVE_SECONDS):
                    if snapshot is None:
                        yield ": keep-alive\n\n"
                        continue
                    for event in events(snapshot):
                        yield sse(event)
                finished = True
            finally:
                if not finished and not job.done and job.abandon():
                    runner.cancel(job.owner, job.id)

    response = Response(
        stream_with_context(stream()),
        mimetype="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
    response.call_on_close(lambda: slots.release(holder))
    return response


def _failure(snapshot: dict[str, Any]) -> dict[str, Any]:
    """The `error` event of a job that failed or was cancelled (the SDK raises it)."""
    if snapshot["state"] == "cancelled":
        error = {"error": "job_cancelled", "message": "the job was cancelled before it finished"}
    else:
        error = snapshot.get("error") or error_body(RuntimeError("failed"))
    return {
        "type": "error",
        "error": {
            "message": error.get("message", "the job failed"),
            "type": "server_error",
            "code": error.get("error"),
            "param": None,
        },
    }


def transcript_stream(job: Job, *, result: bool = False) -> Response:
    """``transcript.text.delta`` events as segments are decoded, then ``transcript.text.done``.

    Only whole segments are sent, never trailing whitespace, so the deltas always join to a
    prefix of the final text. ``result``: the done event also carries the job's whole result
    (the native endpoint).
    """
    sent = ""

    def events(snapshot: dict[str, Any]) -> Iterator[dict[str, Any]]:
        nonlocal sent
        state = snapshot["state"]
        if state == "succeeded":
            body = snapshot["result"]
            text = body["text"]
        elif state in ("failed", "cancelled"):
            yield _failure(snapshot)
            return
        else:
            text = ((snapshot.get("partial") or {}).get("text") or "").rstrip()
        if text.startswith(sent) and len(text) > len(sent):
            yield {"type": "transcript.text.delta", "delta": text[len(sent) :]}
            sent = text
        if state == "succeeded":
            output = sum(len(s.get("tokens") or ()) for s in body.get("segments") or ())
            # Whisper's encoder reads 50 frames a second of audio.
            audio = round(float(body.get("duration") or 0) * 50)
            done: dict[str, Any] = {
                "type": "transcript.text.done",
                "text": text,
                "usage": {
                    "type": "tokens",
                    "input_tokens": audio,
                    "output_tokens": output,
                    "total_tokens": audio + output,
                    "input_token_details": {"audio_tokens": audio, "text_tokens": 0},
                },
            }
            if result:
                done["result"] = body
            yield done

    return event_stream(job, events)


def image_stream(
    job: Job,
    partial_images: int,
    size: str,
    finished: Callable[[dict[str, Any]], list[str]],
    *,
    events: str = "image_generation",
) -> Response:
    """OpenAI's image events: ``image_generation.partial_image`` for up to ``partial_images``
    preview frames as the job denoises, then ``image_generation.completed`` per image
    (``events="image_edit"``: the ``image_edit.*`` events of an edit).

    ``finished(result)`` turns the job's result into the images' base64 PNGs (it runs in the
    request's context). Reusable by any image kind whose jobs show ``partial["preview"]``.
    """
    shown = 0
    last_frame = None

    def common() -> dict[str, Any]:
        return {
            "created_at": int(time.time()),
            "size": size,
            "quality": "auto",
            "background": "opaque",
            "output_format": "png",
        }

    def answer(snapshot: dict[str, Any]) -> Iterator[dict[str, Any]]:
        nonlocal shown, last_frame
        state = snapshot["state"]
        if state in ("failed", "cancelled"):
            yield _failure(snapshot)
            return
        preview = (snapshot.get("partial") or {}).get("preview")
        if preview and shown < partial_images and preview.get("frame") != last_frame:
            last_frame = preview.get("frame")
            yield {
                "type": f"{events}.partial_image",
                "b64_json": preview["b64_png"],
                "partial_image_index": shown,
                **common(),
            }
            shown += 1
        if state == "succeeded":
            usage = {
                "input_tokens": 0,
                "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
                "output_tokens": 0,
                "total_tokens": 0,
            }
            for b64 in finished(snapshot["result"]):
                yield {
                    "type": f"{events}.completed",
                    "b64_json": b64,
                    "usage": usage,
                    **common(),
                }

    return event_stream(job, answer)
