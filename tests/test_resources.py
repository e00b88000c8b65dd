"""Resources a client needs: GET /jobs, DELETE /images/<id>, GET /transcripts/<id>, GET /config."""

from __future__ import annotations

from pathlib import Path

from .test_jobs import submit, wait_state

ALICE = {"Authorization": "Bearer alice-key"}
BOB = {"Authorization": "Bearer bob-key"}


def test_jobs_lists_the_callers_jobs_newest_first_and_filters_by_state(make_app) -> None:
    app = make_app(api_keys=["alice-key", "bob-key"])
    client = app.test_client()
    first = submit(client, ALICE, prompt="a castle", steps=1, seed=1).json["id"]
    wait_state(client, first, {"succeeded"}, ALICE, timeout=300)
    second = submit(client, ALICE, prompt="a boat", steps=1, seed=2).json["id"]
    theirs = submit(client, BOB, prompt="a tree", steps=1, seed=3).json["id"]
    wait_state(client, second, {"succeeded"}, ALICE, timeout=300)
    wait_state(client, theirs, {"succeeded"}, BOB, timeout=300)
    # A third one, cancelled: it is listed too, in its state.
    third = submit(client, ALICE, prompt="a long one", steps=60, seed=4).json["id"]
    client.delete(f"/jobs/{third}", headers=ALICE)
    wait_state(client, third, {"cancelled", "succeeded"}, ALICE, timeout=300)

    listed = client.get("/jobs", headers=ALICE)
    assert listed.status_code == 200
    body = listed.json
    assert [job["id"] for job in body["jobs"]] == [third, second, first]
    assert body["total"] == 3 and body["page"] == 1
    assert body["jobs"][1]["url"] == f"/jobs/{second}"
    assert body["jobs"][1]["result"]["images"]

    done = client.get("/jobs?state=succeeded", headers=ALICE).json
    assert {job["id"] for job in done["jobs"]} >= {first, second}
    assert theirs not in {job["id"] for job in done["jobs"]}
    assert all(job["state"] == "succeeded" for job in done["jobs"])

    paged = client.get("/jobs?per_page=1&page=2", headers=ALICE).json
    assert [job["id"] for job in paged["jobs"]] == [second] and paged["pages"] == 3

    assert [job["id"] for job in client.get("/jobs", headers=BOB).json["jobs"]] == [theirs]
    bad = client.get("/jobs?state=lost", headers=ALICE)
    assert bad.status_code == 400
    assert bad.json["error"]["details"]["field"] == "state"


def test_delete_image_removes_row_and_file_for_the_owner_only(make_app) -> None:
    app = make_app(api_keys=["alice-key", "bob-key"])
    client = app.test_client()
    made = client.post(
        "/generate-image",
        json={"prompt": "a lighthouse", "steps": 1, "seed": 5, "num_images": 2},
        headers=ALICE,
    )
    assert made.status_code == 200, made.json
    doomed, kept = made.json["images"]
    folder = Path(app.config["S2I_SETTINGS"].image_dir)
    assert (folder / doomed["filename"]).is_file()

    assert client.delete(f"/images/{doomed['filename']}", headers=BOB).status_code == 404
    assert (folder / doomed["filename"]).is_file()

    gone = client.delete(f"/images/{doomed['id']}", headers=ALICE)
    assert gone.status_code == 204 and gone.data == b""
    assert not (folder / doomed["filename"]).exists()
    assert client.get(doomed["url"], headers=ALICE).status_code == 404
    listed = client.get("/images", headers=ALICE).json["images"]
    assert [image["id"] for image in listed] == [kept["id"]]
    assert client.delete(f"/images/{doomed['filename']}", headers=ALICE).status_code == 404
    assert client.delete("/images/../history.sqlite3", headers=ALICE).status_code == 404
    assert (folder / kept["filename"]).is_file()


def test_transcript_of_a_speech_to_image_request(client, speech) -> None:
    with open(speech["english"], "rb") as fh:
        response = client.post(
            "/speech-to-image",
            data={"audio": (fh, "clip.wav"), "steps": "1", "seed": "3"},
            content_type="multipart/form-data",
        )
    assert response.status_code == 200, response.json
    transcript_id = response.json["transcript"]["id"]
    found = client.get(f"/transcripts/{transcript_id}")
    assert found.status_code == 200
    body = found.json
    assert body["id"] == transcript_id
    assert "fox" in body["text"].lower()
    assert body["language"] == "en"
    assert [image["id"] for image in body["images"]] == [
        image["id"] for image in response.json["images"]
    ]
    assert body["images"][0]["transcript_id"] == transcript_id
    assert client.get("/transcripts/" + "0" * 32).status_code == 404
    assert client.get("/transcripts/not-an-id").status_code == 404


def test_transcripts_are_private_to_their_owner(make_app, speech) -> None:
    app = make_app(api_keys=["alice-key", "bob-key"], whisper_model="tiny.en")
    client = app.test_client()
    with open(speech["english"], "rb") as fh:
        response = client.post(
            "/speech-to-image",
            data={"audio": (fh, "clip.wav"), "steps": "1"},
            headers=ALICE,
            content_type="multipart/form-data",
        )
    assert response.status_code == 200, response.json
    transcript_id = response.json["transcript"]["id"]
    assert client.get(f"/transcripts/{transcript_id}", headers=ALICE).status_code == 200
    assert client.get(f"/transcripts/{transcript_id}", headers=BOB).status_code == 404


def test_config_lists_models_schedulers_and_limits_from_the_settings(make_app) -> None:
    app = make_app(
        max_width=768,
        max_height=512,
        default_width=128,
        max_steps=12,
        default_steps=3,
        max_num_images=3,
        max_prompt_chars=500,
        max_upload_bytes=2 * 1024**2,
        max_audio_seconds=90,
        api_keys=["alice-key"],
    )
    response = app.test_client().get("/config")  # no key: a page asks before it has one
    assert response.status_code == 200
    body = response.json
    names = [model["name"] for model in body["models"]["image"]]
    assert {"tiny-art", "tiny-photo", "dreamshaper"} <= set(names)
    by_name = {model["name"]: model for model in body["models"]["image"]}
    assert by_name["dreamshaper"]["source"] == "Lykon/dreamshaper-8"
    assert "source" not in by_name["tiny-art"]  # a server path is not shown
    assert body["models"]["whisper"] == [{"name": "base"}]
    assert body["models"]["default_image"] == "auto"
    assert "euler_a" in body["schedulers"]
    limits = body["limits"]
    assert limits["width"] == {"min": 64, "max": 768, "multiple_of": 8, "default": 128}
    assert limits["height"] == {"min": 64, "max": 512, "multiple_of": 8, "default": 64}
    assert limits["steps"] == {"min": 1, "max": 12, "default": 3}
    assert limits["num_images"] == {"min": 1, "max": 3, "default": 1}
    assert limits["prompt_chars"] == {"max": 500}
    assert limits["upload_bytes"] == {"max": 2 * 1024**2}
    assert limits["audio_seconds"] == {"max": 90}
    assert body["auth"] == {"required": True}
    assert make_app().test_client().get("/config").json["auth"] == {"required": False}
