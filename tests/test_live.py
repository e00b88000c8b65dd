"""Live: transcripts streamed as they are decoded, image previews, long audio in batches."""

from __future__ import annotations

import base64
import io
import json
import urllib.request

import openai
import pytest
from PIL import Image

from speech2image.api.identity import LOCAL_OWNER
from speech2image.app import create_app

from .conftest import _test_settings
from .test_jobs import wait_state
from .test_openai import sdk, words


def _events(raw: str) -> list[dict]:
    """The JSON of each `data:` line of an SSE body."""
    return [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: ")]


@pytest.fixture(scope="module")
def batching_app(tmp_path_factory, model_cache, tiny_models):
    """Audio longer than 10 s goes through faster-whisper's batched pipeline."""
    root = tmp_path_factory.mktemp("live-app")
    return create_app(_test_settings(root, model_cache, tiny_models, whisper_batch_seconds=10))


def _multipart(boundary: str, fields: dict[str, str], audio: bytes) -> bytes:
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        for name, value in fields.items()
    ]
    head = "".join(parts) + (
        f'--{boundary}\r\nContent-Disposition: form-data; name="audio"; filename="a.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    )
    return head.encode() + audio + f"\r\n--{boundary}--\r\n".encode()


def test_transcription_streams_in_openai_shapes_and_natively(
    batching_app, live_server, speech
) -> None:
    base = live_server(batching_app)
    client = sdk(base)
    with open(speech["politeness"], "rb") as fh:
        audio = fh.read()
    stream = client.audio.transcriptions.create(
        model="whisper-1", file=("p.wav", audio), stream=True
    )
    events = list(stream)
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert events[-1].type == "transcript.text.done", events
    done = events[-1]
    assert deltas  # segment by segment, then the whole
    assert "".join(deltas) == done.text and {"thank", "you"} <= words(done.text)
    assert done.usage.output_tokens > 0 and done.usage.input_tokens > 0

    # The native endpoint: the same events; the done event also has the whole result. The
    # long recording (17 s) goes through the batched pipeline: same shape, word timestamps.
    with open(speech["long"], "rb") as fh:
        body = _multipart("s2i", {"stream": "true", "word_timestamps": "true"}, fh.read())
    request = urllib.request.Request(
        base + "/transcribe-audio",
        data=body,
        headers={"Content-Type": "multipart/form-data; boundary=s2i"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        native = _events(response.read().decode())
    assert native[-1]["type"] == "transcript.text.done"
    text = "".join(e["delta"] for e in native if e["type"] == "transcript.text.delta")
    result = native[-1]["result"]
    assert text == native[-1]["text"] == result["text"]
    assert {"painter", "lighthouse", "harbour"} <= words(text)
    assert result["batch_size"] == 8 and result["segments"][0]["start"] >= 0
    assert {"painter", "beach"} <= {w["word"].strip(" .,").lower() for w in result["words"]}
    assert all(w["start"] <= w["end"] <= result["duration"] for w in result["words"])

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


def test_drafts_run_last_and_supersede_each_other(make_app) -> None:
    app = make_app(job_workers=1, draft_size=64, draft_steps=2)
    client = app.test_client()
    runner = app.extensions["jobs"]
    busy = client.post(
        "/generate-image", json={"prompt": "a lighthouse", "steps": 8, "async": True}
    ).get_json()
    first = client.post("/drafts", json={"prompt": "a red"}).get_json()
    second = client.post("/drafts", json={"prompt": "a red fox"})
    assert second.status_code == 202 and second.headers["Location"] == second.get_json()["url"]
    second = second.get_json()
    later = client.post(
        "/generate-image", json={"prompt": "a boat", "steps": 2, "async": True}
    ).get_json()
    jobs = {
        name: runner.get(LOCAL_OWNER, j["id"])
        for name, j in (("busy", busy), ("first", first), ("second", second), ("later", later))
    }
    for job in jobs.values():
        assert job.wait(120)
    # The earlier draft was superseded; the full-quality job queued after the draft ran first.
    assert jobs["first"].state.value == "cancelled"
    assert jobs["second"].state.value == "succeeded" and jobs["later"].state.value == "succeeded"
    assert jobs["later"].started_at < jobs["second"].started_at
    result = client.get(second["url"]).get_json()["result"]
    assert result["seed"] == 1 and result["steps"] == 2 and result["prompt"] == "a red fox"
    draft = Image.open(io.BytesIO(base64.b64decode(result["b64_png"])))
    assert draft.size == (64, 64)
    # Drafts are not kept: only the two full-quality images are in the history.
    assert client.get("/images").get_json()["total"] == 2
    assert client.post("/drafts", json={"prompt": " "}).status_code == 400
    assert client.post("/drafts", json={"prompt": "x", "steps": 30}).status_code == 400


def test_drafts_have_their_own_limit_across_clients(make_app) -> None:
    app = make_app(api_keys=["a", "b"], job_workers=1, draft_size=64, drafts_max_active=1)
    client = app.test_client()
    busy = client.post(
        "/generate-image",
        json={"prompt": "a lighthouse", "steps": 8, "async": True},
        headers={"X-API-Key": "a"},
    ).get_json()
    queued = client.post("/drafts", json={"prompt": "a red"}, headers={"X-API-Key": "a"})
    assert queued.status_code == 202
    refused = client.post("/drafts", json={"prompt": "a boat"}, headers={"X-API-Key": "b"})
    assert refused.status_code == 429 and refused.get_json()["error"]["code"] == "drafts_busy"
    # Other work is not limited by drafts.
    other = client.post(
        "/generate-image",
        json={"prompt": "a boat", "steps": 1, "async": True},
        headers={"X-API-Key": "b"},
    )
    assert other.status_code == 202
    for key, job in (("a", busy), ("a", queued.get_json()), ("b", other.get_json())):
        done = wait_state(client, job["id"], {"succeeded", "failed"}, headers={"X-API-Key": key})
        assert done["state"] == "succeeded", done


def test_preview_frames_from_a_tiny_autoencoder_and_packed_flux_latents(tmp_path) -> None:
    """The engine's two other frame paths: AutoencoderTiny when configured (a random tiny one
    here), and FLUX's packed latents (2x2 patches in a sequence) through the projection."""
    import torch
    from diffusers import AutoencoderTiny

    from speech2image.engines.diffusers_sd import GenerationSpec
    from speech2image.engines.previews import Previewer

    blocks = {"encoder_block_out_channels": (8,) * 4, "decoder_block_out_channels": (8,) * 4}
    AutoencoderTiny(
        **blocks, num_encoder_blocks=(1,) * 4, num_decoder_blocks=(1,) * 4
    ).save_pretrained(tmp_path / "taesd")

    def spec(family: str) -> GenerationSpec:
        return GenerationSpec(["a"], [None], [1], 64, 64, 2, 1.0, "euler", family=family)

    tiny = Previewer(1, 0.1, {"sd1": str(tmp_path / "taesd")})
    pngs, method = tiny.frames(None, spec("sd1"), torch.randn(2, 4, 8, 8), [1])
    assert method == "tiny_vae" and Image.open(io.BytesIO(pngs[0])).size == (64, 64)
    pngs, method = Previewer(1, 0.1, {}).frames(None, spec("flux"), torch.randn(1, 16, 64), [0])
    assert method == "projection" and Image.open(io.BytesIO(pngs[0])).size == (64, 64)
