"""Conversation turns read as a new picture or an edit; edits composed from the last prompt."""

from __future__ import annotations

import json
from pathlib import Path

from speech2image.instructions import (
    STRENGTHS,
    compose_edit,
    gloss_german,
    looks_german,
    parse_instruction,
)

LABELLED = Path(__file__).parent / "data" / "edit_instructions.json"


def read_turn(text: str, previous: str):  # type: ignore[no-untyped-def]
    english = gloss_german(text) if looks_german(text) else text
    instruction = parse_instruction(english)
    return instruction, compose_edit(previous, None, instruction)


def test_labelled_instructions_decision_and_composition_rates() -> None:
    rows = json.loads(LABELLED.read_text(encoding="utf-8"))
    assert len(rows) >= 80 and {r["lang"] for r in rows} == {"en", "de"}
    decided = composed = 0
    misses = []
    for row in rows:
        instruction, edit = read_turn(row["text"], row["previous"])
        prompt, negative = edit.prompt.casefold(), (edit.negative_prompt or "").casefold()
        right = instruction.decision == row["decision"] and (
            instruction.operation == row["operation"]
        )
        decided += right
        words = (
            all(h.casefold() in prompt for h in row["prompt_has"])
            and not any(h.casefold() in prompt for h in row["prompt_lacks"])
            and all(h.casefold() in negative for h in row["negative_has"])
        )
        composed += right and words
        if not (right and words):
            misses.append((row["text"], instruction.operation, edit.prompt, edit.negative_prompt))
        if right and edit.decision == "edit":
            assert edit.strength == STRENGTHS[row["operation"]]
            assert edit.changes and all(c.why for c in edit.changes)
    print(
        f"\nedit instructions: decision {decided}/{len(rows)} ({decided / len(rows):.0%}), "
        f"composition {composed}/{len(rows)} ({composed / len(rows):.0%}); misses: {misses}"
    )
    assert decided / len(rows) >= 0.9 and composed / len(rows) >= 0.85, misses


def test_composition_keeps_what_it_should() -> None:
    # A global restyle repaints more than a local change; a restyle drops the previous style.
    styled = read_turn("more like a watercolor", "a fox, oil painting")[1]
    added = read_turn("add a dog on the left", "a fox in the snow")[1]
    assert styled.strength and added.strength and styled.strength > added.strength
    assert "oil painting" not in styled.prompt and styled.prompt.endswith("watercolor style")
    # Removing a thing puts it in the negative prompt; adding it back takes it out again.
    removed = compose_edit("a street with a car", None, parse_instruction("without the car"))
    assert removed.prompt == "a street" and removed.negative_prompt == "car"
    back = compose_edit(removed.prompt, removed.negative_prompt, parse_instruction("add a car"))
    assert back.negative_prompt is None and back.prompt == "a street, a car"
    # No picture yet: any turn is a new picture.
    assert parse_instruction("make it night", has_image=False).decision == "new"
