"""Live: transcripts streamed as they are decoded, image previews, long audio in batches."""

from __future__ import annotations

import base64
import io
import json
import re
import urllib.request

import openai
from PIL import Image

from .test_openai import sdk


def _events(raw: str) -> list[dict]:
    """The JSON of each `data:` line of an SSE body."""
    return [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: ")]


def test_transcription_streams_in_openai_shapes_and_natively(
    shared_app, live_server, speech
) -> None:
    base = live_server(shared_app)
    client = sdk(base)
    with open(speech["long"], "rb") as fh:
        stream = client.audio.transcriptions.create(model="whisper-1", file=fh, stream=True)
        events = list(stream)
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    (done,) = [e for e in events if e.type == "transcript.text.done"]
    assert events[-1] is done and len(deltas) >= 2  # segment by segment, then the whole
    assert "".join(deltas) == done.text and "lighthouse" in done.text.lower()
    assert done.usage.output_tokens > 0 and done.usage.input_tokens > 0

    # The native endpoint: the same events; the done event also has the whole result.
    boundary = "----s2i"
    with open(speech["politeness"], "rb") as fh:
        audio = fh.read()
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="stream"\r\n\r\ntrue\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="audio"; filename="a.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n"
        ).encode()
        + audio
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        base + "/transcribe-audio",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        native = _events(response.read().decode())
    assert native[-1]["type"] == "transcript.text.done"
    text = "".join(e["delta"] for e in native if e["type"] == "transcript.text.delta")
    assert text == native[-1]["text"] == native[-1]["result"]["text"]
    assert {"thank", "you"} <= set(re.findall(r"[a-z]+", text.lower()))

    # Bad input is refused before any stream starts, in OpenAI's error shape.
    try:
        client.audio.transcriptions.create(model="nope", file=("a.wav", audio), stream=True)
    except openai.BadRequestError as exc:
        assert exc.body["param"] == "model"
    else:
        raise AssertionError("an unknown model must be refused")


def test_image_previews_in_job_events_and_openai_stream(shared_app, live_server) -> None:
    base = live_server(shared_app)
    native = shared_app.test_client()
    job = native.post(
        "/generate-image", json={"prompt": "a red fox", "steps": 4, "seed": 3, "async": True}
    ).get_json()
    with urllib.request.urlopen(base + job["events"] + "?previews=true", timeout=120) as response:
        frames = [
            e["partial"]["preview"] for e in _events(response.read().decode()) if "partial" in e
        ]
    # The last frame stays on the job: a stream that opens late still gets one.
    assert frames and frames[-1]["method"] == "projection" and frames[-1]["step"] < 4
    preview = Image.open(io.BytesIO(base64.b64decode(frames[-1]["b64_png"])))
    assert preview.size == (64, 64) and preview.mode == "RGB"
    # Without asking (and in GET /jobs/<id>) there are no frames.
    with urllib.request.urlopen(base + job["events"], timeout=120) as response:
        assert "b64_png" not in response.read().decode()
    assert "preview" not in (native.get(job["url"]).get_json().get("partial") or {})
    assert native.get(job["events"] + "?previews=maybe").status_code == 400

    # OpenAI's streamed generation: partial images, then the completed image.
    client = sdk(base)
    events = list(
        client.images.generate(
            model="tiny-art", prompt="a red fox", size="64x64", stream=True, partial_images=2
        )
    )
    partial = [e for e in events if e.type == "image_generation.partial_image"]
    (completed,) = [e for e in events if e.type == "image_generation.completed"]
    assert events[-1] is completed and 1 <= len(partial) <= 2
    assert [e.partial_image_index for e in partial] == list(range(len(partial)))
    final = Image.open(io.BytesIO(base64.b64decode(completed.b64_json)))
    assert final.size == (64, 64) and completed.size == "64x64"
