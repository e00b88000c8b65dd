"""Spoken-prompt understanding: a labelled set of spoken requests, each rule, the answer shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from speech2image.api.responses import PromptFromSpeech
from speech2image.prompting import (
    Change,
    SpokenPrompt,
    clean_request,
    extract_negatives,
    language_name,
    merge_negatives,
    understand_speech,
)

# Requests as people say them to the app, written as Whisper writes them down, labelled with the
# prompt and negative prompt a person would type. Written before the rules were tuned.
# (kind, heard, prompt, negative prompt)
LABELLED: list[tuple[str, str, str, str | None]] = [
    # request framing
    ("framing", "Can you draw me a lighthouse on a cliff?", "a lighthouse on a cliff", None),
    (
        "framing",
        "Generate an image of a red panda eating bamboo.",
        "a red panda eating bamboo",
        None,
    ),
    ("framing", "I'd like a picture of a sailboat at dawn.", "a sailboat at dawn", None),
    ("framing", "Could you make a cozy cabin in the snow?", "a cozy cabin in the snow", None),
    (
        "framing",
        "Show me a busy street in Tokyo at night.",
        "a busy street in Tokyo at night",
        None,
    ),
    (
        "framing",
        "Please create a bowl of ramen with a soft egg.",
        "a bowl of ramen with a soft egg",
        None,
    ),
    ("framing", "Draw a cat sleeping on a windowsill.", "a cat sleeping on a windowsill", None),
    (
        "framing",
        "Make me a picture of two dogs playing in the park.",
        "two dogs playing in the park",
        None,
    ),
    ("framing", "I want to see a castle on a hill.", "a castle on a hill", None),
    (
        "framing",
        "Could you please generate a photo of a vintage car?",
        "a photo of a vintage car",
        None,
    ),
    ("framing", "Paint me a sunset over the ocean.", "a painting of a sunset over the ocean", None),
    (
        "framing",
        "How about a robot reading a book in a library?",
        "a robot reading a book in a library",
        None,
    ),
    ("framing", "I would like an image of a mountain lake, please.", "a mountain lake", None),
    (
        "framing",
        "Give me a watercolor of a fox in the woods.",
        "a watercolor of a fox in the woods",
        None,
    ),
    (
        "framing",
        "Would you create an illustration of a dragon, thanks.",
        "an illustration of a dragon",
        None,
    ),
    ("framing", "Let me see a city skyline at golden hour.", "a city skyline at golden hour", None),
    # fillers
    ("filler", "Um, a lighthouse on a cliff.", "a lighthouse on a cliff", None),
    ("filler", "Uh, a cup of coffee on a wooden table.", "a cup of coffee on a wooden table", None),
    ("filler", "So, um, a bowl of pho with fresh herbs.", "a bowl of pho with fresh herbs", None),
    (
        "filler",
        "Okay, a red bicycle leaning against a wall.",
        "a red bicycle leaning against a wall",
        None,
    ),
    (
        "filler",
        "Hmm, an old man fishing on a pier, uh, at sunrise.",
        "an old man fishing on a pier, at sunrise",
        None,
    ),
    ("filler", "Um, uh, can you draw me a cat in a hat?", "a cat in a hat", None),
    (
        "filler",
        "Hey, could you make me an F1 race car on a track?",
        "an F1 race car on a track",
        None,
    ),
    # spoken negatives
    ("negative", "A beach at sunset without people.", "A beach at sunset", "people"),
    ("negative", "A poster of a jazz festival, no text.", "A poster of a jazz festival", "text"),
    (
        "negative",
        "A portrait of a woman in a garden but not blurry.",
        "A portrait of a woman in a garden",
        "blurry",
    ),
    ("negative", "A city street without any cars.", "A city street", "cars"),
    (
        "negative",
        "A mountain landscape, no people and no buildings.",
        "A mountain landscape",
        "people, buildings",
    ),
    ("negative", "A forest in autumn with no animals.", "A forest in autumn", "animals"),
    (
        "negative",
        "A kitchen, but without any clutter or dirty dishes.",
        "A kitchen",
        "clutter, dirty dishes",
    ),
    (
        "negative",
        "A logo of a coffee shop, don't include any text.",
        "A logo of a coffee shop",
        "text",
    ),
    (
        "negative",
        "A snowy village at night, and no lights in the windows.",
        "A snowy village at night",
        "lights in the windows",
    ),
    # framing, fillers and negatives together
    (
        "mixed",
        "Um, can you draw me a lighthouse on a cliff, but without any people?",
        "a lighthouse on a cliff",
        "people",
    ),
    (
        "mixed",
        "Could you generate an image of a living room, no text, please.",
        "a living room",
        "text",
    ),
    (
        "mixed",
        "Uh, I'd like a picture of a dog on the beach, but not blurry.",
        "a dog on the beach",
        "blurry",
    ),
    (
        "mixed",
        "Please make a bowl of fruit on a table without any bananas.",
        "a bowl of fruit on a table",
        "bananas",
    ),
    ("mixed", "Show me a quiet harbor at dawn. No boats.", "a quiet harbor at dawn", "boats"),
    (
        "mixed",
        "So, generate a busy market in Marrakech without tourists, thank you.",
        "a busy market in Marrakech",
        "tourists",
    ),
    # added after the rules were tuned, to keep the measure honest
    (
        "mixed",
        "Hi there, I need a picture of a vintage typewriter, no people please.",
        "a vintage typewriter",
        "people",
    ),
    (
        "mixed",
        "Could you draw a sunflower field and make sure there are no clouds?",
        "a sunflower field",
        "clouds",
    ),
    (
        "filler",
        "Yeah so, like, a skateboarder doing a kickflip.",
        "a skateboarder doing a kickflip",
        None,
    ),
    (
        "negative",
        "A bakery window full of bread, but please no watermark.",
        "A bakery window full of bread",
        "watermark",
    ),
    (
        "framing",
        "I'm thinking of a treehouse in a giant oak tree.",
        "a treehouse in a giant oak tree",
        None,
    ),
    ("framing", "Can you show me what a medieval market looked like?", "a medieval market", None),
    (
        "negative",
        "A white sofa in a bright living room, avoid shadows.",
        "A white sofa in a bright living room",
        "shadows",
    ),
    (
        "plain",
        "Please Please Me album cover, vintage",
        "Please Please Me album cover, vintage",
        None,
    ),
    (
        "plain",
        "An old woman who says thank you to a waiter",
        "An old woman who says thank you to a waiter",
        None,
    ),
    ("plain", "Make-up brushes on a marble counter", "Make-up brushes on a marble counter", None),
    # found failing in a spot check (interjections with no comma), then fixed
    (
        "mixed",
        "Okay so I want a photo of a bowl of pho without any chopsticks please",
        "a photo of a bowl of pho",
        "chopsticks",
    ),
    (
        "filler",
        "Hey um could you please generate me an image of a knight, thank you!",
        "a knight",
        None,
    ),
    ("plain", "So many balloons over a field", "So many balloons over a field", None),
    ("plain", "Well lit kitchen with copper pans", "Well lit kitchen with copper pans", None),
    # plain prompts: already what a person would type; they must pass untouched
    (
        "plain",
        "A red fox jumps over the lazy dog in a quiet green forest at sunrise.",
        "A red fox jumps over the lazy dog in a quiet green forest at sunrise.",
        None,
    ),
    ("plain", "A cup of boba on a cafe table", "A cup of boba on a cafe table", None),
    (
        "plain",
        "An oil painting of a harbour in the rain",
        "An oil painting of a harbour in the rain",
        None,
    ),
    ("plain", "A man showing his drawing to a child", "A man showing his drawing to a child", None),
    (
        "plain",
        "A painter making a picture of a harbour",
        "A painter making a picture of a harbour",
        None,
    ),
    ("plain", "Can of soup on a kitchen shelf", "Can of soup on a kitchen shelf", None),
    ("plain", "A sign that says no parking", "A sign that says no parking", None),
    ("plain", "No parking sign on a brick wall", "No parking sign on a brick wall", None),
    ("plain", "Paint cans stacked in a garage", "Paint cans stacked in a garage", None),
    ("plain", "Show jumping horse at a competition", "Show jumping horse at a competition", None),
    (
        "plain",
        "An umbrella in the rain, cinematic lighting",
        "An umbrella in the rain, cinematic lighting",
        None,
    ),
    (
        "plain",
        "A photo of a bowl of pho, 85mm, bokeh",
        "A photo of a bowl of pho, 85mm, bokeh",
        None,
    ),
    ("plain", "Notebook and pencil on a desk", "Notebook and pencil on a desk", None),
    (
        "plain",
        "A knight without fear facing a dragon",
        "A knight without fear facing a dragon",
        None,
    ),
    ("plain", "Drawing room of an old manor house", "Drawing room of an old manor house", None),
    ("plain", "Thank you card with flowers", "Thank you card with flowers", None),
]
# Measured: 54/54 once the rules were tuned on the first 54; the last ten, added afterwards,
# brought it to 60/64 (0.938) before three general fixes (more interjections, "but please no")
# made it 63/64. Four more from a spot check (two failing, fixed; two plain) make 67/68.
# The floor sits below the held-out measure.
MIN_EXACT_MATCH = 0.9


def _evaluate() -> tuple[float, list[str], list[str]]:
    misses: list[str] = []
    plain_misses: list[str] = []
    for kind, heard, prompt, negative in LABELLED:
        got = understand_speech(heard, "en")
        if (got.prompt, got.negative_prompt) != (prompt, negative):
            line = (
                f"  MISS [{kind}] {heard!r}: got ({got.prompt!r}, {got.negative_prompt!r}), "
                f"want ({prompt!r}, {negative!r})"
            )
            misses.append(line)
            if kind == "plain":
                plain_misses.append(line)
    return 1 - len(misses) / len(LABELLED), misses, plain_misses


def test_labelled_spoken_requests_exact_match(capsys: pytest.CaptureFixture[str]) -> None:
    kinds = [kind for kind, *_ in LABELLED]
    assert len(LABELLED) >= 40 and kinds.count("plain") >= 10
    rate, misses, plain_misses = _evaluate()
    counts = ", ".join(f"{kinds.count(k)} {k}" for k in dict.fromkeys(kinds))
    report = "\n".join(
        [
            f"spoken-prompt exact-match rate: {rate:.3f} "
            f"({len(LABELLED) - len(misses)}/{len(LABELLED)} requests; {counts})",
            *misses,
        ]
    )
    with capsys.disabled():  # shown in every run, not only with -s or -rA
        print("\n" + report)
    assert plain_misses == [], "plain prompts must pass untouched:\n" + "\n".join(plain_misses)
    assert rate >= MIN_EXACT_MATCH, report


@pytest.mark.parametrize("heard", [p for k, p, *_ in LABELLED if k == "plain"])
def test_plain_prompts_pass_untouched_with_no_changes(heard: str) -> None:
    got = understand_speech(heard, "en")
    assert got.prompt == heard
    assert got.changes == []
    assert got.negative_prompt is None


def test_issue_example_reports_each_change_and_why() -> None:
    got = understand_speech(
        "Um, can you draw me a lighthouse on a cliff, but without any people?", "en"
    )
    assert got.prompt == "a lighthouse on a cliff"
    assert got.negative_prompt == "people"
    assert [(c.rule, c.before, c.after) for c in got.changes] == [
        ("filler", "Um", ""),
        ("framing", "can you draw me", ""),
        ("negative", "but without any people", ""),
    ]
    assert all(c.why for c in got.changes)
    assert "'people'" in got.changes[-1].why and "negative prompt" in got.changes[-1].why


def test_a_medium_verb_keeps_its_medium() -> None:
    text, changes = clean_request("Paint me a harbour at night.")
    assert text == "a painting of a harbour at night"
    assert changes == [
        Change(
            "framing",
            "Paint me",
            "a painting of",
            "request framing addressed to the app; the verb names a medium, kept as a noun",
        )
    ]
    assert clean_request("Sketch an old bridge.")[0] == "a sketch of an old bridge"


def test_negatives_merge_with_the_callers_negative_prompt() -> None:
    got = understand_speech(
        "A city street without any cars or text.", "en", negative_prompt="blurry, Text"
    )
    assert got.prompt == "A city street"
    assert got.negative_prompt == "blurry, Text, cars"  # "text" is already there
    assert merge_negatives(None, []) is None
    assert merge_negatives("  ", ["people"]) == "people"
    assert merge_negatives("low quality", []) == "low quality"


def test_each_step_can_be_switched_off() -> None:
    heard = "Um, draw me a beach without people."
    off = understand_speech(heard, "en", clean=False, negatives=False)
    assert (off.prompt, off.negative_prompt, off.changes) == (heard, None, [])
    no_clean = understand_speech(heard, "en", clean=False)
    assert no_clean.prompt == "Um, draw me a beach"
    assert no_clean.negative_prompt == "people"
    no_negatives = understand_speech(heard, "en", negatives=False)
    assert no_negatives.prompt == "a beach without people"
    assert no_negatives.negative_prompt is None


def test_translation_is_a_recorded_change_and_keeps_the_original() -> None:
    got = understand_speech(
        "Zeichne mir einen Leuchtturm ohne Menschen.",
        "de",
        translation=" Draw me a lighthouse without people.",
    )
    assert got.transcript == "Zeichne mir einen Leuchtturm ohne Menschen."
    assert (got.language, got.translated) == ("de", True)
    first = got.changes[0]
    assert (first.rule, first.before, first.after) == (
        "translate",
        "Zeichne mir einen Leuchtturm ohne Menschen.",
        "Draw me a lighthouse without people.",
    )
    assert "German (de)" in first.why
    assert (got.prompt, got.negative_prompt) == ("a lighthouse", "people")


def test_nothing_left_to_draw_keeps_the_words() -> None:
    assert extract_negatives("Without people.") == ("Without people.", [], [])
    text, negatives, _ = extract_negatives("A beach, without people")
    assert (text, negatives) == ("A beach", ["people"])


def test_answer_shape_is_json_ready() -> None:
    got = understand_speech("Um, a cat, no text.", "en", negative_prompt="blurry")
    data = got.as_dict()
    assert json.loads(json.dumps(data)) == data
    assert list(data) == [
        "transcript",
        "language",
        "translated",
        "changes",
        "prompt",
        "negative_prompt",
    ]
    assert data["changes"][0] == {
        "rule": "filler",
        "before": "Um",
        "after": "",
        "why": "a spoken filler, not part of the picture",
    }
    assert data["negative_prompt"] == "blurry, text"
    assert isinstance(got, SpokenPrompt)


def test_language_names() -> None:
    assert language_name("de") == "German (de)"
    assert language_name("xx") == "'xx'"
    assert language_name(None) == "an unknown language"


# --- through the real app, with speech ----------------------------------------------------


def _speak(client, path, **form):  # type: ignore[no-untyped-def]
    with open(path, "rb") as fh:
        return client.post(
            "/speech-to-image",
            data={"audio": (fh, "clip.wav"), "steps": "1", **form},
            content_type="multipart/form-data",
        )


def _stored_transcript(app, transcript_id: str):  # type: ignore[no-untyped-def]
    from speech2image.storage import TranscriptRecord

    with app.extensions["storage"].engine.connect() as connection:
        from sqlalchemy import select

        return connection.execute(
            select(TranscriptRecord.text, TranscriptRecord.language).where(
                TranscriptRecord.id == transcript_id
            )
        ).one()


def test_spoken_request_becomes_a_prompt_and_a_negative(make_app, speech) -> None:
    app = make_app()
    client = app.test_client()
    response = _speak(client, speech["spoken_request"], negative_prompt="blurry")
    assert response.status_code == 200, response.json
    body = response.json
    heard = body["prompt_from_speech"]
    assert heard["transcript"] == body["transcript"]["text"]
    assert heard["transcript"].lower().startswith(("can you draw", "um"))
    assert (heard["language"], heard["translated"]) == ("en", False)
    assert body["prompt"] == heard["prompt"]
    assert heard["prompt"].endswith("on a cliff") and "house" in heard["prompt"]
    assert not heard["prompt"].lower().startswith(("can", "um"))
    assert heard["negative_prompt"] == "blurry, people"
    rules = [change["rule"] for change in heard["changes"]]
    assert "framing" in rules and rules[-1] == "negative"
    PromptFromSpeech.model_validate(heard)  # the shape the OpenAPI description promises
    assert all(change["why"] for change in heard["changes"])
    (row,) = client.get("/images").json["images"]
    assert (row["prompt"], row["negative_prompt"]) == (heard["prompt"], "blurry, people")
    assert _stored_transcript(app, row["transcript_id"]).text == heard["transcript"]


def test_understanding_can_be_switched_off_per_request(make_app, speech) -> None:
    client = make_app().test_client()
    response = _speak(client, speech["spoken_request"], understand="false", negatives="true")
    assert response.status_code == 200, response.json
    heard = response.json["prompt_from_speech"]
    assert [change["rule"] for change in heard["changes"]] == ["negative"]  # only that step
    assert heard["prompt"].lower().startswith(("can you draw", "um"))
    assert heard["negative_prompt"] == "people"
    bad = _speak(client, speech["spoken_request"], clean="maybe")
    assert bad.status_code == 400
    assert "`clean`" in bad.json["error"]["message"]


def test_german_speech_becomes_an_english_prompt(make_app, speech) -> None:
    app = make_app()
    client = app.test_client()
    response = _speak(client, speech["german"])
    assert response.status_code == 200, response.json
    body = response.json
    heard = body["prompt_from_speech"]
    assert (heard["language"], heard["translated"]) == ("de", True)
    assert "Katze" in heard["transcript"]  # the original words are kept ...
    assert body["transcript"]["text"] == heard["transcript"]
    translate = heard["changes"][0]
    assert translate["rule"] == "translate" and "German (de)" in translate["why"]
    assert translate["before"] == heard["transcript"]
    prompt = body["prompt"]
    print(f"\nheard {heard['transcript']!r}, translated {translate['after']!r} -> {prompt!r}")
    assert prompt == heard["prompt"] and prompt.isascii()
    assert not {"hund", "habe", "einen", "und", "katze"} & set(prompt.lower().split())
    assert {"i", "a", "and", "the", "have"} & set(
        prompt.lower().split()
    )  # ... the prompt is English
    assert "translation" in body["timings"]
    row = client.get("/images").json["images"][0]
    assert row["prompt"] == prompt
    stored = _stored_transcript(app, row["transcript_id"])
    assert (stored.text, stored.language) == (heard["transcript"], "de")


def test_politeness_alone_leaves_no_prompt() -> None:
    # /speech-to-image answers 422 "nothing to draw was heard" for this
    assert understand_speech("Please. Thank you.", "en").prompt == ""
    assert understand_speech("Um.", "en").prompt == ""


def test_speech_with_nothing_to_draw_is_a_clear_422(make_app, speech) -> None:
    app = make_app()
    response = _speak(app.test_client(), speech["politeness"])
    assert response.status_code == 422, response.json
    assert response.json["error"]["code"] == "invalid_audio"
    assert "nothing to draw" in response.json["error"]["message"]
    assert app.test_client().get("/images").json["images"] == []
    assert list(Path(app.config["S2I_SETTINGS"].upload_dir).iterdir()) == []


def test_understand_steps_travel_to_a_distributed_worker(make_app) -> None:
    from speech2image.kinds import SpeechToImageWork
    from speech2image.prompting import UnderstandSteps
    from speech2image.speech_service import TranscribeOptions

    kinds = make_app().extensions["job_kinds"]
    steps = UnderstandSteps(translate=False, negatives=False)
    work = SpeechToImageWork(TranscribeOptions(), {"steps": 1}, steps)
    document = kinds["speech_to_image"].dump(work)  # the row's work and the task's payload
    rebuilt = kinds["speech_to_image"].load(json.loads(json.dumps(document)))
    assert rebuilt == work and rebuilt.understand == steps


def test_task_translate_keeps_the_original_words_even_with_understanding_off(
    make_app, speech
) -> None:
    response = _speak(make_app().test_client(), speech["german"], task="translate", understand="0")
    assert response.status_code == 200, response.json
    heard = response.json["prompt_from_speech"]
    assert (heard["language"], heard["translated"]) == ("de", True)
    assert "Katze" in heard["transcript"] and "Katze" in response.json["transcript"]["text"]
    assert [change["rule"] for change in heard["changes"]] == ["translate"]
    assert heard["prompt"] == heard["changes"][0]["after"] != heard["transcript"]
