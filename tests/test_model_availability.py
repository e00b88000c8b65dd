"""Image checkpoints download on first use; when they cannot be had, say why at once (7.12)."""

from __future__ import annotations

from pathlib import Path

import pytest

from speech2image.config import load_settings
from speech2image.speech_service import SpeechService

from .test_images import generate


@pytest.fixture
def transcriptions(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every transcription the app starts."""
    started: list[Path] = []
    real = SpeechService.transcribe_file

    def counting(self, path, *args, **kwargs):  # type: ignore[no-untyped-def]
        started.append(path)
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(SpeechService, "transcribe_file", counting)
    return started


def speak(client, clip: Path, **fields: str):  # type: ignore[no-untyped-def]
    with open(clip, "rb") as fh:
        return client.post(
            "/speech-to-image",
            data={"audio": (fh, "clip.wav"), **fields},
            content_type="multipart/form-data",
        )


def test_downloads_are_on_by_default_for_images_and_off_for_whisper() -> None:
    settings = load_settings()
    assert settings.image_allow_download is True
    assert settings.whisper_allow_download is False


def test_unreachable_hub_says_why_and_speech_is_refused_before_transcribing(
    make_app, speech, transcriptions, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    # A hub that refuses connections, whatever network this machine has.
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    app = make_app(image_allow_download=True)
    client = app.test_client()
    response = generate(client, prompt="a cat", model="dreamshaper")
    assert response.status_code == 503
    message = response.json["error"]["message"]
    assert "Lykon/dreamshaper-8" in message and "could not be reached" in message
    assert "S2I_IMAGE_MODELS" in message and "build-tiny-model" in message

    refused = speak(client, speech["english"], model="dreamshaper")
    assert refused.status_code == 503
    assert "could not be reached" in refused.json["error"]["message"]
    assert transcriptions == []
    assert list(Path(app.config["S2I_SETTINGS"].upload_dir).glob("*")) == []


def test_speech_to_image_checks_the_image_model_before_transcribing(
    make_app, tiny_models, speech, transcriptions
) -> None:
    app = make_app(
        image_models={
            "tiny-art": {"source": str(tiny_models["tiny-art"])},
            "missing": {"source": "/nonexistent/checkpoint"},
        },
        style_models={"artistic": "tiny-art", "photographic": "missing"},
    )
    client = app.test_client()
    for fields in ({"model": "missing"}, {}):  # named, or one that automatic choice may pick
        response = speak(client, speech["english"], **fields)
        assert response.status_code == 503, response.json
        error = response.json["error"]
        assert error["code"] == "model_unavailable" and error["details"]["model"] == "missing"
        assert ".../checkpoint does not exist" in error["message"]  # no server path
        assert "/nonexistent" not in error["message"]
        assert "build-tiny-model" in error["message"]
    assert transcriptions == []
    whisper = [m for m in app.extensions["model_loader"].status() if m["kind"] != "diffusers"]
    assert all(m["loads"] == 0 for m in whisper)
    assert list(Path(app.config["S2I_SETTINGS"].upload_dir).glob("*")) == []

    ok = speak(client, speech["english"], model="tiny-art", steps="2")
    assert ok.status_code == 200, ok.json
    assert len(transcriptions) == 1
