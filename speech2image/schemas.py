"""Request models: the one source of validation and of the OpenAPI description. Knows no HTTP.

Ranges come from the settings, so the models that carry them are built per app
(``image_request_model(settings, ...)``); fixed pieces (``SafeText``) are plain types.
Every model here reports all its errors at once; ``invalid_request`` turns them into the
400 that names each field.
"""

from __future__ import annotations

import datetime as dt
import math
import unicodedata
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
    create_model,
)

from .config import Settings
from .errors import InvalidRequest

__all__ = [
    "MAX_GUIDANCE",
    "MAX_SEED",
    "MIN_SIDE",
    "NONBLANK_TEXT_PATTERN",
    "TEXT_PATTERN",
    "SafeText",
    "UtcDateTime",
    "WholeInt",
    "check_text",
    "image_request_model",
    "invalid_request",
    "lora_item_model",
    "parse_json_text",
    "safe_text",
    "whole",
]

MAX_SEED = 2**32 - 1
MIN_SIDE = 64
MAX_GUIDANCE = 30.0
ALLOWED_CONTROLS = frozenset("\t\n\r")
RANGE_ERRORS = ("greater_than_equal", "less_than_equal", "greater_than", "less_than", "multiple_of")


# Every C0/C1 control but tab, newline and carriage return (lone surrogates are not text at all,
# so a pattern need not name them; check_text refuses them). Written
# as regular-expression source for the spec; check_text enforces the same set in code.
_CONTROLS = r"\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f"
TEXT_PATTERN = f"^[^{_CONTROLS}]*$"
NONBLANK_TEXT_PATTERN = f"^[^{_CONTROLS}]*[^ \\t\\n\\r{_CONTROLS}][^{_CONTROLS}]*$"
BLANKS = " \t\n\r"


def check_text(value: str) -> str:
    """Refuse text that is not valid Unicode (lone surrogates), NUL and control characters.

    Tab, newline and carriage return stay allowed: people paste prompts with line breaks.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it contains a lone surrogate)") from None
    for char in value:
        if char not in ALLOWED_CONTROLS and unicodedata.category(char) in ("Cc", "Cs"):
            raise ValueError(f"must not contain control characters (found U+{ord(char):04X})")
    return value


def _check_raw(value: Any) -> Any:
    # Before any other step (stripping would hide a control character at either end).
    return check_text(value) if isinstance(value, str) else value


def _strip(value: str) -> str:
    return value.strip(BLANKS)


def _not_blank(value: str) -> str:
    if not value.strip(BLANKS):
        raise ValueError("must not be empty")
    return value


#: Text a client may send anywhere: valid Unicode, no NUL or other control characters.
SafeText = Annotated[
    str, BeforeValidator(_check_raw), WithJsonSchema({"type": "string", "pattern": TEXT_PATTERN})
]


def safe_text(max_length: int | None = None, *, strip: bool = True, required: bool = False) -> Any:
    """``SafeText`` of at most ``max_length`` characters; ``required``: not blank.

    The length counts the text as sent; ``strip`` trims whitespace after every check.
    """
    schema: dict[str, Any] = {
        "type": "string",
        "pattern": NONBLANK_TEXT_PATTERN if required else TEXT_PATTERN,
    }
    if required:
        schema["minLength"] = 1
    if max_length is not None:
        schema["maxLength"] = max_length
    steps: list[Any] = [
        BeforeValidator(_check_raw),
        StringConstraints(max_length=max_length),
    ]
    if required:
        steps.append(AfterValidator(_not_blank))
    if strip:
        steps.append(AfterValidator(_strip))
    return Annotated[(str, *steps, WithJsonSchema(schema))]  # type: ignore[misc]


def _utc(value: Any) -> Any:
    # A naive time means UTC; an aware one far at the edge of the calendar cannot be
    # moved to UTC (year 1 at +01:00 is year 0): that is the client's error, not a 500.
    if not isinstance(value, dt.datetime):
        return value
    moment = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
    try:
        return moment.astimezone(dt.UTC)
    except OverflowError:
        raise ValueError("is out of range once converted to UTC") from None


def _iso_datetime(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return dt.datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"must be an ISO 8601 date or time, not {value!r}") from None
    return value


#: An ISO 8601 date or date-time (naive means UTC), given back in UTC.
UtcDateTime = Annotated[
    dt.datetime,
    BeforeValidator(_iso_datetime),
    AfterValidator(_utc),
    WithJsonSchema(
        {
            "type": "string",
            "format": "date-time",
            "description": "ISO 8601 date or time; without an offset it means UTC.",
        }
    ),
]


def parse_json_text(text: str, field: str) -> Any:
    """``json.loads`` for a client's text field: any failure (deep nesting too) is a 400."""
    import json

    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise InvalidRequest(
            f"`{field}` must be valid JSON (at most a few hundred levels deep)",
            details={"field": field},
        ) from None


def _whole(value: Any) -> Any:
    # JSON has one number type: 2.0 is the integer 2 (as JSON Schema says); 2.5 is not.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


#: An integer in a strict JSON body that also takes 2.0 (never "2", never true).
WholeInt = Annotated[int, BeforeValidator(_whole)]


def whole(**constraints: Any) -> Any:
    """``WholeInt`` with range constraints (``ge``, ``le``, ``multiple_of``)."""
    return Annotated[int, Field(**constraints), BeforeValidator(_whole)]


def _json_text(value: Any) -> Any:
    # In a multipart form (speech-to-image) a list arrives as JSON text.
    return parse_json_text(value, "loras") if isinstance(value, str) else value


def _model_default(value: Any, description: str) -> Any:
    """A field left out is None: the chosen model fills it (S2I_DEFAULT_* first, if set)."""
    if value is None:
        return Field(
            None,
            description=f"{description} Default: the model's own (see GET /config).",
            json_schema_extra=lambda schema: schema.pop("default", None),
        )
    return Field(
        None,
        description=f"{description} Default: {value} where the model can take it.",
        json_schema_extra={"default": value},
    )


def lora_item_model() -> type[BaseModel]:
    """One LoRA of a request: a name from the server's LoRA folder and a weight."""
    return create_model(
        "LoraChoice",
        __config__=ConfigDict(extra="forbid", strict=True),
        __doc__="A LoRA from the server's folder (GET /config lists them) and its weight.",
        name=(safe_text(100, required=True), Field(description="The LoRA's name.")),
        weight=(
            Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)],
            Field(1.0, description="How strongly it applies (1: as trained; 0: not at all)."),
        ),
    )


def image_request_model(
    settings: Settings, models: Iterable[str], schedulers: Iterable[str], *, loras: bool = False
) -> type[BaseModel]:
    """The JSON body of POST /generate-image, with this app's ranges and defaults.

    ``schedulers``: those the configured models take; ``loras``: whether requests may name
    LoRAs (a LoRA folder is configured).
    """
    s = settings
    prompt_type = safe_text(s.max_prompt_chars, required=True)
    negative_type = safe_text(s.max_prompt_chars)
    model_names = ("auto", *sorted(models))
    scheduler_names = tuple(schedulers)
    extra: dict[str, Any] = {}
    if loras:
        item = lora_item_model()
        # Described inline (no $ref), as other schemas embed this field's.
        inline = {
            "type": "array",
            "maxItems": s.max_loras,
            "items": item.model_json_schema(),
        }
        extra["loras"] = (
            Annotated[
                list[item] | None,  # type: ignore[valid-type]
                Field(max_length=s.max_loras),
                BeforeValidator(_json_text),
                WithJsonSchema(inline),
            ],
            Field(
                None,
                description="LoRAs from the server's folder to apply, with weights; none given: "
                "the prompt's style cues may pick some (S2I_STYLE_LORAS).",
            ),
        )

    def side(limit: int) -> Any:
        return whole(ge=MIN_SIDE, le=limit, multiple_of=8)

    return create_model(
        "GenerateImageRequest",
        __config__=ConfigDict(extra="forbid", strict=True),
        __doc__="A text-to-image request; sizes, steps and counts within this server's limits.",
        prompt=(prompt_type, Field(description="What to draw.")),
        negative_prompt=(
            negative_type | None,
            Field(None, description="What to keep out of the image."),
        ),
        model=(
            Literal[model_names],  # type: ignore[valid-type]
            Field("auto", description="Image model; `auto` chooses by the prompt's style."),
        ),
        width=(side(s.max_width), _model_default(s.default_width, "Pixels, multiple of 8.")),
        height=(side(s.max_height), _model_default(s.default_height, "Pixels, multiple of 8.")),
        steps=(whole(ge=1, le=s.max_steps), _model_default(s.default_steps, "Denoising steps.")),
        guidance_scale=(
            Annotated[float, Field(ge=0, le=MAX_GUIDANCE, allow_inf_nan=False)],
            _model_default(s.default_guidance_scale, "How closely to follow the prompt."),
        ),
        seed=(
            whole(ge=0, le=MAX_SEED) | None,
            Field(None, description="Seed of the first image (the next ones count up); random."),
        ),
        num_images=(
            whole(ge=1, le=s.max_num_images),
            Field(1, description="Images to make from this prompt."),
        ),
        scheduler=(
            Literal[scheduler_names],  # type: ignore[valid-type]
            _model_default(
                s.default_scheduler, "Sampler (the model's family decides which apply)."
            ),
        ),
        async_=(
            bool,
            Field(False, alias="async", description="Answer 202 with a job at once."),
        ),
        **extra,
    )


# --- errors -------------------------------------------------------------------------------


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _field_schema(model: type[BaseModel] | None, name: str) -> dict[str, Any]:
    if model is None:
        return {}
    try:
        schema = model.model_json_schema()
    except Exception:  # a schema we cannot draw must not hide the error itself
        return {}
    prop = schema.get("properties", {}).get(name)
    if prop is None:  # a field of a nested object (``loras.0.weight``)
        prop = _nested_property(schema, name) or {}
    for candidate in (prop, *prop.get("anyOf", [])):
        if any(k in candidate for k in ("minimum", "maximum", "enum", "const")):
            return candidate
    return prop


def _nested_property(schema: Any, name: str) -> dict[str, Any] | None:
    """The schema of property ``name`` anywhere below ``schema`` (items, $defs)."""
    if isinstance(schema, dict):
        found = schema.get("properties", {}).get(name) if "properties" in schema else None
        if isinstance(found, dict):
            return found
        children: list[Any] = list(schema.values())
    elif isinstance(schema, list):
        children = schema
    else:
        return None
    for child in children:
        found = _nested_property(child, name)
        if found is not None:
            return found
    return None


def _message(error: dict[str, Any], field: str, model: type[BaseModel] | None) -> str:
    kind = error["type"]
    name = field.rsplit(".", 1)[-1]
    got = error.get("input")
    if kind in (
        "greater_than_equal",
        "less_than_equal",
        "greater_than",
        "less_than",
        "multiple_of",
    ):
        schema = _field_schema(model, name)
        low, high = schema.get("minimum"), schema.get("maximum")
        step = schema.get("multipleOf")
        rule = f"a multiple of {_number(step)} " if step else ""
        if low is not None and high is not None:
            return f"`{field}` must be {rule}from {_number(low)} to {_number(high)}, got {got}"
    if kind == "too_long" and isinstance(got, list):
        limit = error.get("ctx", {}).get("max_length")
        return f"`{field}` has {len(got)} items; the limit is {limit}"
    if kind in ("string_too_long", "too_long"):
        limit = error.get("ctx", {}).get("max_length")
        length = len(got) if isinstance(got, str) else "too many"
        return f"`{field}` has {length} characters; the limit is {limit}"
    if kind == "string_unicode":
        return f"`{field}` must be valid Unicode text (it contains a lone surrogate)"
    if kind == "string_too_short":
        return f"`{field}` must not be empty"
    if kind in ("literal_error", "enum"):
        allowed = _field_schema(model, name).get("enum")
        if allowed:
            shown = got if isinstance(got, str | int | float | bool) else type(got).__name__
            shown = _clip(shown) if isinstance(shown, str) else shown
            return f"`{field}` must be one of {', '.join(map(str, allowed))}, not {shown!r}"
    if kind == "finite_number" or (isinstance(got, float) and not math.isfinite(got)):
        return f"`{field}` must be a finite number"
    return f"`{field}`: {error['msg'].removeprefix('Value error, ')}"


def _clip(text: str, limit: int = 80) -> str:
    # Client-chosen names and values are echoed in errors: never a 60 KB name four times.
    return text if len(text) <= limit else text[:limit] + "..."


def invalid_request(
    exc: ValidationError, model: type[BaseModel] | None = None, prefix: str = ""
) -> InvalidRequest:
    """One 400 listing every error of ``exc``, each naming its field (``details.errors``)."""
    errors = []
    for error in exc.errors(include_url=False):
        field = _clip(prefix + (".".join(str(p) for p in error["loc"]) or "body"))
        errors.append({"field": field, "message": _message(error, field, model)})
    return InvalidRequest(
        "; ".join(e["message"] for e in errors),
        details={"field": errors[0]["field"], "errors": errors},
    )
