"""Spoken request in -> image prompt out: translation, framing and fillers, spoken negatives.

People talk to the app the way they talk to a person: "um, can you draw me a lighthouse on a
cliff, but without any people". Stable Diffusion reads English tags, and what should be absent
belongs in the negative prompt. Each step here records what it changed and why, so the answer
can show it. Pure Python, no HTTP, no model: Whisper's translation is done by the speech
service and handed in.
"""

from __future__ import annotations

import dataclasses
import re

__all__ = [
    "Change",
    "SpokenPrompt",
    "UnderstandSteps",
    "clean_request",
    "extract_negatives",
    "language_name",
    "merge_negatives",
    "understand_speech",
]


@dataclasses.dataclass(frozen=True)
class UnderstandSteps:
    """Which steps of spoken-prompt understanding run for one request (all by default)."""

    translate: bool = True
    clean: bool = True
    negatives: bool = True


@dataclasses.dataclass(frozen=True)
class Change:
    """One edit: the rule that made it, the words before and after, and why."""

    rule: str
    before: str
    after: str
    why: str

    def as_dict(self) -> dict[str, str]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class SpokenPrompt:
    """What was heard, each change made to it, and the prompts that result."""

    transcript: str
    language: str | None
    translated: bool
    changes: list[Change]
    prompt: str
    negative_prompt: str | None

    def as_dict(self) -> dict[str, object]:
        """The ``prompt_from_speech`` object of a /speech-to-image answer."""
        return {
            "transcript": self.transcript,
            "language": self.language,
            "translated": self.translated,
            "changes": [change.as_dict() for change in self.changes],
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
        }


# Names for the reason of a translation; other languages are shown by their code.
_LANGUAGE_NAMES = {
    "ar": "Arabic",
    "de": "German",
    "es": "Spanish",
    "fr": "French",
    "hi": "Hindi",
    "it": "Italian",
    "ja": "Japanese",
    "ko": "Korean",
    "nl": "Dutch",
    "pl": "Polish",
    "pt": "Portuguese",
    "ru": "Russian",
    "sv": "Swedish",
    "tr": "Turkish",
    "uk": "Ukrainian",
    "vi": "Vietnamese",
    "zh": "Chinese",
}


def language_name(code: str | None) -> str:
    """'German (de)' for a known code, the code itself otherwise."""
    if not code:
        return "an unknown language"
    name = _LANGUAGE_NAMES.get(code)
    return f"{name} ({code})" if name else repr(code)


# --- framing and fillers ------------------------------------------------------------------

_FILLER = r"(?:u+m+|u+h+m*|e+r+m+|e+r+|hm+|m{2,}|a+h+|e+h+)"
# Interjections that open a request ("Okay, so, ..."); removed only when a comma follows.
_INTERJECTION = (
    r"(?:ok(?:ay)?|so|well|alright|all right|right|hey|hi|hello|yeah|yes|oh|now|"
    r"hey there|hi there|you know|i mean|like|basically|actually)"
)
_INTERJECTION_WHY = "an interjection that opens the request, not part of the picture"
_BARE_INTERJECTION = re.compile(rf"{_INTERJECTION}(?:\s+{_INTERJECTION})*\s+", re.I)
_POLITE = r"(?:please|kindly)"
_ME = r"(?:\s+(?:me|us|for\s+me|for\s+us))?"
# Generic request verbs: they say "make an image", nothing about the medium.
_VERB = (
    r"(?:draw|make|create|generate|render|produce|design|imagine|visuali[sz]e|show|give|"
    r"get|do|come\s+up\s+with|whip\s+up|conjure(?:\s+up)?)"
)
# Verbs that name a medium: the medium is kept as a noun so the style choice still sees it.
_MEDIUM_VERBS = {"paint": "a painting of", "sketch": "a sketch of", "photograph": "a photo of"}
_MEDIUM_VERB = r"(?:paint|sketch|photograph)"
# Neutral words for "an image"; a medium ("a photo of", "a painting of") is kept.
_MEDIA = r"(?:an?\s+)?(?:image|picture|pic|drawing|artwork|art|render)s?(?:\s+(?:of|showing|with))"
_DETERMINER = (
    r"(?:a|an|the|some|two|three|four|five|six|many|several|my|our|your|his|her|their|this|"
    r"that|these|those|one|lots|dozens|\d+)\b"
)
_I_WISH = r"(?:i\s+(?:want|need|wanna)|i(?:'d|\s+d|\s+would)\s+(?:like|love)|i'?m\s+hoping\s+for)"
_ASK = (
    rf"(?:(?:can|could|would|will)\s+you|would\s+you\s+(?:mind|be\s+able\s+to)|"
    rf"are\s+you\s+able\s+to|{_I_WISH}\s+(?:you\s+)?to|please)"
)
_WISH = (
    rf"(?:{_I_WISH}(?:\s+to\s+(?:see|have|get))?|let\s+me\s+see|"
    r"let'?s\s+(?:see|have|get|do|make|draw)|how\s+about|what\s+about|give\s+me|show\s+me|"
    r"i'?m\s+(?:thinking|imagining)\s+(?:of|about)|picture\s+this|imagine\s+this)"
)

_LEADING: list[tuple[str, re.Pattern[str], str, bool]] = [
    (
        "filler",
        re.compile(rf"{_FILLER}\b[,.!?]*\s*", re.I),
        "a spoken filler, not part of the picture",
        False,
    ),
    (
        "filler",
        re.compile(rf"{_INTERJECTION}(?:\s+{_INTERJECTION})*\s*[,!.]+\s*", re.I),
        _INTERJECTION_WHY,
        False,
    ),
    (
        "framing",
        re.compile(
            rf"(?:{_POLITE}[,\s]+)?(?:{_ASK}\s+)?(?:{_POLITE}[,\s]+)?{_MEDIUM_VERB}{_ME}"
            rf"(?:\s+{_MEDIA})?(?=\s+{_DETERMINER}|\s+{_MEDIA})\s*",
            re.I,
        ),
        "request framing addressed to the app; the verb names a medium, kept as a noun",
        True,
    ),
    (
        "framing",
        re.compile(
            rf"(?:{_POLITE}[,\s]+)?(?:{_ASK}\s+)?(?:{_POLITE}[,\s]+)?{_VERB}{_ME}"
            rf"(?:\s+{_MEDIA})?(?=\s+{_DETERMINER}|\s+{_MEDIA}|\s+\w+s\b)\s*",
            re.I,
        ),
        "request framing addressed to the app, not a description of the picture",
        False,
    ),
    (
        "framing",
        re.compile(rf"(?:{_POLITE}[,\s]+)?{_WISH}(?:\s+{_MEDIA})?[,:]?\s+", re.I),
        "request framing addressed to the app, not a description of the picture",
        False,
    ),
]
_POLITE_ANYWHERE = re.compile(
    r"[,\s]*\b(?:please|kindly|thank\s+you(?:\s+(?:so|very)\s+much)?|thanks(?:\s+a\s+lot)?|"
    r"if\s+you\s+(?:can|could|would|don'?t\s+mind)|for\s+me)\b(?=\s*(?:[,.!?;]|$))",
    re.I,
)
_FILLER_ANYWHERE = re.compile(rf"(?<=[\s,])(?:{_FILLER}|you\s+know|i\s+mean)(?=\s*[,.!?])", re.I)
_QUESTION_TAIL = re.compile(r"[,\s]*\b(?:ok(?:ay)?|right|yeah|alright)\s*\?\s*$", re.I)
_SENTENCE_START = re.compile(r"(?:^|(?<=[.!?])\s+)")


def _tidy(text: str) -> str:
    """Whitespace and punctuation left behind by a removal, put straight."""
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    text = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", text)  # ", ," -> ","
    text = re.sub(r"[,;:]\s*([.!?])", r"\1", text)  # ", ." -> "."
    text = re.sub(r"^[\s,;:.!?]+", "", text)
    text = re.sub(r"[\s,;:]+$", "", text)
    return text.strip()


def _strip_end(text: str) -> str:
    """A prompt is not a sentence: drop the final full stop or question mark."""
    return re.sub(r"[\s.!?]+$", "", text)


def _leading(text: str) -> tuple[str, re.Match[str], str, bool] | None:
    """The first filler, interjection or framing rule that matches at the start of ``text``."""
    for rule, pattern, why, names_medium in _LEADING:
        match = pattern.match(text)
        if match and match.end() > 0:
            return rule, match, why, names_medium
    return None


def clean_request(text: str) -> tuple[str, list[Change]]:
    """Remove request framing ("can you draw me"), politeness and fillers; unchanged if none."""
    changes: list[Change] = []
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]
    kept: list[str] = []
    for sentence in sentences:
        rest = sentence
        while True:  # "Um, okay, so could you please draw me ..."
            found = _leading(rest)
            if found is None:
                # "Okay so I want ...", "Hey um could you ...": an interjection without a comma
                # goes only when framing or a filler follows it.
                bare = _BARE_INTERJECTION.match(rest)
                if bare is None or _leading(rest[bare.end() :]) is None:
                    break
                changes.append(Change("filler", bare.group(0).strip(), "", _INTERJECTION_WHY))
                rest = rest[bare.end() :]
                continue
            rule, match, why, names_medium = found
            removed = match.group(0).strip()
            after = ""
            if names_medium:
                verb = re.search(rf"\b{_MEDIUM_VERB}\b", removed, re.I)
                after = _MEDIUM_VERBS[verb.group(0).lower()] if verb else ""
            changes.append(Change(rule, removed.rstrip(",:"), after, why))
            rest = (after + " " if after else "") + rest[match.end() :]
            if after:  # a medium noun now leads: stop there
                break
        for match in list(_FILLER_ANYWHERE.finditer(rest)):
            changes.append(Change("filler", match.group(0), "", "a spoken filler"))
        rest = _FILLER_ANYWHERE.sub("", rest)
        for match in list(_POLITE_ANYWHERE.finditer(rest)):
            changes.append(
                Change(
                    "framing",
                    match.group(0).strip(" ,"),
                    "",
                    "politeness addressed to the app, not part of the picture",
                )
            )
        rest = _POLITE_ANYWHERE.sub("", rest)
        tail = _QUESTION_TAIL.search(rest)
        if tail:
            changes.append(
                Change("filler", tail.group(0).strip(" ,?"), "", "a question tag, not a picture")
            )
            rest = rest[: tail.start()]
        if _tidy(rest) and re.search(r"\w", rest):
            kept.append(rest)
    if not changes:
        return text, []
    return _strip_end(_tidy(" ".join(kept))), changes


# --- spoken negatives ---------------------------------------------------------------------

# Negations that may start anywhere ("a street with no cars"), and those that only start a
# clause ("..., no text", "but not blurry"): a prompt that begins "No parking sign" keeps it.
_NEG_ANYWHERE = (
    r"(?:with\s+no|without(?:\s+any)?|(?:and\s+)?(?:please\s+)?(?:don'?t|do\s+not)\s+"
    r"(?:want|include|show|add|put|draw|make|have|use)(?:\s+(?:in|any|there))?|"
    r"make\s+sure\s+there\s+(?:is|are)\s+no|leave\s+out|free\s+of|minus)"
)
_NEG_CLAUSE = r"(?:(?:but\s+|and\s+)?(?:please\s+)?(?:no|not|nothing|never|avoid|no\s+more)|nor)"
_NEG_END = (
    r"(?=\s*[,.;!?]|\s*$|\s+but\s|\s+with\s|\s+while\s|\s+though\s|"
    r"\s+and\s+(?:a|an|the|with|in|on|at|make|it|its|it's|have|has)\b)"
)
_NEGATIVE = re.compile(
    rf"(?:(?<=[\s,])(?:but\s+|and\s+)?{_NEG_ANYWHERE}|"
    rf"(?:(?<=[,;.!?])\s*|(?<=\s)(?=(?:but|and)\s))(?:but\s+|and\s+)?{_NEG_CLAUSE})"
    rf"\s+(?P<what>[^,.;!?]+?){_NEG_END}",
    re.I,
)
_ARTICLE = re.compile(r"^(?:any|a|an|the|some|other|more|of\s+the|of)\s+", re.I)
_NEG_TAIL = re.compile(
    r"\s+(?:in\s+(?:it|the\s+(?:picture|image|photo|shot|scene|frame))|at\s+all|please|"
    r"whatsoever|anywhere|either|around)$",
    re.I,
)


def _plausible_negative(item: str) -> bool:
    """A short thing to leave out, not a clause that goes on ("fear facing a dragon")."""
    words = item.split()
    return len(words) <= 5 and not any(w.lower().endswith("ing") for w in words[1:])


def extract_negatives(text: str) -> tuple[str, list[str], list[Change]]:
    """Move spoken negatives ("without people", "no text") out of ``text``; unchanged if none."""
    negatives: list[str] = []
    changes: list[Change] = []
    pieces: list[str] = []
    last = 0
    for match in _NEGATIVE.finditer(text):
        what = _NEG_TAIL.sub("", match.group("what").strip())
        items = [
            _NEG_TAIL.sub("", _ARTICLE.sub("", item.strip()))
            for item in re.split(r"\s*,\s*|\s+(?:or|and|nor)\s+(?:no\s+|any\s+)?", what)
        ]
        items = [item for item in items if re.search(r"\w", item)]
        if not items or any(not _plausible_negative(item) for item in items):
            continue  # "a knight without fear facing a dragon" describes, it does not exclude
        pieces.append(text[last : match.start()])
        last = match.end()
        negatives.extend(items)
        listed = ", ".join(map(repr, items))
        changes.append(
            Change(
                "negative",
                match.group(0).strip(" ,"),
                "",
                f"a spoken negative: {listed} moved to the negative prompt",
            )
        )
    if not changes:
        return text, [], []
    pieces.append(text[last:])
    prompt = _strip_end(_tidy("".join(pieces)))
    if not re.search(r"\w", prompt):  # nothing would be left to draw: keep the words
        return text, [], []
    return prompt, negatives, changes


def merge_negatives(caller: str | None, spoken: list[str]) -> str | None:
    """The caller's negative prompt first, then spoken negatives it does not already hold."""
    parts = [caller.strip()] if caller and caller.strip() else []
    seen = {p.strip().casefold() for p in (caller or "").split(",") if p.strip()}
    for item in spoken:
        if item.casefold() not in seen:
            seen.add(item.casefold())
            parts.append(item)
    return ", ".join(parts) or None


def understand_speech(
    transcript: str,
    language: str | None,
    *,
    translation: str | None = None,
    clean: bool = True,
    negatives: bool = True,
    negative_prompt: str | None = None,
) -> SpokenPrompt:
    """Turn a transcript (and Whisper's English ``translation`` of it, if any) into prompts."""
    changes: list[Change] = []
    text = transcript.strip()
    translated = translation is not None
    if translation is not None:
        english = translation.strip()
        changes.append(
            Change(
                "translate",
                text,
                english,
                f"spoken in {language_name(language)}; Whisper translated it to English, "
                "the language Stable Diffusion's text encoder reads",
            )
        )
        text = english
    if clean:
        text, found = clean_request(text)
        changes.extend(found)
    spoken: list[str] = []
    if negatives:
        text, spoken, found = extract_negatives(text)
        changes.extend(found)
    return SpokenPrompt(
        transcript=transcript,
        language=language,
        translated=translated,
        changes=changes,
        prompt=text,
        negative_prompt=merge_negatives(negative_prompt, spoken),
    )
