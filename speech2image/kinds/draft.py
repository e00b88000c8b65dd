"""The draft kind: a few-step, small image at a fixed seed, drawn while a person speaks.

A draft is a generation below every other job: the runner starts it only when nothing of a
higher priority waits, it is never merged with full-quality requests, and it has its own
admission limit (``S2I_DRAFTS_MAX_ACTIVE``, see ``api/drafts.py``), so drafts never starve
other users.
"""

from __future__ import annotations

from typing import Any

from ..image_service import PreparedImage
from ..jobs.kinds import Schedule
from .generate import GenerateKind

__all__ = ["DRAFT_PRIORITY", "DraftKind"]

DRAFT_PRIORITY = -1


class DraftKind(GenerateKind):
    """A generation at the lowest priority, merged only with other drafts."""

    name = "draft"

    def schedule(self, work: PreparedImage) -> Schedule:
        """The chosen model's queue, after everything else."""
        schedule = super().schedule(work)
        key: Any = ("draft", schedule.batch_key)
        return Schedule(
            model=schedule.model,
            batch_key=key,
            images=schedule.images,
            steps=schedule.steps,
            priority=DRAFT_PRIORITY,
        )
