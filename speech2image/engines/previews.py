"""Preview frames of an image while it denoises: cheap, bounded, optional.

Each family's latents become RGB by a linear projection (``Family.preview_rgb`` and
``preview_bias``: no extra weights), or through a tiny autoencoder (``AutoencoderTiny``, e.g.
TAESD) when ``S2I_PREVIEW_TINY_VAES`` names one for the family. A :class:`Previewer` makes a
frame at most every ``S2I_PREVIEW_EVERY_STEPS`` steps and only while the time spent on frames
stays under ``S2I_PREVIEW_MAX_FRACTION`` of the generation's time so far (measured).

The engine calls :func:`step_latents` after each step; it does nothing unless the caller
(a kind, see ``kinds/_progress.py``) installed a sink with :func:`previews_to`.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import io
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .families import FAMILIES

__all__ = ["Frame", "Previewer", "previews_to", "step_latents"]

log = logging.getLogger(__name__)

#: sink(pipe, spec, step, total, latents): installed by the kind around a pipeline call.
Sink = Callable[[Any, Any, int, int, Any], None]
_SINK: contextvars.ContextVar[Sink | None] = contextvars.ContextVar("preview_sink", default=None)


@contextlib.contextmanager
def previews_to(sink: Sink) -> Iterator[None]:
    """Send this thread's denoising steps to ``sink`` while inside."""
    token = _SINK.set(sink)
    try:
        yield
    finally:
        _SINK.reset(token)


def step_latents(pipe: Any, spec: Any, step: int, total: int, latents: Any) -> None:
    """Called by the engine after each denoising step with the step's latents."""
    sink = _SINK.get()
    if sink is not None and latents is not None:
        sink(pipe, spec, step, total, latents)


Frame = dict[str, Any]  # {"b64_png", "step", "total", "frame", "method"}


class Previewer:
    """Turns a call's latents into PNG frames, within the time budget of its settings."""

    def __init__(self, every_steps: int, max_fraction: float, tiny_vaes: dict[str, str]) -> None:
        self.every_steps = every_steps
        self.max_fraction = max_fraction
        self.tiny_vaes = dict(tiny_vaes)
        self._tiny: dict[str, Any] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Any) -> Previewer:
        """The settings' preview policy."""
        return cls(
            settings.preview_every_steps,
            settings.preview_max_fraction,
            settings.preview_tiny_vaes,
        )

    @property
    def enabled(self) -> bool:
        """False when previews are switched off (a fraction of 0)."""
        return self.max_fraction > 0

    def budget(self) -> Budget:
        """A fresh time budget for one pipeline call."""
        return Budget(self.every_steps, self.max_fraction)

    def frames(
        self, pipe: Any, spec: Any, latents: Any, indices: list[int]
    ) -> tuple[list[bytes], str]:
        """PNG frames of the images at ``indices`` of the batch, and the method used."""
        import torch
        from PIL import Image

        family = spec.family or "sd1"
        rgb, method = None, "projection"
        tiny = self._tiny_vae(family)
        unpacked = _unpack(pipe, spec, family, latents[indices])
        if tiny is not None:
            with torch.inference_mode():
                rgb = tiny.decode(unpacked.to(tiny.device, tiny.dtype)).sample
            method = "tiny_vae"
        else:
            info = FAMILIES[family]
            factors = torch.tensor(info.preview_rgb, dtype=torch.float32)
            if factors.shape[0] != unpacked.shape[1]:
                raise ValueError(f"{family} latents have {unpacked.shape[1]} channels")
            bias = torch.tensor(info.preview_bias, dtype=torch.float32)
            rgb = torch.einsum("bchw,cr->brhw", unpacked.float().cpu(), factors)
            rgb = rgb + bias[None, :, None, None]
        pixels = ((rgb.float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        pngs = []
        for image in pixels.permute(0, 2, 3, 1).numpy():
            picture = Image.fromarray(image)
            if picture.size != (spec.width, spec.height):
                picture = picture.resize((spec.width, spec.height), Image.Resampling.BILINEAR)
            buffer = io.BytesIO()
            picture.save(buffer, format="PNG", compress_level=1)
            pngs.append(buffer.getvalue())
        return pngs, method

    def _tiny_vae(self, family: str) -> Any:
        folder = self.tiny_vaes.get(family)
        if not folder:
            return None
        with self._lock:
            if family not in self._tiny:
                from diffusers import AutoencoderTiny

                started = time.perf_counter()
                model = AutoencoderTiny.from_pretrained(str(Path(folder))).eval()
                log.info(
                    "preview autoencoder for %s loaded in %.2fs",
                    family,
                    time.perf_counter() - started,
                )
                self._tiny[family] = model
            return self._tiny[family]


class Budget:
    """When the next frame may be made: every N steps, under a fraction of the time."""

    def __init__(self, every_steps: int, max_fraction: float) -> None:
        self.every_steps = every_steps
        self.max_fraction = max_fraction
        self.started = time.perf_counter()
        self.spent = 0.0
        self.last_cost = 0.0
        self.frames = 0

    def due(self, step: int, total: int) -> bool:
        """True when a frame at ``step`` fits the policy (never after the last step)."""
        if self.max_fraction <= 0 or step >= total or step % self.every_steps:
            return False
        elapsed = time.perf_counter() - self.started
        return self.spent + self.last_cost <= self.max_fraction * elapsed

    def spend(self, seconds: float) -> None:
        """Record a frame's cost."""
        self.spent += seconds
        self.last_cost = seconds
        self.frames += 1

    def as_dict(self) -> dict[str, Any]:
        """Frames made and the share of the call's time they took."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        return {"frames": self.frames, "fraction": round(self.spent / elapsed, 4)}


def _unpack(pipe: Any, spec: Any, family: str, latents: Any) -> Any:
    """Latents as (batch, channels, h, w): FLUX packs 2x2 patches into a sequence."""
    if latents.ndim == 4:
        return latents
    scale = getattr(pipe, "vae_scale_factor", 8)
    height = 2 * (int(spec.height) // (scale * 2))
    width = 2 * (int(spec.width) // (scale * 2))
    batch, _, packed = latents.shape
    channels = packed // 4
    latents = latents.view(batch, height // 2, width // 2, channels, 2, 2)
    return latents.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, height, width)


def b64(png: bytes) -> str:
    """A PNG in base64 text."""
    return base64.b64encode(png).decode()
