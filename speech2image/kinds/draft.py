"""The draft kind: a few-step, small image at a fixed seed, drawn while a person speaks.

A draft is a generation below every other job: the runner starts it only when nothing of a
higher priority waits, it is never merged with full-quality requests, and it has its own
admission limit (``S2I_DRAFTS_MAX_ACTIVE``, see ``api/drafts.py``), so drafts never starve
other users. A draft is not kept: its picture comes back inline in the job's result (a small
PNG in base64), never in the history or the image store.
"""

from __future__ import annotations

import base64
import io
import logging
from typing import Any

from ..engines.diffusers_sd import GenerationCancelled
from ..errors import ServiceError
from ..image_service import PreparedImage
from ..jobs import Job
from ..jobs.kinds import Schedule
from ._progress import elapsed, previews_for, progress_all, queued_seconds
from .generate import GenerateKind

__all__ = ["DRAFT_PRIORITY", "DraftKind"]

DRAFT_PRIORITY = -1

log = logging.getLogger(__name__)


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

    def run(self, jobs: list[Job]) -> None:
        """Draw a batch of drafts; each result carries its picture inline (nothing stored)."""
        items: list[PreparedImage] = [job.work for job in jobs]
        try:
            progress_all(jobs, "generating", 0, items[0].request.steps)
            with previews_for(jobs, items, self.previewer):
                output = self.images.run_batch(
                    items,
                    on_step=lambda done, total: progress_all(jobs, "generating", done, total),
                )
        except GenerationCancelled:
            for job in jobs:
                job.mark_cancelled()
            return
        for job, item, pictures, error in zip(
            jobs, items, output.images, output.errors, strict=True
        ):
            if job.cancel_requested:
                job.mark_cancelled()
                continue
            if error is not None:
                if not isinstance(error, ServiceError):
                    log.error("draft %s failed: %s", job.id, error)
                job.fail(error)
                continue
            buffer = io.BytesIO()
            pictures[0].save(buffer, format="PNG")
            request = item.request
            job.succeed(
                {
                    "draft": True,
                    "prompt": request.prompt,
                    "model": item.choice.model,
                    "seed": request.seed,
                    "width": request.width,
                    "height": request.height,
                    "steps": request.steps,
                    "b64_png": base64.b64encode(buffer.getvalue()).decode(),
                    "queued_seconds": queued_seconds(job),
                    "total_seconds": elapsed(job),
                }
            )
