"""Today's OpenAI images API through the pinned SDK: gpt-image fields, edits with a mask,
variations, output formats."""

from __future__ import annotations

import base64
import io

import numpy as np
import openai
import pytest
from PIL import Image

from speech2image.app import create_app

from .conftest import _test_settings
from .test_openai import sdk


@pytest.fixture(scope="module")
def gpt_app(tmp_path_factory, model_cache, tiny_models):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("gpt-image-app")
    return create_app(_test_settings(root, model_cache, tiny_models, default_steps=2))


def decoded(item) -> Image.Image:  # type: ignore[no-untyped-def]
    return Image.open(io.BytesIO(base64.b64decode(item.b64_json)))


def test_gpt_image_generation_edits_with_mask_and_variations(gpt_app, live_server) -> None:
    client = sdk(live_server(gpt_app))
    made = client.images.generate(
        model="gpt-image-1",
        prompt="a lighthouse on a cliff",
        size="64x64",
        quality="low",
        output_format="jpeg",
        output_compression=80,
        background="opaque",
        moderation="low",
        response_format="b64_json",
    )
    first = decoded(made.data[0])
    assert first.format == "JPEG" and first.size == (64, 64)
    assert made.usage is not None and made.usage.total_tokens > 0
    raw = made.model_dump()
    assert raw["output_format"] == "jpeg" and raw["quality"] == "low"
    with pytest.raises(openai.UnprocessableEntityError, match="transparent"):
        client.images.generate(model="gpt-image-1", prompt="x", background="transparent")

    source = Image.new("RGB", (64, 64), (200, 40, 40))
    source.paste((20, 20, 220), (32, 0, 64, 64))
    image_png = io.BytesIO()
    source.save(image_png, format="PNG")
    # OpenAI's mask: transparent pixels are edited. Here the left half.
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 64))
    mask_png = io.BytesIO()
    mask.save(mask_png, format="PNG")
    edited = client.images.edit(
        model="gpt-image-1",
        image=("in.png", image_png.getvalue(), "image/png"),
        mask=("mask.png", mask_png.getvalue(), "image/png"),
        prompt="a yellow sun",
        n=1,
        size="64x64",
        response_format="b64_json",
    )
    out = np.asarray(decoded(edited.data[0]).convert("RGB"), dtype=np.int16)
    sent = np.asarray(source, dtype=np.int16)
    assert (out[:, 32:] == sent[:, 32:]).all()  # opaque in the mask: unchanged
    assert (out[:, :32] != sent[:, :32]).any()

    # Streamed (issue 16): preview frames of the edit as it denoises, then the edited image,
    # whose unmasked half is still the source's.
    events = list(
        client.images.edit(
            image=("in.png", image_png.getvalue(), "image/png"),
            mask=("mask.png", mask_png.getvalue(), "image/png"),
            prompt="a yellow sun",
            size="64x64",
            quality="high",
            stream=True,
            partial_images=2,
        )
    )
    partial = [e for e in events if e.type == "image_edit.partial_image"]
    (completed,) = [e for e in events if e.type == "image_edit.completed"]
    assert events[-1] is completed and 1 <= len(partial) <= 2
    streamed = np.asarray(decoded(completed).convert("RGB"), dtype=np.int16)
    assert (streamed[:, 32:] == sent[:, 32:]).all()

    as_url = client.images.edit(
        image=("in.png", image_png.getvalue(), "image/png"),
        prompt="a yellow sun",
        output_format="webp",
    )
    assert as_url.data[0].url.endswith("?format=webp")

    with pytest.deprecated_call():  # the SDK marks DALL·E 2's variations deprecated
        varied = client.images.create_variation(
            image=("in.png", image_png.getvalue(), "image/png"), n=1, response_format="b64_json"
        )
    assert decoded(varied.data[0]).size == (64, 64)
    assert varied.data[0].revised_prompt == "a variation of this picture"

    with pytest.raises(openai.UnprocessableEntityError, match="alpha"):
        client.images.edit(
            image=("in.png", image_png.getvalue(), "image/png"),
            mask=("m.png", image_png.getvalue(), "image/png"),
            prompt="x",
        )


def test_native_image_in_jpeg_and_webp(gpt_app) -> None:
    client = gpt_app.test_client()
    made = client.post("/generate-image", json={"prompt": "a fox", "seed": 1}).json
    url = made["images"][0]["url"]
    for fmt, kind in (("jpeg", "JPEG"), ("webp", "WEBP")):
        response = client.get(f"{url}?format={fmt}")
        assert response.status_code == 200 and response.mimetype == f"image/{fmt}"
        assert Image.open(io.BytesIO(response.data)).format == kind
    assert client.get(f"{url}?format=gif").status_code == 400
