"""The generate kind: a validated image request in, stored images out; batched."""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

from ..engines.diffusers_sd import GenerationCancelled
from ..engines.previews import Previewer
from ..errors import ServiceError
from ..image_service import ImageRequest, ImageService, PreparedImage, model_key
from ..jobs import Job
from ..jobs.kinds import JobKind, Schedule
from ..style import StyleChoice
from ._progress import elapsed, previews_for, progress_all, queued_seconds, store_retrying

__all__ = ["GenerateKind", "image_work", "image_work_document"]

log = logging.getLogger(__name__)


def image_work_document(item: PreparedImage) -> dict[str, Any]:
    """A prepared request as JSON: every default resolved (the seed too) and the choice."""
    return {"request": dataclasses.asdict(item.request), "choice": dataclasses.asdict(item.choice)}


def image_work(images: ImageService, document: dict[str, Any]) -> PreparedImage:
    """The prepared request of :func:`image_work_document` (older rows: chosen again)."""
    request = ImageRequest(**document["request"])
    if "choice" not in document:  # a row written before the choice was part of the work
        return images.prepare(request)
    choice = dict(document["choice"])
    choice["matched"] = {
        style: [tuple(cue) for cue in cues] for style, cues in choice["matched"].items()
    }
    return PreparedImage(request, StyleChoice(**choice))


class GenerateKind(JobKind):
    """Generate images; compatible requests share one pipeline call."""

    name = "generate"

    def __init__(self, images: ImageService) -> None:
        self.images = images
        self.previewer = Previewer.from_settings(images.settings)

    def schedule(self, work: PreparedImage) -> Schedule:
        """The chosen model's queue; merged with requests of an equal batch key."""
        return Schedule(
            model=model_key(work.choice.model),
            batch_key=work.batch_key(),
            images=work.request.num_images,
            steps=work.request.steps,
        )

    def prompts(self, work: PreparedImage) -> list[str]:
        """The typed prompt."""
        return [work.request.prompt]

    def estimate_usage(self, work: PreparedImage) -> dict[str, float]:
        """Its images and pixel-steps, known from the validated request."""
        r = work.request
        return {"images": r.num_images, "pixel_steps": r.width * r.height * r.steps * r.num_images}

    def dump(self, work: PreparedImage) -> dict[str, Any]:
        """The validated request and the model choice."""
        return image_work_document(work)

    def load(self, document: dict[str, Any]) -> PreparedImage:
        """The prepared request of a document."""
        return image_work(self.images, document)

    def run(self, jobs: list[Job]) -> None:
        """Generate a batch of compatible requests in one pipeline call, then store each."""
        images = self.images
        items: list[PreparedImage] = [job.work for job in jobs]
        try:
            progress_all(jobs, "generating", 0, items[0].request.steps)  # stage known at once
            with previews_for(jobs, items, self.previewer):
                output = images.run_batch(
                    items,
                    on_step=lambda done, total: progress_all(jobs, "generating", done, total),
                )
        except GenerationCancelled:
            for job in jobs:
                job.mark_cancelled()
            return
        for job, item, pictures, truncated, size, error in zip(
            jobs,
            items,
            output.images,
            output.truncated,
            output.batch_sizes,
            output.errors,
            strict=True,
        ):
            if job.cancel_requested:
                job.mark_cancelled()  # its images are dropped: no file, no row
                continue
            try:
                if error is not None:
                    raise error  # this request alone failed; the others of its batch go on
                timings = {**output.timings, "queue": queued_seconds(job)}
                store = functools.partial(
                    images.store,
                    job.owner,
                    item,
                    pictures,
                    truncated=truncated,
                    timings=timings,
                    job_id=job.id,
                )
                result = store_retrying(job, store, images.settings.storage_retry_seconds)
            except Exception as exc:
                if not isinstance(exc, ServiceError):
                    log.exception("job %s failed", job.id)
                job.fail(exc)
                continue
            result.timings["total"] = elapsed(job)
            job.succeed(result.as_dict() | {"batch_size": size})
