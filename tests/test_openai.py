"""The /v1 OpenAI-compatible surface, driven by the official `openai` package against a live app."""

from __future__ import annotations

import base64
import io
import re
import threading
import urllib.request
from pathlib import Path

import openai
import pytest
from PIL import Image

from .conftest import _espeak

COMFY_SENTENCE = "I make my pictures with ComfyUI every day."


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def sdk(base_url: str, key: str = "unused") -> openai.OpenAI:
    # No retries: a refusal must surface at once as the SDK's exception.
    return openai.OpenAI(api_key=key, base_url=base_url + "/v1", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def comfy_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _espeak(tmp_path_factory.mktemp("comfy") / "comfy.wav", COMFY_SENTENCE)


def test_transcription_json_verbose_and_text(shared_app, live_server, speech) -> None:
    client = sdk(live_server(shared_app))
    with open(speech["english"], "rb") as fh:
        plain = client.audio.transcriptions.create(model="whisper-1", file=fh)
    assert {"fox", "lazy", "forest", "sunrise"} <= words(plain.text)

    with open(speech["english"], "rb") as fh:
        verbose = client.audio.transcriptions.create(
            model="base",  # the configured name works as well as the alias
            file=fh,
            language="en",
            response_format="verbose_json",
            timestamp_granularities=["word", "segment"],
        )
    assert verbose.language == "en" and 3.0 < verbose.duration < 6.0
    assert verbose.segments and verbose.segments[0].start >= 0
    assert {"fox", "forest"} <= {w.word.strip(" .,").lower() for w in verbose.words}

    with open(speech["english"], "rb") as fh:
        text = client.audio.transcriptions.create(
            model="whisper-1", file=fh, response_format="text"
        )
    assert isinstance(text, str) and "forest" in words(text)


# The SDK marks translations deprecated (OpenAI steers to transcription models); it still works.
@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")
def test_translation_of_german_speech(shared_app, live_server, speech) -> None:
    client = sdk(live_server(shared_app))
    with open(speech["german"], "rb") as fh:
        result = client.audio.translations.create(
            model="whisper-1", file=fh, response_format="verbose_json"
        )
    heard = words(result.text)
    assert {"i", "have", "small"} <= heard, result.text  # espeak's German: "a small ... and"
    assert not {"ich", "habe", "einen"} & heard
    assert (result.task, result.language) == ("translate", "de")


def test_prompt_spells_a_proper_noun(shared_app, live_server, comfy_wav) -> None:
    native = shared_app.test_client()

    def transcribe(**form: str) -> str:
        with open(comfy_wav, "rb") as fh:
            response = native.post(
                "/transcribe-audio",
                data={"audio": (fh, "comfy.wav"), **form},
                content_type="multipart/form-data",
            )
        assert response.status_code == 200, response.json
        return response.json["text"]

    assert "ComfyUI" not in transcribe()  # the model alone hears "come for you"
    assert "ComfyUI" in transcribe(prompt="ComfyUI")
    # The same hint through the SDK's `prompt`.
    client = sdk(live_server(shared_app))
    with open(comfy_wav, "rb") as fh:
        result = client.audio.transcriptions.create(model="whisper-1", file=fh, prompt="ComfyUI")
    assert "ComfyUI" in result.text


def test_image_generation_url_and_b64_json_belong_to_the_caller(make_app, live_server) -> None:
    app = make_app(api_keys=["key-a", "key-b"])
    base = live_server(app)
    client = sdk(base, "key-a")
    extras = {"steps": 2, "seed": 7, "negative_prompt": "blurry"}
    by_url = client.images.generate(
        model="dall-e-2",
        prompt="an oil painting of a lighthouse",
        n=2,
        size="64x64",
        response_format="url",
        user="someone",
        extra_body=extras,
    )
    assert len(by_url.data) == 2 and by_url.created > 0
    request = urllib.request.Request(by_url.data[0].url, headers={"Authorization": "Bearer key-a"})
    with urllib.request.urlopen(request) as answer:
        fetched = answer.read()
    assert Image.open(io.BytesIO(fetched)).size == (64, 64)

    by_b64 = client.images.generate(
        model="tiny-photo",  # a configured model by name
        prompt="a photo of a lighthouse",
        size="64x64",
        response_format="b64_json",
        extra_body=extras,
    )
    (item,) = by_b64.data
    assert item.url is None
    assert Image.open(io.BytesIO(base64.b64decode(item.b64_json))).size == (64, 64)

    # The history records all three for key-a, and nothing for key-b.
    native = app.test_client()
    mine = native.get("/images", headers={"Authorization": "Bearer key-a"}).json
    theirs = native.get("/images", headers={"Authorization": "Bearer key-b"}).json
    assert mine["total"] == 3 and theirs["total"] == 0
    assert {i["model"] for i in mine["images"]} == {"tiny-art", "tiny-photo"}


def test_model_listing(shared_app, live_server) -> None:
    client = sdk(live_server(shared_app))
    ids = {model.id for model in client.models.list()}
    assert {"whisper-1", "base", "auto", "dall-e-2", "dall-e-3"} <= ids
    assert {"tiny-art", "tiny-photo", "tiny-extra"} <= ids
    assert client.models.retrieve("tiny-art").owned_by == "speech2image"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-nothing")


def test_wrong_key_is_the_sdk_authentication_error(make_app, live_server) -> None:
    base = live_server(make_app(api_keys=["right"]))
    with pytest.raises(openai.AuthenticationError) as caught:
        sdk(base, "wrong").models.list()
    assert caught.value.status_code == 401
    assert caught.value.body["type"] == "authentication_error"
    assert [m.id for m in sdk(base, "right").models.list()]


def test_validation_errors_are_bad_request_naming_the_param(shared_app, live_server) -> None:
    client = sdk(live_server(shared_app))
    cases = [
        ({"size": "13x13"}, "size"),
        ({"size": "huge"}, "size"),
        ({"n": 99}, "n"),
        ({"response_format": "gif"}, "response_format"),
        ({"model": "no-such-model"}, "model"),
    ]
    for fields, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.images.generate(prompt="a cat", **fields)
        assert caught.value.body["param"] == param, caught.value.body
        assert caught.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a cat", extra_body={"steps": 10_000})
    assert caught.value.body["param"] == "steps"
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(model="gpt-4o-transcribe", file=b"RIFF")
    assert caught.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as caught:
        client.audio.transcriptions.create(model="whisper-1", file=b"RIFF", language="xx")
    assert caught.value.body["param"] == "language"


def test_rate_limit_is_the_sdk_rate_limit_error(make_app, live_server) -> None:
    client = sdk(live_server(make_app(ratelimit_generate="1/minute")))
    with pytest.raises(openai.BadRequestError):  # refused as invalid: not counted
        client.images.generate(prompt="a cat", size="1x1")
    small = {"size": "64x64", "extra_body": {"steps": 1}}
    assert client.images.generate(prompt="a cat", **small).data
    with pytest.raises(openai.RateLimitError) as caught:
        client.images.generate(prompt="a cat", **small)
    assert int(caught.value.response.headers["Retry-After"]) >= 1
    assert caught.value.body["type"] == "rate_limit_error"


def test_error_shape_on_v1_routes(client) -> None:
    response = client.post("/v1/audio/transcriptions", data={"model": "whisper-1"})
    assert response.status_code == 400
    error = response.json["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        "file",
        "invalid_request",
    )
    assert "`file`" in error["message"]
    response = client.get("/v1/models/nothing-here")
    assert response.status_code == 404
    assert response.json["error"]["type"] == "not_found_error"
    response = client.get("/v1/images/generations")  # routing errors too, under /v1
    assert response.status_code == 405 and "POST" in response.headers["Allow"]
    assert set(response.json["error"]) == {"message", "type", "param", "code"}
    assert client.get("/v1/no-such-route").json["error"]["type"] == "not_found_error"
    assert "status" in client.get("/no-such-route").json["error"]  # the native shape elsewhere


def test_prompt_and_temperature_are_checked_before_any_work(client, speech) -> None:
    for form, field in (({"prompt": "x" * 1001}, "prompt"), ({"temperature": "2"}, "temperature")):
        with open(speech["english"], "rb") as fh:
            response = client.post(
                "/transcribe-audio",
                data={"audio": (fh, "a.wav"), **form},
                content_type="multipart/form-data",
            )
        assert response.status_code == 400
        assert response.json["error"]["details"]["field"] == field


def test_spec_describes_the_v1_routes_with_openai_errors(client) -> None:
    spec = client.get("/openapi.json").json
    for path, method in (
        ("/v1/audio/transcriptions", "post"),
        ("/v1/audio/translations", "post"),
        ("/v1/images/generations", "post"),
        ("/v1/models", "get"),
    ):
        responses = spec["paths"][path][method]["responses"]
        error = responses["429"]["content"]["application/json"]["schema"]["$ref"]
        assert error.endswith("/OpenAIErrorBody"), (path, error)
    form = spec["paths"]["/v1/audio/transcriptions"]["post"]["requestBody"]["content"]
    ref = form["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[-1]
    assert {"file", "model", "prompt", "timestamp_granularities[]"} <= set(
        spec["components"]["schemas"][ref]["properties"]
    )


def test_concurrent_generations_share_one_batch(make_app, live_server) -> None:
    app = make_app(batch_max_wait_ms=3000, job_workers=1)  # one worker: the other cannot take job 2
    client = sdk(live_server(app))
    results: list[object] = []

    def ask(prompt: str) -> None:
        results.append(
            client.images.generate(
                model="tiny-art", prompt=prompt, size="64x64", extra_body={"steps": 1}
            )
        )

    threads = [threading.Thread(target=ask, args=(p,)) for p in ("a red boat", "a blue kite")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2
    metrics = app.test_client().get("/metrics").get_data(as_text=True)
    assert 's2i_batch_jobs_count{kind="generate"} 1.0' in metrics
    assert 's2i_batch_jobs_sum{kind="generate"} 2.0' in metrics


def test_loras_travel_as_an_extension_field(make_app, live_server, lora_dir) -> None:
    app = make_app(lora_dir=lora_dir)
    client = sdk(live_server(app))
    common = {"model": "tiny-art", "prompt": "a lighthouse", "size": "64x64"}
    inked = client.images.generate(
        **common,
        response_format="b64_json",
        extra_body={"steps": 2, "seed": 4, "loras": [{"name": "sd-ink", "weight": 0.7}]},
    )
    plain = client.images.generate(
        **common, response_format="b64_json", extra_body={"steps": 2, "seed": 4}
    )
    assert inked.data[0].b64_json != plain.data[0].b64_json
    rows = app.test_client().get("/images").json["images"]
    assert [r["parameters"]["loras"] for r in rows] == [[], [{"name": "sd-ink", "weight": 0.7}]]
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(**common, extra_body={"loras": [{"name": "xl-ink"}]})
    assert caught.value.body["param"] == "loras.0.name"
    assert "Stable Diffusion XL" in caught.value.body["message"]
