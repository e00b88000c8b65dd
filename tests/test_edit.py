"""Editing: img2img and inpainting from the resident pipeline, by history id or upload."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from speech2image.app import create_app

from .conftest import _test_settings
from .test_images import fetch, pixels
from .test_jobs import wait_state


@pytest.fixture(scope="module")
def edit_app(tmp_path_factory, model_cache, tiny_models):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("edit-app")
    settings = _test_settings(
        root, model_cache, tiny_models, default_steps=2, max_image_pixels=128 * 128
    )
    return create_app(settings)


def png(image: Image.Image, fmt: str = "PNG") -> io.BytesIO:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    buffer.seek(0)
    return buffer


def post_edit(client, files=None, **fields):  # type: ignore[no-untyped-def]
    data = {k: str(v) for k, v in fields.items()}
    for name, (content, filename) in (files or {}).items():
        data[name] = (content, filename)
    return client.post("/edit-image", data=data, content_type="multipart/form-data")


def test_edit_by_id_and_upload_with_mask_lineage_and_async(edit_app) -> None:
    client = edit_app.test_client()
    first = client.post(
        "/generate-image", json={"prompt": "a watercolor house", "seed": 3, "model": "tiny-art"}
    )
    assert first.status_code == 200, first.json
    parent = first.json["images"][0]

    # From the history, by id: the result records its parent; the same seed repeats.
    edited = post_edit(client, image_id=parent["id"], prompt="a house at night", seed=5)
    assert edited.status_code == 200, edited.json
    body = edited.json
    assert body["parent_id"] == parent["id"]
    assert body["edit"] == {
        "mode": "img2img",
        "strength": 0.75,
        "mask_blur": 0,
        "parent_id": parent["id"],
    }
    child = body["images"][0]
    assert (child["width"], child["height"]) == (64, 64)
    again = post_edit(client, image_id=parent["id"], prompt="a house at night", seed=5)
    assert (pixels(client, child["url"]) == pixels(client, again.json["images"][0]["url"])).all()
    weaker = post_edit(
        client, image_id=parent["id"], prompt="a house at night", seed=5, strength=0.3
    )
    assert weaker.status_code == 200
    source = pixels(client, parent["url"])
    # A weaker edit stays nearer the source than a stronger one with the same seed.
    near = np.abs(pixels(client, weaker.json["images"][0]["url"]) - source).mean()
    far = np.abs(pixels(client, child["url"]) - source).mean()
    assert near < far

    lineage = client.get(f"/lineage/{child['id']}").json
    assert [a["id"] for a in lineage["ancestors"]] == [parent["id"]]
    assert lineage["image"]["parent_id"] == parent["id"]
    children = client.get(f"/lineage/{parent['id']}").json["children"]
    assert child["id"] in [c["id"] for c in children]
    listed = {i["id"]: i for i in client.get("/images?per_page=100").json["images"]}
    assert listed[child["id"]]["parent_id"] == parent["id"]

    # An upload with a mask: only the white half may change; the black half comes back as sent.
    original = Image.open(io.BytesIO(fetch(client, parent["url"]).data)).convert("RGB")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    inpainted = post_edit(
        client,
        files={"image": (png(original, "WEBP"), "a.webp"), "mask": (png(mask), "m.png")},
        prompt="a red door",
        seed=1,
        strength=1.0,
        mask_blur=2,
    )
    assert inpainted.status_code == 200, inpainted.json
    assert inpainted.json["parent_id"] is None
    assert inpainted.json["edit"]["mode"] == "inpaint"
    out = pixels(client, inpainted.json["images"][0]["url"])
    sent = np.asarray(Image.open(png(original, "WEBP")).convert("RGB"), dtype=np.int16)
    assert (out[:, 40:] == sent[:, 40:]).all()  # beyond the mask and its blur: unchanged
    assert (out[:, :24] != sent[:, :24]).any()

    # Async, with progress: a job whose result names the parent.
    accepted = post_edit(client, image_id=parent["id"], prompt="snow", seed=2, **{"async": "true"})
    assert accepted.status_code == 202, accepted.json
    done = wait_state(client, accepted.json["id"], {"succeeded", "failed"})
    assert done["state"] == "succeeded", done
    assert done["result"]["parent_id"] == parent["id"]


def test_edit_refuses_bad_input_clearly(edit_app) -> None:
    client = edit_app.test_client()

    def small() -> io.BytesIO:
        return png(Image.new("RGB", (64, 64), "blue"))

    def refused(status: int, field: str, files=None, **fields):  # type: ignore[no-untyped-def]
        response = post_edit(client, files=files, **fields)
        assert response.status_code == status, response.json
        assert field in str(response.json), response.json
        return response

    refused(400, "image", prompt="x")  # no source
    refused(404, "image", image_id="0" * 32, prompt="x")
    refused(415, "image", files={"image": (io.BytesIO(b"GIF89a not really"), "a.gif")}, prompt="x")
    gif = png(Image.new("RGB", (64, 64)), "GIF")
    refused(415, "image", files={"image": (gif, "a.gif")}, prompt="x")
    truncated = png(Image.new("RGB", (64, 64), "red")).getvalue()[:80]
    refused(422, "image", files={"image": (io.BytesIO(truncated), "a.png")}, prompt="x")
    big = png(Image.new("RGB", (256, 256)))  # over S2I_MAX_IMAGE_PIXELS (128x128 here)
    refused(422, "pixels", files={"image": (big, "a.png")}, prompt="x")
    refused(400, "mask", files={"image": (small(), "a.png"),
            "mask": (png(Image.new("L", (32, 32))), "m.png")}, prompt="x")  # fmt: skip
    refused(400, "strength", files={"image": (small(), "a.png")}, prompt="x", strength=0)
    refused(400, "prompt", files={"image": (small(), "a.png")})
    uploads = edit_app.config["S2I_SETTINGS"].upload_dir
    assert not uploads.exists() or list(uploads.iterdir()) == []  # nothing left behind


def test_compatible_edits_share_a_batch_key(edit_app) -> None:
    from speech2image.editing import prepare_edit

    images = edit_app.extensions["images"]
    source = Image.new("RGB", (64, 64), "green")
    mask = Image.new("L", (64, 64), 255)

    def key(prompt: str, seed: int, strength: float, with_mask: bool = False):  # type: ignore[no-untyped-def]
        fields = {"prompt": prompt, "seed": seed, "model": "tiny-art"}
        work, _ = prepare_edit(
            images, fields, source, mask if with_mask else None, strength=strength
        )
        return edit_app.extensions["job_kinds"]["edit"].schedule(work).batch_key

    # Prompts and seeds may differ within a batch; strength and the kind of edit may not.
    assert key("a boat", 1, 0.5) == key("a kite", 2, 0.5)
    assert key("a boat", 1, 0.5) != key("a boat", 1, 0.6)
    assert key("a boat", 1, 0.5) != key("a boat", 1, 0.5, with_mask=True)


def test_a_family_without_an_edit_kind_is_a_clear_400(edit_app, monkeypatch) -> None:
    import dataclasses

    from speech2image.engines.families import FAMILIES

    monkeypatch.setitem(FAMILIES, "sd1", dataclasses.replace(FAMILIES["sd1"], edits=("img2img",)))
    client = edit_app.test_client()
    image = png(Image.new("RGB", (64, 64), "blue"))
    mask = png(Image.new("L", (64, 64), 255))
    response = post_edit(
        client, files={"image": (image, "a.png"), "mask": (mask, "m.png")}, prompt="a boat"
    )
    assert response.status_code == 400, response.json
    assert (
        response.json["error"]["message"] == "Stable Diffusion 1.x models cannot do inpaint edits"
    )


def test_edits_report_progress_and_can_be_cancelled(make_app) -> None:
    """A running edit stops between denoising steps; a queued one never runs; neither leaves
    an image, a row or its input behind."""
    from .test_jobs import LONG

    app = make_app(job_workers=1)
    client = app.test_client()
    picture = Image.new("RGB", (64, 64), (30, 120, 200))
    fields = {"prompt": "a harbour at night", "steps": LONG, "async": "true"}
    running = post_edit(client, {"image": (png(picture), "a.png")}, strength=1, **fields).json
    # Another strength: not merged into the running batch, so it waits.
    queued = post_edit(client, {"image": (png(picture), "a.png")}, strength=0.9, **fields).json
    wait_state(client, running["id"], {"running"})
    deadline = time.monotonic() + 60
    while not (started := client.get(f"/jobs/{running['id']}").json)["progress"].get("step"):
        assert time.monotonic() < deadline, started
        time.sleep(0.05)
    assert started["kind"] == "edit" and started["progress"]["stage"] == "editing", started
    assert client.delete(f"/jobs/{queued['id']}").json["state"] == "cancelled"
    assert client.delete(f"/jobs/{running['id']}").status_code in (200, 202)
    final = wait_state(client, running["id"], {"cancelled", "succeeded"})
    assert final["state"] == "cancelled" and final["progress"]["step"] < LONG
    assert client.get("/images").json["total"] == 0
    uploads = app.config["S2I_SETTINGS"].upload_dir
    assert not uploads.exists() or list(uploads.iterdir()) == []
