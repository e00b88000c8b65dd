"""Moderation, on by default: prompts before any model work, images after generation.

Prompts (typed, spoken, composed) go through :func:`check_prompt`: glin-profanity's
maintained word lists plus the operator's own terms (``S2I_MODERATION_TERMS``), matched on
word boundaries after undoing the usual evasions (case, spacing such as ``f u c k``, leetspeak,
look-alike Unicode letters). A blocked prompt is 400 ``moderation_blocked``.

Images go through the diffusers ``StableDiffusionSafetyChecker`` when its weights are present
(``S2I_MODERATION_SAFETY_CHECKER``: a folder with ``safety_checker/`` and
``feature_extractor/``, the layout of an SD 1.x checkpoint). A flagged image is never stored
or served; the answer counts it in ``filtered``. ``S2I_MODERATION_IMAGE_ADJUSTMENT`` is added
to every concept score (positive: stricter; large: everything is flagged, which tests use).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from flask import current_app, has_app_context
from prometheus_client import Counter
from werkzeug.exceptions import BadRequest

from .errors import ServiceError

__all__ = ["Moderation", "ModerationBlocked", "check_prompt", "get_moderation"]

log = logging.getLogger(__name__)


class ModerationBlocked(ServiceError, BadRequest):
    """The request's prompt is against the content policy."""

    error = "moderation_blocked"


class Moderation:
    """The content policy of one deployment: prompt words and the image safety checker."""

    def __init__(self, settings: Any, registry: Any = None) -> None:
        self.check_prompts = settings.moderation_prompts
        self.check_images = settings.moderation_images
        self.terms = [t for t in settings.moderation_terms if t]
        self.checker_dir: Path | None = settings.moderation_safety_checker
        self.adjustment = settings.moderation_image_adjustment
        self._filter: Any = None
        self._checker: Any = None
        self._lock = threading.Lock()
        self.blocked = Counter(
            "s2i_moderation_blocked",
            "Prompts refused and images withheld by moderation.",
            ["check"],
            registry=registry,
        )

    def init_app(self, app: Any) -> None:
        """Store on the app as ``app.extensions['moderation']``."""
        app.extensions["moderation"] = self

    # --- prompts -------------------------------------------------------------------------
    def _word_filter(self) -> Any:
        with self._lock:
            if self._filter is None:
                from glin_profanity import Filter

                self._filter = Filter(
                    {
                        "languages": ["english"],
                        "word_boundaries": True,
                        "detect_leetspeak": True,
                        "normalize_unicode": True,
                        "custom_words": self.terms,
                    }
                )
            return self._filter

    def prompt_problem(self, text: str) -> list[str]:
        """The policy's words found in ``text`` (empty: allowed)."""
        if not self.check_prompts or not text or not text.strip():
            return []
        found = self._word_filter().check_profanity(text)
        return list(found.get("profane_words") or []) if found["contains_profanity"] else []

    def check_prompt(self, text: str | None, field: str = "prompt") -> None:
        """400 ``moderation_blocked`` when ``text`` is against the policy."""
        words = self.prompt_problem(text or "")
        if words:
            self.blocked.labels("prompt").inc()
            log.info("moderation blocked a %s (%d term(s))", field, len(words))
            raise ModerationBlocked(
                f"the {field} is against the content policy; rephrase it",
                details={"field": field},
            )

    # --- images --------------------------------------------------------------------------
    def _safety_checker(self) -> Any:
        with self._lock:
            if self._checker is None:
                assert self.checker_dir is not None
                from diffusers.pipelines.stable_diffusion.safety_checker import (
                    StableDiffusionSafetyChecker,
                )
                from transformers import CLIPImageProcessor

                from .model_loader import MODEL_LOAD_LOCK

                with MODEL_LOAD_LOCK:  # never beside another load (meta-device tensors)
                    model = StableDiffusionSafetyChecker.from_pretrained(
                        self.checker_dir / "safety_checker"
                    ).eval()
                if self.adjustment:  # a lower threshold is a higher score
                    model.concept_embeds_weights.data -= self.adjustment
                    model.special_care_embeds_weights.data -= self.adjustment
                processor = CLIPImageProcessor.from_pretrained(
                    self.checker_dir / "feature_extractor"
                )
                self._checker = (model, processor)
            return self._checker

    def image_flags(self, images: list[Any]) -> list[bool]:
        """For each PIL image, whether the safety checker flags it (all False when off)."""
        if not self.check_images or self.checker_dir is None or not images:
            return [False] * len(images)
        import numpy as np
        import torch

        model, processor = self._safety_checker()
        with self._lock, torch.no_grad():  # one checker, used by one thread at a time
            clip_input = processor(images, return_tensors="pt").pixel_values
            arrays = [np.asarray(image, dtype=np.float32) / 255.0 for image in images]
            _, flags = model(clip_input=clip_input.to(model.dtype), images=arrays)
        return [bool(f) for f in flags]

    def keep_safe(self, images: list[Any]) -> tuple[list[int], int]:
        """Indexes of the images to keep, and how many were withheld."""
        flags = self.image_flags(images)
        withheld = sum(flags)
        if withheld:
            self.blocked.labels("image").inc(withheld)
            log.info("moderation withheld %d of %d image(s)", withheld, len(images))
        return [i for i, flagged in enumerate(flags) if not flagged], withheld


def get_moderation(app: Any = None) -> Moderation | None:
    """The app's moderation service (None when the app has none)."""
    app = app or (current_app if has_app_context() else None)
    return None if app is None else app.extensions.get("moderation")


def check_prompt(text: str | None, field: str = "prompt", app: Any = None) -> None:
    """The one prompt check every kind calls (typed, spoken, composed): 400
    ``moderation_blocked`` when ``text`` is against the policy; nothing when moderation is off."""
    moderation = get_moderation(app)
    if moderation is not None:
        moderation.check_prompt(text, field)
