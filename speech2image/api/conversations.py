"""Conversations: speak (or type) the first picture, then say what to change; undo a turn.

POST /conversations makes one; POST /conversations/<id>/turns takes speech (`audio`) or
`text`, decides whether it asks for a new picture or an edit of the current one, composes the
prompt (``instructions.py``) and runs a generate or edit job; POST .../undo goes back to the
previous image; GET /conversations/<id> shows the thread.
"""

from __future__ import annotations

import io
from typing import Any

from flask import Blueprint, current_app, jsonify
from flask.typing import ResponseReturnValue
from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
from pydantic_core import PydanticCustomError
from werkzeug.exceptions import Conflict

from ..editing import history_image
from ..errors import ResourceNotFound, ServiceError
from ..image_service import get_image_service
from ..instructions import compose_edit, gloss_german, looks_german, parse_instruction
from ..kinds import TranscribeWork
from ..prompting import Change, language_name
from ..schemas import safe_text
from ..speech_service import TranscribeOptions, get_speech_service
from ..storage import ImageRecord, get_storage
from ..storage.conversations import TurnRecord
from .edit import image_fields, submit_edit
from .identity import client_owner
from .images import image_json
from .jobs import submit, wait_for
from .openapi import Upload, endpoint
from .responses import ImageRow, _Open

__all__ = ["bp"]

bp = Blueprint("conversations", __name__)

MAX_TURN_CHARS = 500


class NothingToUndo(ServiceError, Conflict):
    """The conversation has no turn to take back."""

    error = "nothing_to_undo"


class Turn(_Open):
    """One turn: what was heard, what was decided and composed, and the images."""

    id: str
    position: int
    source: str
    transcript: str
    decision: str
    operation: str
    prompt: str
    negative_prompt: str | None
    changes: list[dict[str, Any]]
    seed: int
    strength: float | None
    images: list[ImageRow]


class Conversation(_Open):
    """A conversation with its standing turns (oldest first) and the current image."""

    id: str
    created_at: str
    turns: list[Turn]
    current_image: ImageRow | None


class Undone(_Open):
    """The turn taken back and the conversation as it now stands."""

    undone: Turn
    conversation: Conversation


def _needs_input(form: Any) -> Any:
    if form.audio is None and form.text is None:
        raise PydanticCustomError("turn", "send `audio` (speech) or `text`")
    return form


def _turn_form(app: Any) -> type[BaseModel]:
    return create_model(
        "ConversationTurnForm",
        __config__=ConfigDict(
            extra="forbid",
            json_schema_extra={"anyOf": [{"required": ["audio"]}, {"required": ["text"]}]},
        ),
        __validators__={"needs_input": model_validator(mode="after")(_needs_input)},
        audio=(Upload, Field(None, description="The spoken turn (any common audio format).")),
        text=(
            safe_text(MAX_TURN_CHARS, required=True),
            Field(None, description="Or the turn typed (English or German); `audio` wins."),
        ),
        **{k: v for k, v in image_fields(app).items() if k in ("model", "steps", "seed")},
    )


def _conversation(conversation_id: str) -> Any:
    found = get_storage(current_app).conversations.get(client_owner(), conversation_id)
    if found is None:
        raise ResourceNotFound("no such conversation")
    return found


def _turn_json(turn: TurnRecord, images: dict[str, ImageRecord]) -> dict[str, Any]:
    return turn.as_dict() | {
        "images": [image_json(images[i]) for i in turn.image_ids if i in images]
    }


def _thread(record: Any) -> dict[str, Any]:
    storage = get_storage(current_app)
    owner = client_owner()
    turns = storage.conversations.turns(record.id)
    images = {}
    for turn in turns:
        for image_id in turn.image_ids:
            found = storage.image_by_id(owner, image_id)
            if found is not None:
                images[image_id] = found
    current = None
    if turns and turns[-1].image_ids and turns[-1].image_ids[0] in images:
        current = image_json(images[turns[-1].image_ids[0]])
    return {
        "id": record.id,
        "created_at": record.created_at.isoformat(),
        "turns": [_turn_json(t, images) for t in turns],
        "current_image": current,
    }


def _hear(upload: Any) -> tuple[str, str, list[Change]]:
    """Transcribe a spoken turn; other languages are translated to English by Whisper."""
    data = upload.read()
    speech = get_speech_service(current_app)

    def run(task: str, language: str | None = None) -> dict[str, Any]:
        path = speech.store_upload(io.BytesIO(data))
        options = TranscribeOptions(language=language, task=task)
        return wait_for(submit("transcribe", TranscribeWork(options), input=path))

    heard = run("transcribe")
    text, language = heard["text"].strip(), heard.get("language")
    if language in (None, "en"):
        return text, text, []
    english = run("translate", language)["text"].strip()
    why = (
        f"spoken in {language_name(language)}; Whisper translated it to English, "
        "the language the instruction reader and the text encoder read"
    )
    return text, english, [Change("translate", text, english, why)]


def _read(text: str) -> tuple[str, list[Change]]:
    """A typed turn: German is glossed to English (data/edit_gloss_de.toml) first."""
    if not looks_german(text):
        return text, []
    english = gloss_german(text)
    why = "typed German, glossed word by word to English (data/edit_gloss_de.toml)"
    return english, [Change("translate", text, english, why)]


@bp.post("/conversations")
@endpoint(responses={201: Conversation}, tags=("conversations",))
def create_conversation() -> ResponseReturnValue:
    """Start a conversation: its first turn makes the first picture."""
    record = get_storage(current_app).conversations.create(client_owner())
    return jsonify(_thread(record)), 201


@bp.get("/conversations/<conversation_id>")
@endpoint(
    responses={200: Conversation},
    errors=(404,),
    tags=("conversations",),
    path={"conversation_id": "The conversation's id"},
)
def get_conversation(conversation_id: str) -> ResponseReturnValue:
    """The conversation as a thread: each turn with what was understood and its images."""
    return jsonify(_thread(_conversation(conversation_id)))


@bp.post("/conversations/<conversation_id>/turns")
@endpoint(
    form=_turn_form,
    responses={200: Turn},
    errors=(404, 409, 415, 422, 503, 507),
    tags=("conversations",),
    path={"conversation_id": "The conversation's id"},
)
def take_turn(conversation_id: str, form: Any) -> ResponseReturnValue:
    """Say (or type) what to draw or change: a new picture or an edit of the current one."""
    record = _conversation(conversation_id)
    storage = get_storage(current_app)
    owner = client_owner()
    turns = storage.conversations.turns(record.id)
    last = turns[-1] if turns else None
    if form.audio is not None:
        transcript, english, changes = _hear(form.audio)
        source = "speech"
    else:
        transcript = form.text
        english, changes = _read(form.text)
        source = "text"
    instruction = parse_instruction(english, has_image=bool(last and last.image_ids))
    if last is None or instruction.decision == "new":
        composed = compose_edit(last.prompt if last else "", None, instruction)
        fields: dict[str, Any] = {"prompt": composed.prompt or english.strip() or transcript}
        for name in ("model", "steps", "seed"):
            if getattr(form, name) is not None:
                fields[name] = getattr(form, name)
        service = get_image_service(current_app)
        result = wait_for(submit("generate", service.prepare(service.validate(fields))))
    else:
        assert last is not None
        composed = compose_edit(last.prompt, last.negative_prompt, instruction)
        parent = storage.image_by_id(owner, last.image_ids[0])
        fields = {"prompt": composed.prompt, "seed": last.seed}
        if composed.negative_prompt:
            fields["negative_prompt"] = composed.negative_prompt
        if parent is not None:
            fields |= {"model": parent.model, "steps": form.steps or parent.steps}
        job = submit_edit(
            fields,
            history_image(storage, owner, last.image_ids[0]),
            None,
            strength=composed.strength or 0.6,
            parent_id=last.image_ids[0],
        )
        result = wait_for(job)
    turn = storage.conversations.add_turn(
        record.id,
        source=source,
        transcript=transcript,
        decision=composed.decision,
        operation=composed.operation,
        prompt=result["prompt"],
        negative_prompt=result["parameters"]["negative_prompt"],
        changes=[c.as_dict() for c in [*changes, *composed.changes]],
        seed=result["parameters"]["seed"],
        strength=composed.strength,
        image_ids=[image["id"] for image in result["images"]],
    )
    images = {i: storage.image_by_id(owner, i) for i in turn.image_ids}
    body = _turn_json(turn, {k: v for k, v in images.items() if v is not None})
    return jsonify(body | {"english": english})


@bp.post("/conversations/<conversation_id>/undo")
@endpoint(
    responses={200: Undone},
    errors=(404, 409),
    tags=("conversations",),
    path={"conversation_id": "The conversation's id"},
)
def undo_turn(conversation_id: str) -> ResponseReturnValue:
    """Take back the last turn: the previous image is current again (its images stay)."""
    record = _conversation(conversation_id)
    storage = get_storage(current_app)
    undone = storage.conversations.undo(record.id)
    if undone is None:
        raise NothingToUndo("nothing to undo: the conversation has no turns")
    owner = client_owner()
    images = {i: r for i in undone.image_ids if (r := storage.image_by_id(owner, i)) is not None}
    return jsonify(undone=_turn_json(undone, images), conversation=_thread(record))
