"""Moderation on by default (issue 17): prompts before any work, images after generation."""

from __future__ import annotations

import pytest

from speech2image.devtools.tiny_safety import build_tiny_safety_checker
from speech2image.moderation import Moderation

ONE_STEP = {"steps": 1, "width": 64, "height": 64}


@pytest.fixture(scope="module")
def safety_checker(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A tiny random-weight diffusers safety checker, built once."""
    return build_tiny_safety_checker(tmp_path_factory.mktemp("safety"), seed=1)


def test_prompts_are_checked_before_any_work(make_app) -> None:
    app = make_app(moderation_terms=["zorblax"])
    client = app.test_client()
    moderation: Moderation = app.extensions["moderation"]
    # The word list with the usual evasions, the operator's own terms, on word boundaries.
    for text in ("a F U C K I N G castle", "sh1t on a plate", "a Zorblax monster"):
        assert moderation.prompt_problem(text), text
    for text in ("scunthorpe town hall", "a bass guitar", "a shitake mushroom", "a peacock"):
        assert not moderation.prompt_problem(text), text

    blocked = client.post("/generate-image", json={"prompt": "a zorblax at dawn", **ONE_STEP})
    assert blocked.status_code == 400
    assert blocked.json["error"]["code"] == "moderation_blocked"
    assert blocked.json["error"]["details"]["field"] == "prompt"
    on_v1 = client.post("/v1/images/generations", json={"prompt": "fuck", "size": "64x64"})
    assert on_v1.status_code == 400 and on_v1.json["error"]["code"] == "moderation_blocked"
    assert client.get("/jobs").json["total"] == 0  # no job was made
    metrics = client.get("/metrics").text
    assert 's2i_moderation_blocked_total{check="prompt"} 2.0' in metrics

    # Operators can switch it off.
    off = make_app(moderation_prompts=False, moderation_terms=["zorblax"]).test_client()
    assert off.post("/generate-image", json={"prompt": "a zorblax", **ONE_STEP}).status_code == 200


def test_flagged_images_are_never_stored(make_app, safety_checker) -> None:
    strict = make_app(moderation_safety_checker=safety_checker, moderation_image_adjustment=4.0)
    client = strict.test_client()
    answer = client.post(
        "/generate-image", json={"prompt": "a harbour", "num_images": 2, **ONE_STEP}
    )
    assert answer.status_code == 200, answer.json
    assert answer.json["images"] == [] and answer.json["filtered"] == 2
    assert client.get("/images").json["total"] == 0
    assert 's2i_moderation_blocked_total{check="image"} 2.0' in client.get("/metrics").text

    # At the checker's own thresholds its random weights flag nothing: the images are kept.
    relaxed = make_app(moderation_safety_checker=safety_checker).test_client()
    kept = relaxed.post("/generate-image", json={"prompt": "a harbour", **ONE_STEP}).json
    assert len(kept["images"]) == 1 and kept["filtered"] == 0


def test_a_spoken_prompt_is_checked_once_heard(make_app, speech) -> None:
    app = make_app(moderation_terms=["red fox"], whisper_model="tiny.en")
    client = app.test_client()
    with open(speech["english"], "rb") as fh:  # "A red fox jumps over the lazy dog ..."
        blocked = client.post(
            "/speech-to-image",
            data={"audio": (fh, "clip.wav"), "steps": "1"},
            content_type="multipart/form-data",
        )
    assert blocked.status_code == 400, blocked.json
    error = blocked.json["error"]
    assert error["code"] == "moderation_blocked" and error["details"]["field"] == "spoken prompt"
    assert client.get("/images").json["total"] == 0  # no image, no transcript row
