"""Automatic style/model choice for a prompt, with the reason it chose.

Each style (``artistic``, ``photographic``) has weighted cue words and phrases; the style whose
matched cues weigh most picks its Stable Diffusion checkpoint. When no cue decides (none matched,
or the leaders tie), the subject does: a make-believe subject (a throne, a ghost, something
giant or floating) means artwork, an everyday real-world one (boba, an F1 car, a kitchen) means
a photograph; only then the default style. A model the caller names always wins.

The cue and subject words are data: ``speech2image/data/style_lexicon.toml``, read with
``tomllib`` once per process, when the first chooser (or the settings' default) needs them.
Pure Python and stdlib only: ``config.py`` imports this module.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

__all__ = [
    "AUTO_MODEL",
    "DEFAULT_STYLE",
    "DEFAULT_STYLE_MODELS",
    "Lexicon",
    "StyleChoice",
    "StyleChooser",
    "SubjectGroup",
    "default_style_cues",
    "default_subjects",
    "load_lexicon",
    "matches_cue",
]

AUTO_MODEL = "auto"
DEFAULT_STYLE = "artistic"
DEFAULT_STYLE_MODELS: dict[str, str] = {
    "artistic": "dreamshaper",
    "photographic": "realistic-vision",
}
_PACKAGED = ("data", "style_lexicon.toml")  # the cue and subject words, in the package


@dataclasses.dataclass(frozen=True)
class SubjectGroup:
    """Subjects that point to a style when no style cue decides: ``label`` names them in reasons."""

    style: str
    label: str
    words: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Lexicon:
    """The words behind the choice: weighted cues of each style, and subject groups in order."""

    cues: dict[str, dict[str, float]]
    subjects: tuple[SubjectGroup, ...]


def load_lexicon(path: str | os.PathLike[str] | None = None) -> Lexicon:
    """Read a lexicon TOML file (``[cues.STYLE]`` tables, ``[[subjects]]``); None: the packaged one.

    Only the file's shape is checked here; `StyleChooser` validates the words and weights.
    """
    if path is None:
        source, name = resources.files("speech2image").joinpath(*_PACKAGED), "/".join(_PACKAGED)
    else:
        source, name = Path(path), str(path)
    with source.open("rb") as fh:
        data = tomllib.load(fh)
    cues = data.get("cues")
    if not isinstance(cues, dict) or not all(isinstance(c, dict) for c in cues.values()):
        raise ValueError(f"{name}: [cues.STYLE] tables of cue = weight are missing")
    subjects = []
    for group in data.get("subjects", []):
        if not (
            isinstance(group, dict)
            and isinstance(group.get("style"), str)
            and isinstance(group.get("label"), str)
            and isinstance(group.get("words"), list)
        ):
            raise ValueError(f"{name}: each [[subjects]] needs style, label and a words list")
        subjects.append(SubjectGroup(group["style"], group["label"], tuple(group["words"])))
    return Lexicon({style: dict(c) for style, c in cues.items()}, tuple(subjects))


@functools.cache
def _packaged_lexicon() -> Lexicon:
    return load_lexicon()


def default_style_cues() -> dict[str, dict[str, float]]:
    """The packaged cues of each style (a fresh copy; the file is read once per process)."""
    return {style: dict(cues) for style, cues in _packaged_lexicon().cues.items()}


def default_subjects() -> tuple[SubjectGroup, ...]:
    """The packaged subject groups, in the order they are consulted."""
    return _packaged_lexicon().subjects


_APOSTROPHES = re.compile(r"['\u2018\u2019`]")
_SEPARATORS = re.compile(r"[\s\-\u2010-\u2015_]+")
_CONSONANT_Y = re.compile(r"[^aeiou\d]y$")


def _normalize(text: str) -> str:
    """Lower-case text without apostrophes; hyphens, dashes and runs of space become one space."""
    return _SEPARATORS.sub(" ", _APOSTROPHES.sub("", text.casefold())).strip()


def _cue_pattern(cue: str) -> re.Pattern[str]:
    """Regex for a normalized cue: whole words, any spacing, simple inflections of the last word."""
    parts: list[str] = []
    words = cue.split(" ")
    for index, word in enumerate(words):
        if index == len(words) - 1:
            if _CONSONANT_Y.search(word):  # fairy -> fairies
                stem, suffix = word[:-1], "(?:y|ys|ies)"
            else:  # painting -> paintings, witch -> witches, sketch -> sketched
                stem, suffix = word, "(?:s|es|ed|ing)?"
        else:
            stem, suffix = word, ""
        chars = []
        for position, char in enumerate(stem):
            # "35mm" also matches "35 mm", "3d render" also "3 d render"
            if position and stem[position - 1].isdigit() and char.isalpha():
                chars.append(r"\s*")
            chars.append(re.escape(char))
        parts.append("".join(chars) + suffix)
    return re.compile(r"(?<!\w)" + r"\s+".join(parts) + r"(?!\w)")


def _number(value: float) -> str:
    """A weight or score as the reason writes it: 2.5, 1.0, 0.75."""
    return repr(round(value, 2))


def _cue_list(cues: list[tuple[str, float]]) -> str:
    """Cues as the reason lists them: 'photo' 1.5, 'dslr' 1.0."""
    return ", ".join(f"{cue!r} {_number(weight)}" for cue, weight in cues)


@dataclasses.dataclass(frozen=True)
class StyleChoice:
    """The model chosen for a prompt, the style behind it, the evidence and a readable reason."""

    model: str
    style: str | None
    explicit: bool
    scores: dict[str, float]
    matched: dict[str, list[tuple[str, float]]]
    reason: str
    subjects: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready dict; matched cues become lists of ``{"cue", "weight"}``."""
        return {
            "model": self.model,
            "style": self.style,
            "explicit": self.explicit,
            "scores": dict(self.scores),
            "matched": {
                style: [{"cue": cue, "weight": weight} for cue, weight in cues]
                for style, cues in self.matched.items()
            },
            "subjects": {label: list(words) for label, words in self.subjects.items()},
            "reason": self.reason,
        }


@dataclasses.dataclass(frozen=True)
class _Cue:
    style: str
    text: str  # as written in the cue table, shown in reasons
    key: str  # normalized, what is matched
    weight: float
    pattern: re.Pattern[str]


class StyleChooser:
    """Chooses a checkpoint for a prompt from weighted style cues, or takes the caller's model."""

    def __init__(
        self,
        cues: dict[str, dict[str, float]] | None = None,
        style_models: dict[str, str] | None = None,
        default_style: str = DEFAULT_STYLE,
        subjects: Sequence[SubjectGroup] | None = None,
    ) -> None:
        cues = default_style_cues() if cues is None else cues
        style_models = DEFAULT_STYLE_MODELS if style_models is None else style_models
        self._style_models = self._validate_models(style_models)
        self._cues = self._validate_cues(cues, self._style_models)
        if not isinstance(default_style, str) or default_style not in self._style_models:
            raise ValueError(
                f"default style {default_style!r} has no model in style_models "
                f"(styles with a model: {', '.join(map(repr, self._style_models))})"
            )
        self._default_style = default_style
        # Every style in one ordered list: styles with cues first, in the order given.
        self._styles = list(self._cues) + [s for s in self._style_models if s not in self._cues]
        order = {style: index for index, style in enumerate(self._styles)}
        compiled = [
            _Cue(style, text, _normalize(text), weight, _cue_pattern(_normalize(text)))
            for style, style_cues in self._cues.items()
            for text, weight in style_cues.items()
        ]
        # Longest phrases claim their words first: "oil painting" is not also "painting".
        compiled.sort(key=lambda c: (-c.key.count(" "), -len(c.key), order[c.style], c.key))
        self._compiled = compiled
        self._subjects = self._compile_subjects(subjects, {c.key for c in compiled})
        # One list of everything that claims words: (key, pattern, cue or None, subject label).
        matchers: list[tuple[str, re.Pattern[str], _Cue | None, str]] = [
            (c.key, c.pattern, c, "") for c in compiled
        ]
        matchers += [
            (key, pattern, None, group.label)
            for group, words in self._subjects
            for key, pattern in words
        ]
        matchers.sort(key=lambda m: (-m[0].count(" "), -len(m[0])))  # stable: cues first
        self._matchers = matchers

    def _compile_subjects(
        self, subjects: Sequence[SubjectGroup] | None, cue_keys: set[str]
    ) -> list[tuple[SubjectGroup, list[tuple[str, re.Pattern[str]]]]]:
        """Subject groups with their word patterns, longest first; a style cue is not a subject."""
        if subjects is None:  # the defaults serve the styles that have a model
            subjects = [g for g in default_subjects() if g.style in self._style_models]
        compiled = []
        seen: dict[str, str] = {}
        for group in subjects:
            if not isinstance(group, SubjectGroup) or group.style not in self._style_models:
                raise ValueError(
                    f"subject group {group!r} must be a SubjectGroup of a style with a model"
                )
            words = []
            for word in group.words:
                key = _normalize(word) if isinstance(word, str) else ""
                if not re.search(r"\w", key):
                    raise ValueError(
                        f"subject {word!r} of {group.label!r} has no letters or digits"
                    )
                if key in seen:
                    raise ValueError(
                        f"subject {key!r} is listed under both {seen[key]!r} and {group.label!r}"
                    )
                seen[key] = group.label
                if key not in cue_keys:  # a style cue claims the word
                    words.append((key, _cue_pattern(key)))
            compiled.append((group, words))
        return compiled

    @staticmethod
    def _validate_models(style_models: object) -> dict[str, str]:
        if not isinstance(style_models, Mapping) or not style_models:
            raise ValueError("style_models must map at least one style to a model name")
        models: dict[str, str] = {}
        for style, model in style_models.items():
            if not isinstance(style, str) or not style.strip():
                raise ValueError(f"style names must be non-empty strings, got {style!r}")
            if not isinstance(model, str) or not model.strip():
                raise ValueError(
                    f"the model name for style {style!r} must be a non-empty string, got {model!r}"
                )
            models[style] = model.strip()
        return models

    @staticmethod
    def _validate_cues(cues: object, style_models: dict[str, str]) -> dict[str, dict[str, float]]:
        if not isinstance(cues, Mapping) or not cues:
            raise ValueError("cues must map at least one style to its {cue: weight} dict")
        owner: dict[str, str] = {}
        validated: dict[str, dict[str, float]] = {}
        for style, style_cues in cues.items():
            if style not in style_models:
                raise ValueError(
                    f"style {style!r} has cues but no model in style_models "
                    f"(styles with a model: {', '.join(map(repr, style_models))})"
                )
            if not isinstance(style_cues, Mapping):
                raise ValueError(f"cues of style {style!r} must be a {{cue: weight}} dict")
            validated[style] = {}
            spelled: dict[str, str] = {}
            for cue, weight in style_cues.items():
                text = _normalize(cue) if isinstance(cue, str) else ""
                if not re.search(r"\w", text):
                    raise ValueError(
                        f"cue {cue!r} of style {style!r} is empty or has no letters or digits"
                    )
                if (
                    isinstance(weight, bool)
                    or not isinstance(weight, int | float)
                    or not math.isfinite(weight)
                    or weight <= 0
                ):
                    raise ValueError(
                        f"the weight of cue {cue!r} in style {style!r} must be a finite "
                        f"number > 0, got {weight!r}"
                    )
                if text in spelled:
                    raise ValueError(
                        f"cue {text!r} appears twice in style {style!r} "
                        f"(as {spelled[text]!r} and {cue!r})"
                    )
                if text in owner:
                    raise ValueError(
                        f"cue {text!r} is listed under both {owner[text]!r} and {style!r}; "
                        "a cue may belong to one style only"
                    )
                spelled[text] = cue
                owner[text] = style
                validated[style][cue.strip()] = float(weight)
        return validated

    @property
    def style_models(self) -> dict[str, str]:
        """The model of each style (a copy)."""
        return dict(self._style_models)

    @property
    def default_style(self) -> str:
        """The style used when no cue matches or the top styles tie."""
        return self._default_style

    def choose(self, prompt: str, requested_model: str | None = None) -> StyleChoice:
        """Choose the model for ``prompt``; a ``requested_model`` other than None/""/"auto" wins."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        if requested_model is not None and not isinstance(requested_model, str):
            raise TypeError(
                f"requested_model must be a string or None, got {type(requested_model).__name__}"
            )
        scores, matched, subjects = self._score(prompt)
        requested = (requested_model or "").strip()
        if requested and requested.casefold() != AUTO_MODEL:
            reason = f"the caller chose the model {requested!r}; automatic style choice skipped"
            return StyleChoice(requested, None, True, scores, matched, reason, subjects)
        style, reason = self._decide(scores, matched, subjects)
        return StyleChoice(
            self._style_models[style], style, False, scores, matched, reason, subjects
        )

    def _score(
        self, prompt: str
    ) -> tuple[dict[str, float], dict[str, list[tuple[str, float]]], dict[str, list[str]]]:
        """Weight per style, matched cues and subject words, each in the order they appear.

        Cues and subjects claim words together, longest phrase first: "latte art" is a drink,
        not the word "art", and "street photography" is a medium, not a street.
        """
        text = _normalize(prompt)
        claimed: list[tuple[int, int]] = []
        hits: dict[str, list[tuple[int, str, float]]] = {style: [] for style in self._styles}
        found: dict[str, list[tuple[int, str]]] = {group.label: [] for group, _ in self._subjects}
        for key, pattern, cue, label in self._matchers:
            spans = [
                m.span()
                for m in pattern.finditer(text)
                if not any(m.start() < end and start < m.end() for start, end in claimed)
            ]
            if not spans:
                continue
            claimed.extend(spans)  # each cue or subject counts once, however often it is said
            if cue is not None:
                hits[cue.style].append((spans[0][0], cue.text, cue.weight))
            else:
                found[label].append((spans[0][0], key))
        matched = {
            style: [(cue_text, weight) for _, cue_text, weight in sorted(cues)]
            for style, cues in hits.items()
        }
        scores = {
            style: round(math.fsum(weight for _, weight in cues), 6)
            for style, cues in matched.items()
        }
        subjects = {label: [key for _, key in sorted(words)] for label, words in found.items()}
        return scores, matched, subjects

    def _decide(
        self,
        scores: dict[str, float],
        matched: dict[str, list[tuple[str, float]]],
        subjects: dict[str, list[str]],
    ) -> tuple[str, str]:
        """The winning style and the sentence that explains it."""
        default = self._default_style
        top = max(scores.values())
        leaders = [style for style in self._styles if scores[style] == top]
        if top == 0:
            undecided = "no style cues matched"
        elif len(leaders) > 1:
            evidence = "; ".join(f"{style} {_cue_list(matched[style])}" for style in leaders)
            tied = " vs ".join(_number(top) for _ in leaders)
            undecided = f"{' and '.join(leaders)} cues tied ({tied}): {evidence}"
        else:
            return leaders[0], self._cue_reason(leaders[0], scores, matched)
        for group, _ in self._subjects:  # in priority order: make-believe before everyday
            words = subjects[group.label]
            if group.style in leaders and words:
                plural = "s" if len(words) > 1 else ""
                reason = (
                    f"{undecided}; {group.label} subject{plural} "
                    f"{', '.join(map(repr, words))} -> {group.style}"
                )
                others = [
                    f"{other.label} {', '.join(map(repr, subjects[other.label]))}"
                    for other, _ in self._subjects
                    if other is not group and subjects[other.label]
                ]
                if others:
                    reason += f" (over {'; '.join(others)})"
                return group.style, reason
        return default, f"{undecided}; using the default style, {default}"

    def _cue_reason(
        self, winner: str, scores: dict[str, float], matched: dict[str, list[tuple[str, float]]]
    ) -> str:
        """Why the one leading style won on its cues."""
        top = scores[winner]
        rivals = [s for s in self._styles if s != winner and self._cues.get(s)]
        if not rivals:
            return f"{winner} cues matched ({_number(top)}): {_cue_list(matched[winner])}"
        reason = (
            f"{winner} cues outweighed {' and '.join(rivals)} "
            f"({_number(top)} vs {', '.join(_number(scores[s]) for s in rivals)}): "
            f"{_cue_list(matched[winner])}"
        )
        for rival in rivals:
            if matched[rival]:
                reason += f"; {rival} had {_cue_list(matched[rival])}"
        return reason


def matches_cue(prompt: str, cue: str) -> bool:
    """True when ``prompt`` contains ``cue`` the way style cues match (whole words, inflections)."""
    key = _normalize(cue)
    return bool(key) and _cue_pattern(key).search(_normalize(prompt)) is not None
