"""Image generation end to end with tiny real SD pipelines: files, rows, metadata, validation."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from speech2image.engines.families import FAMILIES


def generate(client, **body):  # type: ignore[no-untyped-def]
    return client.post("/generate-image", json=body)


def fetch(client, url: str, **kwargs):  # type: ignore[no-untyped-def]
    """GET and close (file responses hold the file open until closed)."""
    with client.get(url, **kwargs) as response:
        response.get_data()
        return response


def pixels(client, url: str) -> np.ndarray:  # type: ignore[no-untyped-def]
    response = fetch(client, url)
    assert response.status_code == 200
    return np.asarray(Image.open(io.BytesIO(response.data)).convert("RGB"), dtype=np.int16)


def image_files(app) -> list[str]:  # type: ignore[no-untyped-def]
    folder = Path(app.config["S2I_SETTINGS"].image_dir)
    return sorted(p.name for p in folder.iterdir() if p.suffix in (".png", ".tmp"))


def loaded_models(app) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {r["name"]: r["device"] for r in app.extensions["model_loader"].status() if r["loaded"]}


def test_generation_end_to_end(make_app) -> None:
    app = make_app()
    client = app.test_client()
    response = generate(client, prompt="an oil painting of a dragon over a castle", seed=42)
    assert response.status_code == 200, response.json
    body = response.json
    (image,) = body["images"]
    assert image["seed"] == 42 and image["width"] == 64 and image["height"] == 64
    assert image["url"] == f"/images/{image['filename']}"
    assert image["filename"] == f"{image['id']}.png"
    assert body["model"] == "tiny-art"
    assert body["model_choice"]["style"] == "artistic"
    assert "oil painting" in body["model_choice"]["reason"]
    assert body["truncated"] is False
    assert set(body["timings"]) == {"queue", "wait", "load", "inference", "save", "total"}
    assert body["timings"]["load"] > 0  # first use loaded the model

    # The file, the row and the PNG metadata agree.
    assert image_files(app) == [image["filename"]]
    listing = client.get("/images").json
    (row,) = listing["images"]
    assert row["id"] == image["id"] and row["seed"] == 42 and row["model"] == "tiny-art"
    assert row["prompt"] == "an oil painting of a dragon over a castle"
    assert row["steps"] == 4 and row["scheduler"] == "euler_a" and row["guidance_scale"] == 7.0
    assert row["bytes"] > 0 and row["model_reason"] == body["model_choice"]["reason"]
    png = Image.open(io.BytesIO(fetch(client, image["url"]).data))
    meta = json.loads(png.text["parameters"])
    assert meta == row["parameters"]
    assert meta["seed"] == 42 and meta["model"] == "tiny-art" and meta["steps"] == 4
    assert png.size == (64, 64)


def test_same_seed_same_pixels_and_seeds_are_returned(client) -> None:
    once = generate(client, prompt="a watercolor fox", seed=7).json
    twice = generate(client, prompt="a watercolor fox", seed=7).json
    assert np.array_equal(
        pixels(client, once["images"][0]["url"]), pixels(client, twice["images"][0]["url"])
    )
    pair = generate(client, prompt="a watercolor fox", seed=7, num_images=2).json
    assert [i["seed"] for i in pair["images"]] == [7, 8]
    a, b = (pixels(client, i["url"]) for i in pair["images"])
    # In one batch the same seed gives the same image, up to floating-point noise.
    assert np.abs(a - pixels(client, once["images"][0]["url"])).mean() < 1
    assert np.abs(a - b).mean() > 10
    random_seed = generate(client, prompt="a watercolor fox").json["images"][0]["seed"]
    assert 0 <= random_seed < 2**32


def test_explicit_model_wins_and_photo_prompts_choose_photographic(client) -> None:
    explicit = generate(client, prompt="an oil painting", model="tiny-photo").json
    assert explicit["model"] == "tiny-photo" and explicit["model_choice"]["explicit"] is True
    photo = generate(client, prompt="a DSLR photo of a street at golden hour, 35mm").json
    assert photo["model"] == "tiny-photo" and photo["model_choice"]["style"] == "photographic"


@pytest.mark.parametrize("scheduler", FAMILIES["sd1"].schedulers)
def test_every_scheduler_generates(client, scheduler) -> None:
    response = generate(client, prompt="a castle", scheduler=scheduler, steps=3, seed=1)
    assert response.status_code == 200, response.json
    assert pixels(client, response.json["images"][0]["url"]).std() > 0


def test_long_prompt_is_truncated_and_says_so(client) -> None:
    prompt = "a very detailed fantasy landscape " * 20  # far more than 77 tokens
    response = generate(client, prompt=prompt, seed=3)
    assert response.status_code == 200
    assert response.json["truncated"] is True


@pytest.mark.parametrize(
    ("body", "field", "needle"),
    [
        ({}, "prompt", "Field required"),
        ({"prompt": "   "}, "prompt", "must not be empty"),
        ({"prompt": "x" * 1001}, "prompt", "limit is 1000"),
        ({"prompt": "x", "negative_prompt": "y" * 1001}, "negative_prompt", "limit is 1000"),
        ({"prompt": "x", "width": 100}, "width", "multiple of 8 from 64 to 1024, got 100"),
        ({"prompt": "x", "height": 2048}, "height", "got 2048"),
        ({"prompt": "x", "width": 32}, "width", "got 32"),
        ({"prompt": "x", "steps": 0}, "steps", "from 1 to 60"),
        ({"prompt": "x", "steps": 500}, "steps", "from 1 to 60"),
        ({"prompt": "x", "steps": "ten"}, "steps", "valid integer"),
        ({"prompt": "x", "guidance_scale": -1}, "guidance_scale", "from 0 to 30"),
        ({"prompt": "x", "num_images": 9}, "num_images", "from 1 to 4"),
        ({"prompt": "x", "seed": -1}, "seed", "from 0 to 4294967295"),
        ({"prompt": "x", "seed": 2**40}, "seed", "from 0 to 4294967295"),
        ({"prompt": "x", "scheduler": "turbo"}, "scheduler", "must be one of euler_a"),
        ({"prompt": "x", "model": "midjourney"}, "model", "must be one of auto, "),
        ({"prompt": "x", "colour": "red"}, "colour", "Extra inputs are not permitted"),
        ({"prompt": 5}, "prompt", "valid string"),
    ],
)
def test_validation_errors_name_the_field_before_any_model_work(
    make_app, body, field, needle
) -> None:
    app = make_app()
    response = generate(app.test_client(), **body)
    assert response.status_code == 400, response.json
    error = response.json["error"]
    assert error["code"] == "invalid_request"
    assert error["details"]["field"] == field
    assert needle in error["message"]
    assert loaded_models(app) == {}
    assert image_files(app) == []


def test_body_must_be_json(client) -> None:
    response = client.post("/generate-image", data="prompt=cat")
    assert response.status_code == 400
    assert "JSON" in response.json["error"]["message"]


def test_unavailable_model_is_503_while_others_serve(make_app, tiny_models) -> None:
    app = make_app(
        image_models={
            "tiny-art": {"source": str(tiny_models["tiny-art"])},
            "tiny-photo": {"source": str(tiny_models["tiny-photo"])},
            "missing": {"source": "/nonexistent/checkpoint"},
        }
    )
    client = app.test_client()
    missing = generate(client, prompt="a cat", model="missing")
    assert missing.status_code == 503
    message = missing.json["error"]["message"]
    assert "'missing'" in message and "S2I_IMAGE_MODELS" in message
    hub = generate(client, prompt="a cat", model="dreamshaper")
    assert hub.status_code == 503
    assert "Lykon/dreamshaper-8" in hub.json["error"]["message"]
    assert "S2I_IMAGE_ALLOW_DOWNLOAD" in hub.json["error"]["message"]
    assert generate(client, prompt="a cat", model="tiny-art").status_code == 200
    assert image_files(app) and len(image_files(app)) == 1


def test_failed_save_leaves_neither_file_nor_row(make_app, monkeypatch) -> None:
    app = make_app()
    client = app.test_client()
    import speech2image.imagestore.local as storage_module

    real_replace = storage_module.os.replace
    calls = {"n": 0}

    def flaky_replace(src, dst):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:  # the first image is already in place: it must be removed too
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(storage_module.os, "replace", flaky_replace)
    response = generate(client, prompt="a castle", num_images=3, seed=5)
    assert response.status_code == 500
    assert image_files(app) == []
    assert client.get("/images").json["total"] == 0
    monkeypatch.setattr(storage_module.os, "replace", real_replace)
    assert generate(client, prompt="a castle", seed=5).status_code == 200


def test_failed_generation_leaves_nothing(make_app, monkeypatch) -> None:
    app = make_app()

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("UNet exploded")

    monkeypatch.setattr("speech2image.image_service.generate", broken)
    response = generate(app.test_client(), prompt="a castle")
    assert response.status_code == 500
    assert "UNet" not in response.get_data(as_text=True)
    assert image_files(app) == []
    assert app.extensions["images"].state() == {"running": 0, "waiting": 0}


def test_status_shows_generation_images_and_models(make_app) -> None:
    app = make_app()
    client = app.test_client()
    generate(client, prompt="a castle", num_images=2)
    body = client.get("/status").json
    assert body["generation"] == {"running": 0, "waiting": 0}
    assert body["images"]["count"] == 2 and body["images"]["bytes"] > 0
    art = next(m for m in body["models"] if m["name"] == "sd:tiny-art")
    assert art["loaded"] and art["device"] == "cpu" and art["kind"] == "diffusers"
    assert 1_000_000 < art["bytes"] < 50_000_000  # measured parameter bytes of the tiny model


def test_single_file_checkpoint_loads_offline_with_local_config(
    make_app, tiny_models, tmp_path
) -> None:
    from .ldm_checkpoint import convert

    checkpoint = tmp_path / "tiny-art.safetensors"
    convert(tiny_models["tiny-art"], checkpoint)
    models = {name: {"source": str(path)} for name, path in tiny_models.items()}
    models["single"] = {"source": str(checkpoint), "config": str(tiny_models["tiny-art"])}
    app = make_app(image_models=models)
    client = app.test_client()
    from_file = generate(client, prompt="a castle", model="single", seed=21, steps=3)
    assert from_file.status_code == 200, from_file.json
    from_folder = generate(client, prompt="a castle", model="tiny-art", seed=21, steps=3)
    assert np.array_equal(
        pixels(client, from_file.json["images"][0]["url"]),
        pixels(client, from_folder.json["images"][0]["url"]),
    )
    no_config = make_app(image_models={**models, "single": {"source": str(checkpoint)}})
    refused = generate(no_config.test_client(), prompt="a castle", model="single")
    assert refused.status_code == 503
    assert "needs `config`" in refused.json["error"]["message"]


def test_out_of_memory_during_generation_frees_and_retries_then_503(make_app, monkeypatch) -> None:
    from speech2image.engines import diffusers_sd
    from speech2image.model_loader import DeviceOutOfMemory

    app = make_app()
    client = app.test_client()
    assert generate(client, prompt="x", model="tiny-photo", steps=1).status_code == 200
    failures = {"left": 1}

    def flaky(pipe, spec, **kwargs):  # type: ignore[no-untyped-def]
        if failures["left"]:
            failures["left"] -= 1
            raise DeviceOutOfMemory("CUDA out of memory. Tried to allocate 2.00 GiB")
        return diffusers_sd.generate(pipe, spec, **kwargs)

    monkeypatch.setattr("speech2image.image_service.generate", flaky)
    recovered = generate(client, prompt="x", model="tiny-art", steps=1)
    assert recovered.status_code == 200
    assert "sd:tiny-photo" not in loaded_models(app)  # freed to make room for the retry
    failures["left"] = 2
    refused = generate(client, prompt="x", model="tiny-art", steps=1)
    assert refused.status_code == 503
    assert refused.json["error"]["code"] == "model_unavailable"
    assert int(refused.headers["Retry-After"]) > 0
    assert image_files(app) and len(image_files(app)) == 2  # nothing written for the failure
    assert generate(client, prompt="x", model="tiny-art", steps=1).status_code == 200
