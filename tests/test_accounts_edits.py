"""Issue 17 over issue 15: edits and conversation turns are moderated, counted and scoped."""

from __future__ import annotations

import re

from click.testing import CliRunner

from speech2image.cli import main

from .test_jobs import wait_state

ONE_STEP = {"steps": "1", "width": "64", "height": "64"}


def _bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def _turn(client, cid: str, headers=None, **data):  # type: ignore[no-untyped-def]
    return client.post(
        f"/conversations/{cid}/turns",
        data=data,
        content_type="multipart/form-data",
        headers=headers,
    )


def test_edits_and_composed_prompts_are_moderated_and_counted(make_app) -> None:
    app = make_app(moderation_terms=["zorblax"], quota_default={"images:day": 2})
    client = app.test_client()
    made = client.post("/generate-image", json={"prompt": "a red barn", "steps": 1, "seed": 3})
    assert made.status_code == 200, made.json
    parent = made.json["images"][0]["id"]

    # A typed edit prompt is checked before any work.
    blocked = client.post(
        "/edit-image",
        data={"image_id": parent, "prompt": "a zorblax barn", **ONE_STEP},
        content_type="multipart/form-data",
    )
    assert blocked.status_code == 400, blocked.json
    assert blocked.json["error"]["code"] == "moderation_blocked"

    # In a conversation, the prompt composed from "add a zorblax" is what is checked.
    cid = client.post("/conversations").json["id"]
    first = _turn(client, cid, text="a quiet harbour at dawn", steps="1")
    assert first.status_code == 200, first.json
    added = _turn(client, cid, text="add a zorblax on the left", steps="1")
    assert added.status_code == 400, added.json
    assert added.json["error"]["code"] == "moderation_blocked"
    thread = client.get(f"/conversations/{cid}").json
    assert len(thread["turns"]) == 1  # the refused turn left nothing behind

    # Edits count against the same quotas as generations: 2 images a day in all.
    edited = client.post(
        "/edit-image",
        data={"image_id": parent, "prompt": "a red barn at night", **ONE_STEP},
        content_type="multipart/form-data",
    )
    assert edited.status_code == 429, edited.json
    assert edited.json["error"]["code"] == "quota_exceeded"
    usage = client.get("/usage").json["usage"]
    assert usage["images"] == 2  # the generation and the first turn's picture
    assert client.get("/jobs").json["total"] == 2  # refused requests made no job


def test_edit_routes_need_the_edit_scope(make_app, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("S2I_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("S2I_IMAGE_DIR", str(tmp_path / "images"))
    made = CliRunner().invoke(main, ["keys", "create", "painter", "--scope", "generate"])
    assert made.exit_code == 0, made.output
    painter = re.search(r"secret: (\S+)", made.output).group(1)
    app = make_app(auth_required=True)
    client = app.test_client()
    image = client.post(
        "/generate-image", json={"prompt": "a boat", "steps": 1}, headers=_bearer(painter)
    )
    assert image.status_code == 200, image.json
    refused = client.post(
        "/edit-image",
        data={"image_id": image.json["images"][0]["id"], "prompt": "a boat at night"},
        content_type="multipart/form-data",
        headers=_bearer(painter),
    )
    assert refused.status_code == 403 and "edit" in refused.json["error"]["message"]
    draft = client.post("/drafts", json={"prompt": "a boat"}, headers=_bearer(painter))
    assert draft.status_code == 202, draft.json  # drafts need only `generate`
    ended = wait_state(client, draft.json["id"], {"succeeded"}, headers=_bearer(painter))
    assert ended["kind"] == "draft"  # nothing of this app runs on after the test
