"""Prompt in -> validation -> style/model choice -> images + history records. Knows no HTTP."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from .config import Settings
from .engines.diffusers_sd import (
    SCHEDULERS,
    DiffusersFactory,
    GenerationCancelled,
    GenerationSpec,
    LoraNotApplicable,
    LoraWeight,
    generate,
    prompt_overflows,
    public_source,
)
from .engines.editing import EditNotSupported, EditSpec
from .engines.editing import edit as edit_images
from .engines.families import ModelProfile, profile
from .errors import InvalidRequest, ModelUnavailable
from .loras import LoraCatalog, LoraRef, family_label, style_lora_hits
from .model_loader import DeviceOutOfMemory, Lease, ModelLoader
from .schemas import MAX_SEED, image_request_model, invalid_request
from .storage import ImageRecord, NewImage, NewTranscript, Storage, keyed_id
from .style import StyleChoice, StyleChooser

__all__ = [
    "MAX_SEED",
    "BatchOutput",
    "EditSource",
    "GenerationResult",
    "ImageRequest",
    "ImageService",
    "LoraRef",
    "PreparedImage",
    "get_image_service",
    "model_key",
    "register_image_models",
    "required_models",
]

log = logging.getLogger(__name__)

RECENT_FAILURE_SECONDS = 60.0  # a model that failed to load this recently is refused at once


def model_key(name: str) -> str:
    """The model loader's name for image model ``name``."""
    return f"sd:{name}"


@dataclasses.dataclass(frozen=True)
class ImageRequest:
    """A validated generation request (the seed drawn).

    Fields the client left out are None until :meth:`ImageService.prepare` fills them with the
    chosen model's defaults; a prepared request has every field set, its ``family`` and its
    LoRAs (``loras`` None before: the client named none, so a style cue may pick some).
    """

    prompt: str
    negative_prompt: str | None
    model: str
    width: int | None
    height: int | None
    steps: int | None
    guidance_scale: float | None
    seed: int
    num_images: int
    scheduler: str | None
    loras: tuple[LoraRef, ...] | None = None
    family: str = ""

    def __post_init__(self) -> None:
        # A request read back from JSON (a job row, a task payload) has its LoRAs as dicts.
        if self.loras is not None:
            refs = tuple(
                lora if isinstance(lora, LoraRef) else LoraRef(**lora) for lora in self.loras
            )
            object.__setattr__(self, "loras", refs)

    def seeds(self) -> list[int]:
        """One seed per image: the request's seed, then the next ones."""
        return [(self.seed + i) % (MAX_SEED + 1) for i in range(self.num_images)]

    def lora_set(self) -> tuple[tuple[str, float], ...]:
        """The LoRAs by name and weight, in a stable order (what a batch must share)."""
        return tuple(sorted((lora.name, lora.weight) for lora in self.loras or ()))


@dataclasses.dataclass(frozen=True)
class PreparedImage:
    """A validated request with its model chosen and defaults filled: ready to join a batch."""

    request: ImageRequest
    choice: StyleChoice

    def batch_key(self) -> tuple[Any, ...]:
        """Requests with equal keys can share one pipeline call.

        Everything that changes the call is in it: the model and its family, the size, the
        steps, the scheduler, the guidance and the LoRA set (adapters are per call, not per
        prompt). Prompts, negative prompts and seeds may differ within a batch.
        """
        r = self.request
        return (
            self.choice.model,
            r.family,
            r.width,
            r.height,
            r.steps,
            r.scheduler,
            r.guidance_scale,
            r.lora_set(),
        )


@dataclasses.dataclass(frozen=True)
class BatchOutput:
    """What a batch produced, split back per item: its images, or the error it failed with."""

    images: list[list[Any]]
    truncated: list[bool]
    timings: dict[str, float]
    batch_sizes: list[int]  # images in the pipeline call that made each item's images
    errors: list[BaseException | None]


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """Stored images and how they were made."""

    records: list[ImageRecord]
    request: ImageRequest
    choice: StyleChoice
    truncated: bool
    timings: dict[str, float]
    filtered: int = 0  # images the safety checker withheld (never stored)

    def as_dict(self) -> dict[str, Any]:
        """The JSON answer of a generation (sync response and job result alike)."""
        r = self.request
        return {
            "images": [
                {
                    "id": rec.id,
                    "filename": rec.filename,
                    "url": f"/images/{rec.filename}",
                    "width": rec.width,
                    "height": rec.height,
                    "seed": rec.seed,
                    "bytes": rec.bytes,
                }
                for rec in self.records
            ],
            "model": self.choice.model,
            "model_choice": self.choice.as_dict() | {"family": r.family},
            "prompt": r.prompt,
            "truncated": self.truncated,
            "parameters": {
                "negative_prompt": r.negative_prompt,
                "width": r.width,
                "height": r.height,
                "steps": r.steps,
                "guidance_scale": r.guidance_scale,
                "scheduler": r.scheduler,
                "seed": r.seed,
                "num_images": r.num_images,
                "loras": _lora_list(r),
            },
            "timings": self.timings,
            "filtered": self.filtered,
        }


class ImageService:
    """Generates images with leased pipelines and records them in the history."""

    def __init__(
        self, settings: Settings, loader: ModelLoader, storage: Storage, chooser: StyleChooser
    ) -> None:
        self.settings = settings
        self.loader = loader
        self.storage = storage
        self.chooser = chooser
        #: The content policy (speech2image.moderation.Moderation), set by create_app.
        self.moderation: Any = None
        self.models = register_image_models(loader, settings)
        #: The LoRA files requests may name (S2I_LORA_DIR).
        self.loras = LoraCatalog(settings.lora_dir)
        #: The validating model of a generation request, with this app's ranges.
        self.request_model: type[BaseModel] = image_request_model(
            settings, self.models, self.schedulers(), loras=settings.lora_dir is not None
        )
        self._lock = threading.Lock()
        self._running = 0
        self._waiting = 0

    def init_app(self, app: Any) -> None:
        """Store the service on a Flask app as ``app.extensions['images']``."""
        app.extensions["images"] = self

    def state(self) -> dict[str, int]:
        """Generations running and waiting for a model now."""
        with self._lock:
            return {"running": self._running, "waiting": self._waiting}

    # --- validation ----------------------------------------------------------------------
    def validate(self, payload: Any) -> ImageRequest:
        """Check every field before any model work; errors name each field and its range."""
        if not isinstance(payload, dict):
            raise InvalidRequest("the body must be a JSON object")
        try:
            body = self.request_model.model_validate(payload)
        except ValidationError as exc:
            raise invalid_request(exc, self.request_model) from None
        return self.resolve(body)

    def resolve(self, body: Any) -> ImageRequest:
        """An ImageRequest from a validated ``request_model`` instance (the seed drawn now)."""
        seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED + 1)
        loras = getattr(body, "loras", None)
        return ImageRequest(
            body.prompt,
            body.negative_prompt or None,
            body.model,
            body.width,
            body.height,
            body.steps,
            body.guidance_scale,
            seed,
            body.num_images,
            body.scheduler,
            None if loras is None else tuple(LoraRef(i.name, float(i.weight)) for i in loras),
        )

    def ensure_available(self, model: str) -> None:
        """Raise 503 now, loading nothing, if a model this request may use cannot be had.

        ``auto`` may pick any model of the automatic choice. A model is available when it is
        loaded, local, in the hub cache, or downloadable and did not just fail to download.
        """
        names = sorted(set(self.settings.style_models.values())) if model == "auto" else [model]
        for name in names:
            key = model_key(name)
            if self.loader.is_resident(key):
                continue
            factory: DiffusersFactory = self.loader.factory(key)  # type: ignore[assignment]
            problem = factory.describe().get("problem")
            if problem:
                error = factory.unavailable(problem)
                raise ModelUnavailable(str(error), details={"model": name})
            failure = self.loader.recent_failure(key, RECENT_FAILURE_SECONDS)
            if failure:
                raise ModelUnavailable(failure, details={"model": name}, retry_after=60)

    # --- models, their families and defaults -------------------------------------------
    def profile(self, model: str) -> ModelProfile:
        """The family, defaults and limits of image model ``model`` (read from its files once)."""
        factory: DiffusersFactory = self.loader.factory(model_key(model))  # type: ignore[assignment]
        return profile(
            factory.family(),
            factory.few_step(),
            self.models[model].defaults(),
            max_width=self.settings.max_width,
            max_height=self.settings.max_height,
        )

    def schedulers(self) -> list[str]:
        """The schedulers some configured model takes, in the API's order."""
        usable = {name for model in self.models for name in self.profile(model).schedulers}
        return [name for name in SCHEDULERS if name in usable]

    def model_profiles(self) -> dict[str, ModelProfile]:
        """Every configured model's family, defaults and limits, by name."""
        return {name: self.profile(name) for name in sorted(self.models)}

    # --- generation ----------------------------------------------------------------------
    def prepare(self, request: ImageRequest, *, lenient: bool = False) -> PreparedImage:
        """Choose the model, fill in its defaults and check what its family can do.

        Done before the job exists, so the job knows its batch key and a request its model
        cannot serve is a 400 that says why (a negative prompt on FLUX, a scheduler that does
        not apply, a LoRA of another family). ``lenient``: a negative prompt the family cannot
        take is dropped, not refused (speech-to-image, where it came from the speech).
        """
        choice = self.chooser.choose(request.prompt, request.model)
        fit = self.profile(choice.model)
        if lenient and request.negative_prompt and not fit.family.negative_prompt:
            request = dataclasses.replace(request, negative_prompt=None)
        request, problems = self._fit(request, fit, choice.model)
        loras, notes, lora_problems = self._choose_loras(request, fit, choice.model)
        problems += lora_problems
        if problems:
            raise InvalidRequest(
                "; ".join(p["message"] for p in problems),
                details={"field": problems[0]["field"], "errors": problems},
            )
        if notes:
            choice = dataclasses.replace(choice, reason=f"{choice.reason}; {'; '.join(notes)}")
        return PreparedImage(
            dataclasses.replace(request, loras=loras, family=fit.family.name), choice
        )

    def _fit(
        self, request: ImageRequest, fit: ModelProfile, model: str
    ) -> tuple[ImageRequest, list[dict[str, str]]]:
        """``request`` with the model's defaults filled in, and what its family refuses."""
        s = self.settings
        family = fit.family
        what = f"model {model!r} ({fit.label})"
        low, high = fit.guidance_range
        problems: list[dict[str, str]] = []

        def problem(field: str, message: str) -> None:
            problems.append({"field": field, "message": f"`{field}` {message}"})

        if request.negative_prompt and not family.negative_prompt:
            problem("negative_prompt", f"cannot be used: {what} takes no negative prompt")
        if request.scheduler is not None and request.scheduler not in fit.schedulers:
            problem(
                "scheduler",
                f"{request.scheduler!r} does not apply to {what}; "
                f"use one of {', '.join(fit.schedulers)}",
            )
        if request.guidance_scale is not None and not low <= request.guidance_scale <= high:
            problem(
                "guidance_scale",
                f"must be from {low:g} to {high:g} for {what}, got {request.guidance_scale:g}",
            )
        for side in ("width", "height"):
            value = getattr(request, side)
            if value is not None and value % family.size_multiple:
                problem(
                    side, f"must be a multiple of {family.size_multiple} for {what}, got {value}"
                )

        def pick(given: Any, configured: Any, fits: bool, own: Any) -> Any:
            # The request's value; else S2I_DEFAULT_* where the model can take it; else its own.
            if given is not None:
                return given
            return configured if configured is not None and fits else own

        def side_default(configured: int | None, own: int, limit: int) -> int:
            fits = configured is not None and configured % family.size_multiple == 0
            return min(pick(None, configured, fits, own), limit)

        guidance = s.default_guidance_scale
        filled = dataclasses.replace(
            request,
            width=request.width or side_default(s.default_width, fit.width, s.max_width),
            height=request.height or side_default(s.default_height, fit.height, s.max_height),
            steps=min(pick(request.steps, s.default_steps, True, fit.steps), s.max_steps),
            guidance_scale=pick(
                request.guidance_scale,
                guidance,
                guidance is not None and low <= guidance <= high,
                fit.guidance_scale,
            ),
            scheduler=pick(
                request.scheduler,
                s.default_scheduler,
                s.default_scheduler in fit.schedulers,
                fit.scheduler,
            ),
        )
        return filled, problems

    def _choose_loras(
        self, request: ImageRequest, fit: ModelProfile, model: str
    ) -> tuple[tuple[LoraRef, ...], list[str], list[dict[str, str]]]:
        """The LoRAs of the call: the request's, or those its style cues turn on.

        Returns them, the notes for the model choice's reason, and the problems (400s).
        """
        files = self.loras.files()
        problems: list[dict[str, str]] = []
        if request.loras is not None:
            seen: set[str] = set()
            for index, lora in enumerate(request.loras):
                field = f"loras.{index}.name"
                found = files.get(lora.name)
                if not self.loras.enabled:
                    message = "cannot be used: this server has no LoRA folder (S2I_LORA_DIR)"
                elif found is None:
                    known = ", ".join(sorted(files)) or "none"
                    message = f"{lora.name!r} is not a LoRA here (available: {known})"
                elif found.family is not None and found.family != fit.family.name:
                    message = (
                        f"{lora.name!r} is a LoRA for {family_label(found.family)}; "
                        f"model {model!r} is {fit.family.label}"
                    )
                elif lora.name in seen:
                    message = f"{lora.name!r} is named twice"
                else:
                    seen.add(lora.name)
                    continue
                problems.append({"field": field, "message": f"`{field}` {message}"})
            return request.loras, [], problems
        chosen: list[LoraRef] = []
        notes: list[str] = []
        for hit in style_lora_hits(request.prompt, self.settings.style_loras):
            name = hit.lora.name
            found = files.get(name)
            if found is None:
                notes.append(f"cue {hit.cue!r} names LoRA {name!r}, which is not here: skipped")
            elif found.family is not None and found.family != fit.family.name:
                label = family_label(found.family)
                notes.append(f"cue {hit.cue!r} names LoRA {name!r} for {label}: skipped")
            elif len(chosen) < self.settings.max_loras:
                chosen.append(hit.lora)
                notes.append(f"cue {hit.cue!r} -> LoRA {name!r} at weight {hit.lora.weight:g}")
        return tuple(chosen), notes, problems

    def run_batch(
        self,
        items: list[PreparedImage],
        on_step: Callable[[int, int], None] | None = None,
        sources: list[EditSource] | None = None,
    ) -> BatchOutput:
        """One pipeline call for compatible items; each keeps its prompts and seeds.

        ``sources``: one per item, the items are edits of those images (img2img, inpainting).

        A lone item's failure is raised. In a merged batch one request must not fail the
        others: an item whose prompt cannot be encoded is set aside with its error, and when
        the merged call fails, each item is generated again alone so only the culprit fails.
        """
        first = items[0]
        assert all(i.batch_key() == first.batch_key() for i in items), "incompatible batch"
        count = len(items)
        with self._lock:
            self._waiting += 1
        waiting = True
        try:
            with self.loader.lease(model_key(first.choice.model)) as lease:
                with self._lock:
                    self._waiting -= 1
                    self._running += 1
                waiting = False
                started = time.perf_counter()
                truncated, errors = self._count_tokens(lease.model, items, first.choice.model)
                images: list[list[Any]] = [[] for _ in items]
                sizes = [0] * count
                live = [i for i in range(count) if errors[i] is None]
                try:
                    if live:
                        self._generate_into(
                            lease, [items[i] for i in live], live, images, sizes, on_step, sources
                        )
                except GenerationCancelled:
                    raise
                except Exception as exc:
                    if len(live) == 1 and count == 1:
                        raise
                    if len(live) == 1:
                        errors[live[0]] = exc
                    else:
                        log.warning(
                            "a merged batch of %d requests failed (%s): generating each alone",
                            len(live),
                            type(exc).__name__,
                        )
                        for i in live:
                            try:
                                self._generate_into(
                                    lease, [items[i]], [i], images, sizes, on_step, sources
                                )
                            except GenerationCancelled:
                                raise
                            except Exception as alone:
                                errors[i] = alone
                inference = time.perf_counter() - started
        finally:
            with self._lock:
                if waiting:
                    self._waiting -= 1
                else:
                    self._running -= 1
        timings = {"wait": lease.wait_seconds, "load": lease.load_seconds, "inference": inference}
        return BatchOutput(images, truncated, timings, sizes, errors)

    def _count_tokens(
        self, pipe: Any, items: list[PreparedImage], model: str
    ) -> tuple[list[bool], list[BaseException | None]]:
        """Whether each prompt is truncated; a prompt that cannot be encoded gets its error."""
        tokens = self.profile(model).max_sequence_length
        truncated: list[bool] = []
        errors: list[BaseException | None] = []
        for item in items:
            try:
                truncated.append(prompt_overflows(pipe, item.request.prompt, tokens))
                errors.append(None)
            except Exception as exc:
                if len(items) == 1:
                    raise
                truncated.append(False)
                errors.append(exc)
        return truncated, errors

    def _generate_into(
        self,
        lease: Lease,
        items: list[PreparedImage],
        positions: list[int],
        images: list[list[Any]],
        sizes: list[int],
        on_step: Callable[[int, int], None] | None,
        sources: list[EditSource] | None = None,
    ) -> None:
        """Generate ``items`` in one call; put each one's images at its position."""
        spec = self._spec(items)
        edit_spec = None
        if sources is not None:
            edit_spec = edit_call(
                [sources[p] for p in positions], [i.request.num_images for i in items]
            )
        started = time.perf_counter()
        made = self._generate_with_retry(
            lease.model, lease.device, items[0].choice.model, spec, on_step, edit_spec
        )
        self.loader.observer.denoised(
            model_key(items[0].choice.model),
            spec.steps,
            len(spec.prompts),
            time.perf_counter() - started,
        )
        offset = 0
        for position, item in zip(positions, items, strict=True):
            images[position] = made[offset : offset + item.request.num_images]
            sizes[position] = len(spec.prompts)
            offset += item.request.num_images

    def store(
        self,
        owner: str,
        item: PreparedImage,
        images: list[Any],
        *,
        truncated: bool,
        timings: dict[str, float],
        transcript: NewTranscript | None = None,
        job_id: str | None = None,
        parent_id: str | None = None,
        edit: dict[str, Any] | None = None,
    ) -> GenerationResult:
        """Encode and store one item's images (files and rows together).

        With ``job_id``, image ids derive from it, so a job delivered twice stores once.
        """
        request, choice = item.request, item.choice
        started = time.perf_counter()
        keep, filtered = (
            self.moderation.keep_safe(images)
            if self.moderation is not None
            else (range(len(images)), 0)
        )
        records = self.storage.save_images(
            owner,
            [
                self._encode(
                    image,
                    seed,
                    request,
                    choice,
                    keyed_id(job_id, str(i)) if job_id else None,
                    parent_id=parent_id,
                    edit=edit,
                )
                for i, (image, seed) in enumerate(zip(images, request.seeds(), strict=True))
                if i in keep
            ],
            transcript=transcript,
        )
        timings = {**timings, "save": time.perf_counter() - started}
        log.info(
            "generated %d image(s) %dx%d with %s",
            len(records),
            request.width,
            request.height,
            choice.model,
        )
        return GenerationResult(
            records,
            request,
            choice,
            truncated,
            {k: round(v, 4) for k, v in timings.items()},
            filtered,
        )

    def _generate_with_retry(
        self,
        pipe: Any,
        device: str,
        model: str,
        spec: GenerationSpec,
        on_step: Callable[[int, int], None] | None = None,
        edit_spec: EditSpec | None = None,
    ) -> list[Any]:
        """On out-of-memory, free every other model on the device and try once more."""

        def call(pipe: Any, spec: GenerationSpec, on_step: Any) -> list[Any]:
            if edit_spec is None:
                return generate(pipe, spec, on_step=on_step)
            try:
                return edit_images(pipe, spec, edit_spec, on_step=on_step)
            except EditNotSupported as exc:
                raise InvalidRequest(str(exc), details={"field": "model"}) from None

        try:
            return call(pipe, spec, on_step=on_step)
        except LoraNotApplicable as exc:
            raise InvalidRequest(str(exc), details={"field": "loras"}) from None
        except DeviceOutOfMemory:
            log.warning("out of memory generating with %s: freeing %s and retrying", model, device)
            self.loader.free_device(device, exclude=model_key(model))
        try:
            return call(pipe, spec, on_step=on_step)
        except LoraNotApplicable as exc:
            raise InvalidRequest(str(exc), details={"field": "loras"}) from None
        except DeviceOutOfMemory:
            raise ModelUnavailable(
                f"{device} is out of memory generating with {model!r}; retry shortly",
                retry_after=30,
            ) from None

    def _encode(
        self,
        image: Any,
        seed: int,
        request: ImageRequest,
        choice: StyleChoice,
        image_id: str | None = None,
        *,
        parent_id: str | None = None,
        edit: dict[str, Any] | None = None,
    ) -> NewImage:
        """PNG bytes carrying the same parameters as the history row."""
        from PIL.PngImagePlugin import PngInfo

        parameters = {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "model": choice.model,
            "model_source": public_source(choice.model, self.models[choice.model]),
            "model_reason": choice.reason,
            "family": request.family,
            "loras": _lora_list(request),
            "seed": seed,
            "steps": request.steps,
            "guidance_scale": request.guidance_scale,
            "scheduler": request.scheduler,
            "width": request.width,
            "height": request.height,
            "generator": "speech2image",
        }
        if edit is not None:
            parameters |= {"edit": edit, "parent_id": parent_id}
        info = PngInfo()
        info.add_text("parameters", json.dumps(parameters, ensure_ascii=False))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", pnginfo=info)
        return NewImage(
            png=buffer.getvalue(),
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            model=choice.model,
            model_reason=choice.reason,
            seed=seed,
            steps=request.steps,
            guidance_scale=request.guidance_scale,
            scheduler=request.scheduler,
            width=request.width,
            height=request.height,
            parameters=parameters,
            parent_id=parent_id,
            **({"id": image_id} if image_id else {}),
        )

    def _spec(self, items: list[PreparedImage]) -> GenerationSpec:
        """One pipeline call for compatible ``items`` (their LoRA files looked up now)."""
        r = items[0].request
        fit = self.profile(items[0].choice.model)
        loras = []
        for lora in r.loras or ():
            found = self.loras.get(lora.name)
            if found is None:
                raise InvalidRequest(
                    f"LoRA {lora.name!r} is no longer in the LoRA folder",
                    details={"field": "loras"},
                )
            loras.append(LoraWeight(lora.name, str(found.path), lora.weight, found.mtime))
        assert r.width and r.height and r.steps and r.scheduler and r.guidance_scale is not None
        return GenerationSpec(
            prompts=[i.request.prompt for i in items for _ in range(i.request.num_images)],
            negative_prompts=[
                i.request.negative_prompt for i in items for _ in range(i.request.num_images)
            ],
            seeds=[seed for i in items for seed in i.request.seeds()],
            width=r.width,
            height=r.height,
            steps=r.steps,
            guidance_scale=r.guidance_scale,
            scheduler=r.scheduler,
            family=r.family or fit.family.name,
            few_step=fit.few_step,
            loras=tuple(loras),
            max_sequence_length=fit.max_sequence_length,
        )


@dataclasses.dataclass(frozen=True)
class EditSource:
    """What one edit starts from: its source image, its mask (None: img2img), how far to go."""

    image: Any  # PIL RGB at the request's size
    mask: Any | None  # PIL "L", 255 where the picture changes
    strength: float
    mask_blur: int = 0


def edit_call(sources: list[EditSource], counts: list[int]) -> EditSpec:
    """One call's edit inputs: each source once per image its request makes."""
    first = sources[0]
    images = [s.image for s, n in zip(sources, counts, strict=True) for _ in range(n)]
    masks = None
    if first.mask is not None:
        masks = [s.mask for s, n in zip(sources, counts, strict=True) for _ in range(n)]
    return EditSpec(images, masks, first.strength, first.mask_blur)


def _lora_list(request: ImageRequest) -> list[dict[str, Any]]:
    return [{"name": lora.name, "weight": lora.weight} for lora in request.loras or ()]


def register_image_models(loader: ModelLoader, settings: Settings) -> dict[str, Any]:
    """Register every configured image model with the loader; returns the specs by name."""
    specs = settings.image_model_specs()
    for name, spec in specs.items():
        loader.register(
            model_key(name),
            DiffusersFactory(
                name,
                spec,
                cache_dir=Path(settings.model_cache_dir),
                device=settings.image_device,
                dtype=settings.image_dtype,
                allow_download=settings.image_allow_download,
                offload=settings.image_offload,
            ),
        )
    return specs


def required_models(settings: Settings) -> list[str]:
    """Loader names the default flow needs: Whisper and every model automatic choice uses."""
    whisper = f"whisper:{settings.whisper_model}"
    return [whisper, *sorted({model_key(m) for m in settings.style_models.values()})]


def get_image_service(app: Any) -> ImageService:
    """The app's image service."""
    return app.extensions["images"]
