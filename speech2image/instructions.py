"""A turn of a conversation in -> a new picture, or an edit of the current one composed from
the previous prompt and the instruction, with every change and its reason.

"make it night", "add a dog on the left", "without the car", "more like a watercolor",
"replace the cat with a fox": each is read as one operation (setting, add, remove, style,
replace) and applied to the previous prompt; what is removed goes to the negative prompt. The
strength fits the kind of change: a restyle or a change of light or season touches the whole
picture (high), a local change keeps most of it (lower). Typed German is glossed to English
first (``data/edit_gloss_de.toml``); spoken German is translated by Whisper before it gets
here. Pure Python, no HTTP, no model.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import tomllib
from pathlib import Path

from .prompting import Change, clean_request

__all__ = [
    "STRENGTHS",
    "ComposedEdit",
    "Instruction",
    "compose_edit",
    "gloss_german",
    "looks_german",
    "parse_instruction",
]

GLOSS_FILE = Path(__file__).parent / "data" / "edit_gloss_de.toml"

#: Strength by operation: global changes repaint the picture, local ones keep most of it.
STRENGTHS = {"style": 0.8, "setting": 0.7, "replace": 0.6, "add": 0.55, "remove": 0.5}

STYLES = (
    "watercolor",
    "watercolour",
    "oil painting",
    "pencil sketch",
    "sketch",
    "charcoal drawing",
    "pixel art",
    "anime",
    "cartoon",
    "comic",
    "photo",
    "photograph",
    "photorealistic",
    "3d render",
    "low poly",
    "ukiyo-e",
    "impressionist painting",
    "pop art",
    "line art",
    "stained glass",
    "claymation",
    "vintage poster",
    "neon",
    "cyberpunk",
    "black and white",
    "van gogh",
)
# Time of day, season, weather, light: one of each group holds at a time.
SETTINGS = {
    "time": ("night", "day", "daytime", "sunset", "sunrise", "dusk", "dawn", "noon", "midnight"),
    "season": ("winter", "summer", "autumn", "fall", "spring"),
    "weather": ("rainy", "snowy", "foggy", "stormy", "sunny", "cloudy", "misty"),
    "light": ("darker", "brighter", "dark", "bright", "moody", "golden hour"),
}
_SETTING_PHRASES = {
    "night": "at night",
    "day": "during the day",
    "daytime": "during the day",
    "midnight": "at midnight",
    "noon": "at noon",
    "sunset": "at sunset",
    "sunrise": "at sunrise",
    "dusk": "at dusk",
    "dawn": "at dawn",
    "winter": "in winter",
    "summer": "in summer",
    "autumn": "in autumn",
    "fall": "in autumn",
    "spring": "in spring",
}

_ART = r"(?:the|a|an|some|any|that|this|those|these|all\s+the)"
_IT = r"(?:it|this|the\s+(?:picture|image|scene|photo|whole\s+thing)|everything)"
_NEW = re.compile(
    r"^(?:(?:now|okay|ok|next|and\s+now)[, ]+)?(?:(?:start\s+over|new\s+(?:picture|image|one))"
    r"(?:[:,]?\s*(?:with|of)?\s*)|(?:a\s+)?new\s+(?:picture|image)\s+of\s+|"
    r"(?:instead\s+)?(?:draw|paint|create|generate|imagine|show\s+me|give\s+me|render)"
    r"(?:\s+me)?\s+(?:a\s+(?:new\s+)?(?:picture|image)\s+of\s+)?(?=(?:a|an|some|two|three|the)\b)"
    r"|something\s+(?:completely\s+|totally\s+)?different[:,]?\s*)",
    re.I,
)
_REPLACE = [
    re.compile(r"^(?:replace|swap|exchange)\s+(?P<old>.+?)\s+(?:with|for|by)\s+(?P<new>.+)$", re.I),
    re.compile(r"^(?:change|turn)\s+(?P<old>.+?)\s+(?:in)?to\s+(?P<new>.+)$", re.I),
    re.compile(r"^(?:make\s+it\s+)?(?P<new>.+?)\s+instead\s+of\s+(?P<old>.+)$", re.I),
    re.compile(r"^instead\s+of\s+(?P<old>.+?)[,]?\s+(?:use\s+|have\s+|put\s+)?(?P<new>.+)$", re.I),
    re.compile(r"^(?:use|put|have)\s+(?P<new>.+?)\s+instead\s+of\s+(?P<old>.+)$", re.I),
    re.compile(
        rf"^make\s+(?P<old>{_ART}\s+[\w\s-]+?)\s+(?P<new>(?:red|blue|green|yellow|black|white|"
        r"orange|purple|pink|brown|gold|golden|silver|gray|grey|bigger|smaller|larger|older|"
        r"younger)(?:\s+and\s+\w+)?)$",
        re.I,
    ),
]
_REMOVE = re.compile(
    rf"^(?:(?:please\s+)?(?:remove|delete|erase|drop|lose|get\s+rid\s+of|take\s+(?:away|out)|"
    rf"leave\s+out|no\s+more|without|no)\s+(?P<what>.+?)(?:\s+(?:please|from\s+{_IT}|"
    rf"from\s+the\s+\w+))?|make\s+it\s+without\s+(?P<what2>.+)|"
    r"(?:i\s+don'?t\s+want|there\s+should\s+be\s+no)\s+(?P<what3>.+?))$",
    re.I,
)
_ADD = re.compile(
    r"^(?:(?:please\s+)?(?:add|put|place|insert|include|draw|paint|give\s+it|"
    r"there\s+should\s+be|let\s+there\s+be|also(?:\s+add)?|and|plus|with)\s+(?P<what>.+?)"
    r"(?:\s+(?:too|as\s+well|also))?)$",
    re.I,
)
_STYLE = re.compile(
    rf"^(?:(?:make|turn|render|redo|paint|draw|do)\s+{_IT}\s+)?(?:(?:look\s+)?(?:more\s+)?"
    r"(?:like|as)\s+(?:an?\s+)?|in\s+(?:the\s+)?style\s+of\s+(?:an?\s+)?|(?:in|into)\s+(?:an?\s+)?|"
    r"more\s+)?(?P<style>.+?)(?:\s+style|\s+version)?$",
    re.I,
)
_SETTING = re.compile(
    rf"^(?:make\s+{_IT}\s+|make\s+it\s+(?:be\s+)?|(?:set|put)\s+{_IT}\s+(?:at|in)\s+|"
    rf"(?:change|turn)\s+{_IT}\s+(?:in)?to\s+|it\s+should\s+be\s+)?(?:more\s+)?"
    r"(?:at\s+|in\s+|during\s+(?:the\s+)?|a\s+)?(?P<setting>[\w\s]+?)(?:\s+time|\s+scene)?$",
    re.I,
)


_ASKING = re.compile(
    r"^(?:(?:ok(?:ay)?|so|now|well|then|right|hmm+|um+)[,.]?\s+)*"
    r"(?:(?:can|could|would|will)\s+you\s+(?:please\s+)?|please\s+)?|[,\s]+please$",
    re.I,
)


@dataclasses.dataclass(frozen=True)
class Instruction:
    """What a turn asks: a new picture, or one edit operation with its words."""

    decision: str  # "new" or "edit"
    operation: str  # "new", "add", "remove", "replace", "style", "setting"
    text: str  # the (English) instruction as read
    what: str = ""  # the thing added, removed or the new value
    old: str = ""  # replace: what is replaced
    why: str = ""


@dataclasses.dataclass(frozen=True)
class ComposedEdit:
    """The new prompt, negative prompt and strength, and each change with its reason."""

    decision: str
    operation: str
    prompt: str
    negative_prompt: str | None
    strength: float | None
    changes: list[Change]

    def as_dict(self) -> dict[str, object]:
        """JSON-ready."""
        return {
            "decision": self.decision,
            "operation": self.operation,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "strength": self.strength,
            "changes": [c.as_dict() for c in self.changes],
        }


@functools.cache
def _gloss() -> tuple[list[tuple[str, str]], dict[str, str]]:
    data = tomllib.loads(GLOSS_FILE.read_text(encoding="utf-8"))
    phrases = sorted(data["phrases"].items(), key=lambda kv: -len(kv[0]))
    return phrases, dict(data["words"])


_GERMAN_WORDS = re.compile(
    r"\b(?:mach|mache|füge|fuege|hinzu|entferne|ohne|ersetze|keine?n?|zeichne|stil|mehr\s+wie|"
    r"lösche|loesche|nimm|einen|einem|bitte)\b",
    re.I,
)
_GERMAN_WEAK = re.compile(r"\b(?:der|die|das|und|ein|eine|es|durch|als|im)\b", re.I)


def looks_german(text: str) -> bool:
    """Whether typed ``text`` reads as German: a German command word, two German function
    words, or an umlaut."""
    return bool(
        _GERMAN_WORDS.search(text)
        or len(_GERMAN_WEAK.findall(text)) >= 2
        or re.search(r"[äöüß]", text, re.I)
    )


def gloss_german(text: str) -> str:
    """A word-by-word English gloss of a typed German instruction (the data file's words)."""
    phrases, words = _gloss()
    out = " " + re.sub(r"[.!?]+$", "", text.strip().lower()) + " "
    for phrase, english in phrases:
        out = re.sub(rf"(?<=[\s,]){re.escape(phrase)}(?=[\s,])", english, out)
    tokens = [words.get(token, token) for token in out.split()]
    glossed = " ".join(t for t in tokens if t)
    # German puts the separable particle's object first: "remove the car" reads fine glossed;
    # "the car remove" (from "das Auto weg...") is turned round.
    glossed = re.sub(r"^(?:the|a)\s+(\w+)\s+remove$", r"remove the \1", glossed)
    # Verb-second German: "add a dog" comes out as "add a dog"; "in the style of" stays.
    glossed = re.sub(r"\binto\s+(?:the\s+)?(night|winter|summer|autumn|spring)\b", r"\1", glossed)
    return re.sub(r"\s+", " ", glossed).strip()


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().strip(".!?,;: ")).strip()


def _setting_word(value: str) -> tuple[str, str] | None:
    value = value.lower().strip()
    for group, words in SETTINGS.items():
        if value in words:
            return group, value
    return None


def _style_word(value: str) -> str | None:
    value = re.sub(r"^(?:an?|the)\s+", "", value.lower().strip())
    value = re.sub(r"\s+(?:painting|style)$", lambda m: m.group(0), value)
    for style in STYLES:
        if value == style or value in (f"{style} painting", f"{style} style", f"{style}s"):
            return style if value != f"{style} painting" else value
    if re.fullmatch(r"(?:painting|drawing|sketch|photo) by [\w .'-]+|[\w'-]+ painting", value):
        return value
    return None


def parse_instruction(text: str, *, has_image: bool = True) -> Instruction:
    """Read one English instruction: a new picture, or which edit it asks for.

    Speech often opens with something else ("Okay, listen. Add a boat."): when the whole
    does not read as an edit, its last sentence or clause that does is taken.
    """
    found = _parse_one(text, has_image=has_image)
    # Sentences, and clauses: Whisper often joins "Okay, listen, add a boat" with commas.
    sentences = [s for s in re.split(r"(?<=[.!?,;])\s+", text.strip()) if re.search(r"\w", s)]
    if found.decision == "new" and has_image and len(sentences) > 1:
        for sentence in reversed(sentences):
            one = _parse_one(sentence, has_image=True)
            if one.decision == "edit":
                return one
    return found


def _parse_one(text: str, *, has_image: bool) -> Instruction:
    cleaned, _ = clean_request(text)
    said = _norm(_ASKING.sub("", _norm(text)))
    line = _norm(cleaned) if cleaned.strip() else said
    if not has_image:
        return Instruction("new", "new", said, why="there is no picture yet to change")
    start = _NEW.match(said)
    if start:
        subject = _norm(said[start.end() :]) or line
        return Instruction("new", "new", subject, why="the turn asks for a new picture")
    for pattern in _REPLACE:
        m = pattern.match(said) or pattern.match(line)
        if m and re.fullmatch(_IT, _norm(m.group("old")), re.I):
            continue  # "turn it into autumn": the whole picture changes, not a thing in it
        if m and _norm(m.group("old")) and _norm(m.group("new")):
            old, new = _norm(m.group("old")), _norm(m.group("new"))
            return Instruction(
                "edit", "replace", said, new, old, why=f"asks to put {new!r} in place of {old!r}"
            )
    for candidate in (said, line):
        m = _SETTING.match(candidate)
        if m and _setting_word(m.group("setting")):
            value = m.group("setting").lower().strip()
            return Instruction("edit", "setting", said, value, why=f"changes the scene to {value}")
        m = _STYLE.match(candidate)
        if m and _style_word(m.group("style")):
            style = _style_word(m.group("style")) or ""
            return Instruction("edit", "style", said, style, why=f"restyles it as {style}")
    m = _REMOVE.match(said) or _REMOVE.match(line)
    if m:
        what = _norm(m.group("what") or m.group("what2") or m.group("what3") or "")
        if what:
            return Instruction("edit", "remove", said, what, why=f"asks for no {what}")
    m = _ADD.match(said) or _ADD.match(line)
    if m and _norm(m.group("what")):
        what = _norm(m.group("what"))
        return Instruction("edit", "add", said, what, why=f"asks to add {what}")
    # Not an edit phrase: a description of its own is a new picture.
    return Instruction("new", "new", line, why="no edit phrase: read as a new description")


def _bare(thing: str) -> str:
    return re.sub(rf"^{_ART}\s+", "", thing.strip(), flags=re.I)


def _strip_term(prompt: str, term: str) -> tuple[str, bool]:
    """``prompt`` without ``term`` (whole words, with an article before it)."""
    pattern = re.compile(
        rf"(?:,\s*)?\b(?:(?:with|and|plus)\s+)?(?:{_ART}\s+)?{re.escape(term)}\b", re.I
    )
    found = pattern.search(prompt)
    if not found:
        return prompt, False
    out = prompt[: found.start()] + prompt[found.end() :]
    out = re.sub(r"\s+,", ",", re.sub(r"\s{2,}", " ", out)).strip(" ,")
    return out, True


def _add_negative(negative: str | None, item: str) -> str:
    parts = [p.strip() for p in (negative or "").split(",") if p.strip()]
    if item.casefold() not in {p.casefold() for p in parts}:
        parts.append(item)
    return ", ".join(parts)


def compose_edit(
    previous_prompt: str, previous_negative: str | None, instruction: Instruction
) -> ComposedEdit:
    """The next prompt from the previous one and ``instruction``, every change with why."""
    prompt, negative = previous_prompt.strip(), previous_negative
    changes: list[Change] = []
    op = instruction.operation
    if instruction.decision == "new":
        text, cleaned = clean_request(instruction.text)
        changes.extend(cleaned)
        changes.append(Change("new", previous_prompt, _norm(text), instruction.why))
        return ComposedEdit("new", "new", _norm(text), None, None, changes)
    what = instruction.what
    if op == "remove":
        item = _bare(what)
        prompt, found = _strip_term(prompt, item)
        if found:
            changes.append(Change("remove", item, "", "taken out of the prompt"))
        negative = _add_negative(negative, item)
        changes.append(Change("negative", what, item, "what should be gone goes to the negative"))
    elif op == "add":
        prompt = f"{prompt}, {what}"
        changes.append(Change("add", "", what, instruction.why))
        item = _bare(re.sub(r"\s+(?:on|in|at|to|next|by|near)\b.*$", "", what))
        if negative:
            kept = [
                p
                for p in negative.split(",")
                if p.strip() and p.strip().casefold() != item.casefold()
            ]
            if len(kept) != len([p for p in negative.split(",") if p.strip()]):
                changes.append(Change("negative", item, "", "asked for again: no longer excluded"))
            negative = ", ".join(p.strip() for p in kept) or None
    elif op == "replace":
        old, new = _bare(instruction.old), _bare(what)
        replaced, found = re.subn(rf"\b{re.escape(old)}\b", new, prompt, count=1, flags=re.I)
        if found:
            prompt = replaced
            changes.append(Change("replace", old, new, instruction.why))
        else:
            prompt = f"{prompt}, {new}"
            changes.append(Change("add", "", new, f"{old!r} is not in the prompt: {new!r} added"))
        negative = _add_negative(negative, old)
        changes.append(Change("negative", "", old, "the replaced thing should not come back"))
    elif op == "style":
        for style in STYLES:
            stripped, found = _strip_term(prompt, f"{style} style")
            if not found:
                stripped, found = _strip_term(prompt, style)
            if found and style != what:
                changes.append(Change("style", style, "", "the previous style gives way"))
                prompt = stripped
        prompt = f"{prompt}, {what} style" if "style" not in what else f"{prompt}, {what}"
        changes.append(Change("style", "", f"{what} style", instruction.why))
    elif op == "setting":
        group = _setting_word(what)
        assert group is not None
        for word in SETTINGS[group[0]]:
            phrase = _SETTING_PHRASES.get(word, word)
            for term in (phrase, word):
                stripped, found = _strip_term(prompt, term)
                if found:
                    changes.append(Change("setting", term, "", f"{what} replaces {word}"))
                    prompt = stripped
                    break
        phrase = _SETTING_PHRASES.get(what, what)
        prompt = f"{prompt}, {phrase}"
        changes.append(Change("setting", "", phrase, instruction.why))
    return ComposedEdit("edit", op, _norm(prompt), negative or None, STRENGTHS[op], changes)
