"""POST /transcribe-audio through the real app with the real bundled Whisper base model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from speech2image.engines.whisper import max_new_tokens_for

from .audio_samples import silence_wav


def post_audio(client, path: Path, field: str = "audio", filename: str | None = None, **form):  # type: ignore[no-untyped-def]
    with open(path, "rb") as fh:
        data = {field: (fh, filename or path.name), **form}
        return client.post("/transcribe-audio", data=data, content_type="multipart/form-data")


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def test_transcribes_synthesized_english(client, speech) -> None:
    response = post_audio(client, speech["english"])
    assert response.status_code == 200, response.json
    body = response.json
    assert {"fox", "lazy", "quiet", "green", "forest", "sunrise"} <= words(body["text"])
    assert body["language"] == "en"
    assert 0.5 < body["language_probability"] <= 1
    assert 3.0 < body["duration"] < 6.0
    assert body["processing_time"] > 0
    assert set(body["timings"]) == {"decode", "wait", "load", "inference", "total"}
    assert body["model"] == "whisper:base"


def test_accepts_field_named_file(client, speech) -> None:
    response = post_audio(client, speech["english"], field="file")
    assert response.status_code == 200
    assert "fox" in words(response.json["text"])


def test_text_format(client, speech) -> None:
    response = post_audio(client, speech["english"], response_format="text")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    assert "forest" in words(response.get_data(as_text=True))


def test_srt_format(client, speech) -> None:
    response = post_audio(client, speech["english"], response_format="srt")
    assert response.status_code == 200
    text = response.get_data(as_text=True)
    assert text.startswith("1\n")
    assert re.search(r"^\d\d:\d\d:\d\d,\d{3} --> \d\d:\d\d:\d\d,\d{3}$", text, re.M)
    assert "forest" in words(text)


def test_vtt_format(client, speech) -> None:
    response = post_audio(client, speech["english"], response_format="vtt")
    assert response.status_code == 200
    assert response.mimetype == "text/vtt"
    text = response.get_data(as_text=True)
    assert text.startswith("WEBVTT\n\n")
    assert re.search(r"^\d\d:\d\d:\d\d\.\d{3} --> \d\d:\d\d:\d\d\.\d{3}$", text, re.M)


def test_verbose_json_has_segments_and_words(client, speech) -> None:
    response = post_audio(
        client, speech["english"], response_format="verbose_json", word_timestamps="true"
    )
    assert response.status_code == 200
    body = response.json
    assert body["segments"], body
    segment = body["segments"][0]
    for key in ("id", "start", "end", "text", "tokens", "avg_logprob", "no_speech_prob"):
        assert key in segment
    assert body["words"], "word_timestamps=true must give words"
    spoken = [w["word"].strip().lower().strip(".,") for w in body["words"]]
    assert "forest" in spoken
    starts = [w["start"] for w in body["words"]]
    assert starts == sorted(starts)
    assert all(w["end"] >= w["start"] for w in body["words"])


def test_verbose_json_without_word_timestamps_has_no_words(client, speech) -> None:
    response = post_audio(client, speech["english"], response_format="verbose_json")
    assert response.json["words"] is None
    assert all(s["words"] is None for s in response.json["segments"])


def test_translate_german_to_english(client, speech) -> None:
    response = post_audio(client, speech["german"], task="translate")
    assert response.status_code == 200, response.json
    body = response.json
    assert body["language"] == "de"
    assert body["task"] == "translate"
    assert {"i", "have", "small"} <= words(body["text"]), body["text"]


def test_transcribe_german_keeps_german(client, speech) -> None:
    response = post_audio(client, speech["german"], language="de")
    assert response.status_code == 200
    assert {"ich", "habe", "einen"} <= words(response.json["text"])


def test_silence_gives_empty_text(client, tmp_path) -> None:
    response = post_audio(client, silence_wav(tmp_path / "silence.wav", 5.0))
    assert response.status_code == 200
    assert response.json["text"] == ""
    assert response.json["duration"] == pytest.approx(5.0, abs=0.01)


@pytest.mark.parametrize(
    ("form", "needle"),
    [
        ({"task": "summarize"}, "`task`"),
        ({"response_format": "xml"}, "`response_format`"),
        ({"language": "klingon"}, "`language`"),
        ({"language": "zz"}, "`language`"),
        ({"word_timestamps": "maybe"}, "`word_timestamps`"),
    ],
)
def test_bad_options_are_400_naming_the_field(client, speech, form, needle) -> None:
    response = post_audio(client, speech["english"], **form)
    assert response.status_code == 400
    assert response.json["error"]["code"] == "invalid_request"
    assert needle in response.json["error"]["message"]


def test_missing_audio_field_is_400(client) -> None:
    response = client.post("/transcribe-audio", data={"language": "en"})
    assert response.status_code == 400
    assert "`audio`" in response.json["error"]["message"]


def test_unintelligible_audio_decoding_is_bounded(make_app, speech) -> None:
    """tiny.en on Spanish-like gibberish used to loop for ~10x the audio's length."""
    app = make_app(whisper_model="tiny.en")
    response = post_audio(
        app.test_client(), speech["spanish_as_english"], response_format="verbose_json"
    )
    assert response.status_code == 200
    body = response.json
    cap = max_new_tokens_for(body["duration"])
    # Each window's generated tokens (text + timestamps) stay under the per-window cap, and
    # no more than one window is decoded for a clip shorter than 30 s.
    assert len({s["seek"] for s in body["segments"]}) <= 1
    assert sum(len(s["tokens"]) for s in body["segments"]) <= cap


def test_english_only_model_refuses_translate(make_app, speech) -> None:
    app = make_app(whisper_model="tiny.en")
    response = post_audio(app.test_client(), speech["german"], task="translate")
    assert response.status_code == 400
    assert "English-only" in response.json["error"]["message"]


def test_the_service_knows_exactly_whispers_language_codes() -> None:
    """API processes validate `language` from a copy; it must equal faster-whisper's list."""
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    from speech2image.speech_service import WHISPER_LANGUAGES

    assert set(_LANGUAGE_CODES) == WHISPER_LANGUAGES
