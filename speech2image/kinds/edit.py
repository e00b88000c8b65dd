"""The edit kind: an image (the job's input) and a prompt in, stored edited images out; batched."""

from __future__ import annotations

import functools
import logging
from typing import Any

from ..editing import EditWork, unpack_input
from ..engines.diffusers_sd import GenerationCancelled
from ..engines.previews import Previewer
from ..errors import ServiceError
from ..image_service import ImageService, model_key
from ..jobs import Job
from ..jobs.kinds import JobKind, Schedule
from ._progress import elapsed, previews_for, progress_all, queued_seconds, store_retrying
from .generate import image_work, image_work_document

__all__ = ["EditKind"]

log = logging.getLogger(__name__)


class EditKind(JobKind):
    """img2img and inpainting; edits with equal settings share one pipeline call."""

    name = "edit"
    takes_input = True  # the source image, with the mask as its alpha
    input_is_audio = False

    def __init__(self, images: ImageService) -> None:
        self.images = images
        self.previewer = Previewer.from_settings(images.settings)

    def schedule(self, work: EditWork) -> Schedule:
        """The chosen model's queue; merged with edits of an equal batch key."""
        return Schedule(
            model=model_key(work.item.choice.model),
            batch_key=work.batch_key(),
            images=work.item.request.num_images,
            steps=work.item.request.steps,
        )

    def prompts(self, work: EditWork) -> list[str]:
        """The final prompt (for a conversation turn, the one composed from the instruction)."""
        return [work.item.request.prompt]

    def estimate_usage(self, work: EditWork) -> dict[str, float]:
        """Its images and pixel-steps, known from the validated request."""
        r = work.item.request
        return {"images": r.num_images, "pixel_steps": r.width * r.height * r.steps * r.num_images}

    def dump(self, work: EditWork) -> dict[str, Any]:
        """The prepared request, the model choice and the edit settings."""
        return image_work_document(work.item) | {"edit": work.describe()}

    def load(self, document: dict[str, Any]) -> EditWork:
        """The edit a document describes."""
        edit = document["edit"]
        return EditWork(
            image_work(self.images, document),
            float(edit["strength"]),
            int(edit["mask_blur"]),
            edit["mode"],
            edit.get("parent_id"),
        )

    def run(self, jobs: list[Job]) -> None:
        """Edit a batch of compatible requests in one pipeline call, then store each."""
        images = self.images
        works: list[EditWork] = [job.work for job in jobs]
        items = [work.item for work in works]
        try:
            sources = []
            for job, work in zip(jobs, works, strict=True):
                assert job.input is not None, "an edit job needs its source image"
                sources.append(unpack_input(job.input.read_bytes(), work))
            progress_all(jobs, "editing", 0, items[0].request.steps)
            with previews_for(jobs, items, self.previewer):
                output = images.run_batch(
                    items,
                    on_step=lambda done, total: progress_all(jobs, "editing", done, total),
                    sources=sources,
                )
        except GenerationCancelled:
            for job in jobs:
                job.mark_cancelled()
            return
        except Exception as exc:
            if not isinstance(exc, ServiceError):
                log.exception("edit batch of %d failed", len(jobs))
            for job in jobs:
                job.fail(exc)
            return
        for job, work, pictures, truncated, size, error in zip(
            jobs,
            works,
            output.images,
            output.truncated,
            output.batch_sizes,
            output.errors,
            strict=True,
        ):
            if job.cancel_requested:
                job.mark_cancelled()
                continue
            try:
                if error is not None:
                    raise error
                timings = {**output.timings, "queue": queued_seconds(job)}
                store = functools.partial(
                    images.store,
                    job.owner,
                    work.item,
                    pictures,
                    truncated=truncated,
                    timings=timings,
                    job_id=job.id,
                    parent_id=work.parent_id,
                    edit=work.describe(),
                )
                result = store_retrying(job, store, images.settings.storage_retry_seconds)
            except Exception as exc:
                if not isinstance(exc, ServiceError):
                    log.exception("job %s failed", job.id)
                job.fail(exc)
                continue
            result.timings["total"] = elapsed(job)
            body = result.as_dict() | {"batch_size": size, "edit": work.describe()}
            body["parent_id"] = work.parent_id
            job.succeed(body)
