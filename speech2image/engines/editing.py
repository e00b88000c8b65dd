"""Image editing without a second copy of the weights: img2img and inpainting pipelines made
from the resident text-to-image pipeline (diffusers ``from_pipe`` shares its modules).

The call itself is the diffusers engine's (:func:`~.diffusers_sd.generate`: the same
scheduler copy per call, prompt encoding under the tokenizer lock, LoRA gate and device);
this module adds the edit pipeline, the source images and masks, and pastes the source back
outside the mask so unmasked pixels come back unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import weakref
from collections.abc import Callable
from typing import Any

from .diffusers_sd import GenerationSpec, _pipeline_family, generate, import_diffusers
from .families import FAMILIES

__all__ = ["EDIT_MODES", "EditNotSupported", "EditSpec", "edit", "edit_pipeline", "edit_steps"]

EDIT_MODES = ("img2img", "inpaint")

_EDIT_PIPES: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()
_GUARD = threading.Lock()


class EditNotSupported(Exception):
    """The model's family cannot make this kind of edit."""


@dataclasses.dataclass(frozen=True)
class EditSpec:
    """The sources of one edit call: one image per prompt, one mask each (inpainting)."""

    images: list[Any]  # PIL RGB, the size of the call
    masks: list[Any] | None  # PIL "L", 255 where the picture changes; None: img2img
    strength: float  # 0 < strength <= 1: how far from the source the result may go
    mask_blur: int = 0  # pixels of Gaussian blur on the mask edge

    @property
    def mode(self) -> str:
        """``inpaint`` with masks, else ``img2img``."""
        return "inpaint" if self.masks is not None else "img2img"


def edit_steps(steps: int, strength: float) -> int:
    """The scheduler's step count so that ``steps`` denoising steps actually run.

    img2img skips the first ``1 - strength`` of the schedule: asking for ``steps / strength``
    keeps the work (and the progress total) at ``steps`` and never rounds down to none.
    """
    return max(steps, math.ceil(steps / strength - 1e-9))


def edit_pipeline(pipe: Any, mode: str) -> Any:
    """The ``mode`` pipeline built once from ``pipe``, sharing its modules (no new weights)."""
    import_diffusers()
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting

    with _GUARD:
        found = _EDIT_PIPES.setdefault(pipe, {}).get(mode)
    if found is not None:
        return found
    builder = AutoPipelineForInpainting if mode == "inpaint" else AutoPipelineForImage2Image
    made = builder.from_pipe(pipe)
    made.set_progress_bar_config(disable=True)
    with _GUARD:
        return _EDIT_PIPES[pipe].setdefault(mode, made)


def check_family(family: str, mode: str) -> None:
    """Raise :class:`EditNotSupported` when ``family`` cannot make a ``mode`` edit."""
    known = FAMILIES.get(family)
    if known is None or mode not in known.edits:
        label = known.label if known else family
        raise EditNotSupported(f"{label} models cannot do {mode} edits")


def blurred(mask: Any, radius: int) -> Any:
    """The mask with a soft edge of ``radius`` pixels (itself when 0)."""
    from PIL import ImageFilter

    return mask.filter(ImageFilter.GaussianBlur(radius)) if radius > 0 else mask


def edit(
    pipe: Any,
    spec: GenerationSpec,
    sources: EditSpec,
    *,
    on_step: Callable[[int, int], None] | None = None,
) -> list[Any]:
    """Edit ``sources.images`` with ``spec``'s prompts and seeds; PIL images in their order.

    Inpainting returns the source outside the (blurred) mask: only masked pixels change.
    """
    from PIL import Image

    family = spec.family or _pipeline_family(pipe) or "sd1"
    check_family(family, sources.mode)
    variant = edit_pipeline(pipe, sources.mode)
    extra: dict[str, Any] = {
        "image": sources.images,
        "strength": sources.strength,
        "num_inference_steps": edit_steps(spec.steps, sources.strength),
    }
    masks = None
    if sources.masks is not None:
        masks = [blurred(m.convert("L"), sources.mask_blur) for m in sources.masks]
        extra["mask_image"] = masks
    import inspect

    accepted = inspect.signature(variant.__call__).parameters
    # SD 1.x/2.x/XL img2img take the size from the source image and have no size arguments.
    extra |= {key: None for key in ("width", "height") if key not in accepted}
    made = generate(pipe, spec, on_step=on_step, variant=variant, extra=extra)
    if masks is None:
        return made
    return [
        Image.composite(image.convert("RGB").resize(source.size), source.convert("RGB"), mask)
        for image, source, mask in zip(made, sources.images, masks, strict=True)
    ]
