"""What each image model family can do, in one table, and how a checkpoint's family is found.

Pure Python and stdlib only (``config.py`` imports it): no torch, no diffusers. The diffusers
engine reads the table to load and call a pipeline; the image service reads it to fill in
defaults and to refuse, before any model work, what a family cannot do (a negative prompt on
FLUX, a scheduler that does not apply, a guidance scale a few-step model cannot take).
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "FAMILIES",
    "FAMILY_NAMES",
    "FEW_STEP_SCHEDULERS",
    "SCHEDULERS",
    "Family",
    "ModelProfile",
    "detect_family",
    "family_of_pipeline",
    "few_step_of",
    "profile",
    "safetensors_header",
]

# name -> (diffusers scheduler class, extra config). Names are what the API accepts.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lcm": ("LCMScheduler", {}),
    "tcd": ("TCDScheduler", {}),
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", {}),
}
_UNET_SCHEDULERS = ("euler_a", "euler", "dpmpp_2m", "dpmpp_2m_karras", "ddim", "pndm")
#: Schedulers a few-step UNet model (Turbo, Lightning, LCM, TCD) takes, with "trailing" spacing.
FEW_STEP_SCHEDULERS = ("euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "lcm", "tcd")
FEW_STEP_STEPS = 4
FEW_STEP_GUIDANCE = (0.0, 2.0)
MAX_GUIDANCE = 30.0


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family: how diffusers builds it and what a request may ask of it."""

    name: str
    label: str
    pipeline: str  # the diffusers class (single files load through it)
    denoiser: str  # the component that runs every step: "unet" or "transformer"
    denoiser_class: str
    native_size: int
    steps: int
    guidance_scale: float
    scheduler: str
    schedulers: tuple[str, ...]
    negative_prompt: bool
    size_multiple: int
    # Parameters (millions) of each component of the reference checkpoint, for memory figures
    # before a download; a local checkpoint is measured from its files instead.
    params_millions: Mapping[str, float]
    half_dtype: str = "float16"  # what it runs in on a GPU
    t5_tokens: int = 0  # prompt tokens its T5 encoder reads (0: CLIP only, 77)
    few_step_t5_tokens: int = 0
    few_step_guidance: float = 1.0
    few_step_scheduler: str = "euler"
    single_file: str = "all-in-one"  # "all-in-one", or "denoiser": the rest come from `config`
    #: The edits its text-to-image pipeline can be turned into (diffusers ``from_pipe``).
    edits: tuple[str, ...] = ("img2img", "inpaint")
    # Previews without extra weights: RGB = latent channels x preview_rgb + preview_bias, a
    # linear fit of the family's VAE decoder (the factors ComfyUI and A1111 use).
    preview_rgb: tuple[tuple[float, float, float], ...] = ()
    preview_bias: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def weight_bytes(self, bytes_per_param: int = 2) -> int:
        """Bytes of the reference checkpoint's weights at ``bytes_per_param``."""
        return int(sum(self.params_millions.values()) * 1e6 * bytes_per_param)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (README table, /config)."""
        return {
            "family": self.name,
            "label": self.label,
            "native_size": self.native_size,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "scheduler": self.scheduler,
            "schedulers": list(self.schedulers),
            "negative_prompt": self.negative_prompt,
            "size_multiple": self.size_multiple,
            "weights_gb": round(self.weight_bytes() / 1e9, 1),
        }


# Latent -> RGB projections, as ComfyUI ships them (comfy/latent_formats.py); SD 1 and 2
# share one VAE.
_SD_RGB = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
_SDXL_RGB = (
    (0.3651, 0.4232, 0.4341),
    (-0.2533, -0.0042, 0.1068),
    (0.1076, 0.1111, -0.0362),
    (-0.3165, -0.2492, -0.2188),
)
_SDXL_BIAS = (0.1084, -0.0175, -0.0011)
_SD3_RGB = (
    (-0.0922, -0.0175, 0.0749),
    (0.0311, 0.0633, 0.0954),
    (0.1994, 0.0927, 0.0458),
    (0.0856, 0.0339, 0.0902),
    (0.0587, 0.0272, -0.0496),
    (-0.0006, 0.1104, 0.0309),
    (0.0978, 0.0306, 0.0427),
    (-0.0042, 0.1038, 0.1358),
    (-0.0194, 0.0020, 0.0669),
    (-0.0488, 0.0130, -0.0268),
    (0.0922, 0.0988, 0.0951),
    (-0.0278, 0.0524, -0.0542),
    (0.0911, 0.0445, 0.0399),
    (-0.0104, -0.0156, -0.0227),
    (0.0308, -0.0202, -0.0055),
    (-0.0291, 0.0185, -0.0084),
)
_SD3_BIAS = (0.2394, 0.2135, 0.1925)
_FLUX_RGB = (
    (-0.0346, 0.0244, 0.0681),
    (0.0034, 0.0210, 0.0687),
    (0.0275, -0.0668, -0.0433),
    (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329),
    (0.0004, 0.0383, 0.0115),
    (0.0405, 0.0861, 0.0915),
    (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180),
    (0.1008, 0.0755, -0.0421),
    (-0.0515, 0.0201, 0.0011),
    (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749),
    (-0.1264, -0.0522, -0.1103),
    (-0.0280, -0.0881, -0.0499),
    (-0.1262, -0.0982, -0.0778),
)
_FLUX_BIAS = (-0.0329, -0.0718, -0.0851)

FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            name="sd1",
            label="Stable Diffusion 1.x",
            pipeline="StableDiffusionPipeline",
            denoiser="unet",
            denoiser_class="UNet2DConditionModel",
            native_size=512,
            steps=25,
            guidance_scale=7.0,
            scheduler="euler_a",
            schedulers=_UNET_SCHEDULERS,
            negative_prompt=True,
            size_multiple=8,
            params_millions={"unet": 859.5, "text_encoder": 123.1, "vae": 83.7},
            preview_rgb=_SD_RGB,
        ),
        Family(
            name="sd2",
            label="Stable Diffusion 2.x",
            pipeline="StableDiffusionPipeline",
            denoiser="unet",
            denoiser_class="UNet2DConditionModel",
            native_size=768,
            steps=25,
            guidance_scale=7.0,
            scheduler="euler_a",
            schedulers=_UNET_SCHEDULERS,
            negative_prompt=True,
            size_multiple=8,
            params_millions={"unet": 865.9, "text_encoder": 354.0, "vae": 83.7},
            preview_rgb=_SD_RGB,
        ),
        Family(
            name="sdxl",
            label="Stable Diffusion XL",
            pipeline="StableDiffusionXLPipeline",
            denoiser="unet",
            denoiser_class="UNet2DConditionModel",
            native_size=1024,
            steps=30,
            guidance_scale=6.0,
            scheduler="euler_a",
            schedulers=_UNET_SCHEDULERS,
            negative_prompt=True,
            size_multiple=8,
            params_millions={
                "unet": 2567.5,
                "text_encoder": 123.1,
                "text_encoder_2": 694.7,
                "vae": 83.7,
            },
            preview_rgb=_SDXL_RGB,
            preview_bias=_SDXL_BIAS,
        ),
        Family(
            name="sd3",
            label="Stable Diffusion 3.x",
            pipeline="StableDiffusion3Pipeline",
            denoiser="transformer",
            denoiser_class="SD3Transformer2DModel",
            native_size=1024,
            steps=28,
            guidance_scale=4.5,
            scheduler="flow_euler",
            schedulers=("flow_euler",),
            negative_prompt=True,
            size_multiple=16,
            params_millions={
                "transformer": 2470.0,
                "text_encoder": 123.7,
                "text_encoder_2": 694.7,
                "text_encoder_3": 4762.3,
                "vae": 83.7,
            },
            half_dtype="bfloat16",
            t5_tokens=256,
            few_step_t5_tokens=256,
            few_step_guidance=0.0,
            few_step_scheduler="flow_euler",
            preview_rgb=_SD3_RGB,
            preview_bias=_SD3_BIAS,
        ),
        Family(
            name="flux",
            label="FLUX.1",
            pipeline="FluxPipeline",
            denoiser="transformer",
            denoiser_class="FluxTransformer2DModel",
            native_size=1024,
            steps=28,
            guidance_scale=3.5,  # FLUX.1-dev's embedded guidance (not classifier-free)
            scheduler="flow_euler",
            schedulers=("flow_euler",),
            negative_prompt=False,
            size_multiple=16,
            params_millions={
                "transformer": 11901.4,
                "text_encoder": 123.1,
                "text_encoder_2": 4762.3,
                "vae": 83.8,
            },
            half_dtype="bfloat16",
            t5_tokens=512,
            few_step_t5_tokens=256,  # FLUX.1-schnell reads at most 256 T5 tokens
            few_step_guidance=0.0,
            few_step_scheduler="flow_euler",
            single_file="denoiser",
            preview_rgb=_FLUX_RGB,
            preview_bias=_FLUX_BIAS,
        ),
    )
}
FAMILY_NAMES = tuple(FAMILIES)

# The diffusers text-to-image class of each family (what a loaded pipeline says it is).
_PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": "sd1",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}


@dataclasses.dataclass(frozen=True)
class ModelProfile:
    """One configured model as requests see it: its family, defaults and limits."""

    family: Family
    few_step: bool
    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str
    schedulers: tuple[str, ...]
    guidance_range: tuple[float, float]
    max_sequence_length: int  # T5 tokens per prompt; 0 when the family has no T5 encoder

    @property
    def label(self) -> str:
        """The family's name for people, with the few-step note."""
        return f"{self.family.label}, few-step" if self.few_step else self.family.label

    def defaults(self) -> dict[str, Any]:
        """The request fields this model fills in when a request leaves them out."""
        return {
            "width": self.width,
            "height": self.height,
            "steps": self.steps,
            "guidance_scale": self.guidance_scale,
            "scheduler": self.scheduler,
        }

    def as_dict(self) -> dict[str, Any]:
        """What /config tells a client about the model."""
        return {
            "family": self.family.name,
            "family_label": self.family.label,
            "few_step": self.few_step,
            "defaults": self.defaults(),
            "schedulers": list(self.schedulers),
            "guidance_scale": {"min": self.guidance_range[0], "max": self.guidance_range[1]},
            "negative_prompt": self.family.negative_prompt,
            "size_multiple": self.family.size_multiple,
        }


def profile(
    family_name: str | None,
    few_step: bool,
    overrides: Mapping[str, Any] | None = None,
    *,
    max_width: int = 4096,
    max_height: int = 4096,
) -> ModelProfile:
    """The profile of a model of ``family_name`` (SD 1.x when unknown), with its own defaults.

    ``overrides`` are the model's declared defaults (width, height, steps, guidance_scale,
    scheduler, max_sequence_length); None values are ignored.
    """
    family = FAMILIES[family_name or "sd1"]
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if few_step and family.denoiser == "unet":
        schedulers: tuple[str, ...] = FEW_STEP_SCHEDULERS
    else:
        schedulers = family.schedulers
    guidance_range = FEW_STEP_GUIDANCE if few_step else (0.0, MAX_GUIDANCE)
    steps = FEW_STEP_STEPS if few_step else family.steps
    guidance = family.few_step_guidance if few_step else family.guidance_scale
    scheduler = family.few_step_scheduler if few_step else family.scheduler
    tokens = family.few_step_t5_tokens if few_step else family.t5_tokens
    multiple = family.size_multiple

    def side(limit: int) -> int:
        return max(multiple, min(family.native_size, limit) // multiple * multiple)

    return ModelProfile(
        family=family,
        few_step=few_step,
        width=given.get("width", side(max_width)),
        height=given.get("height", side(max_height)),
        steps=given.get("steps", steps),
        guidance_scale=given.get("guidance_scale", guidance),
        scheduler=given.get("scheduler", scheduler),
        schedulers=schedulers,
        guidance_range=guidance_range,
        max_sequence_length=given.get("max_sequence_length", tokens),
    )


def family_of_pipeline(class_name: str, cross_attention_dim: Any = None) -> str | None:
    """The family of a diffusers pipeline class (SD 2.x told apart by its 1024-wide text)."""
    family = _PIPELINE_FAMILIES.get(class_name.removesuffix("Img2Img").removesuffix("Inpaint"))
    if family == "sd1" and cross_attention_dim == 1024:
        return "sd2"
    return family


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _folder_family(folder: Path) -> str | None:
    index = _read_json(folder / "model_index.json")
    name = index.get("_class_name")
    if not isinstance(name, str):
        return None
    unet = _read_json(folder / "unet" / "config.json")
    return family_of_pipeline(name, unet.get("cross_attention_dim"))


MAX_HEADER_BYTES = 64 * 1024 * 1024


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file (tensor names, shapes, metadata); {} if none."""
    try:
        with path.open("rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            if not 0 < length <= MAX_HEADER_BYTES:
                return {}
            header = json.loads(file.read(length))
    except (OSError, ValueError, struct.error):
        return {}
    return header if isinstance(header, dict) else {}


def _keys_family(keys: Iterable[str]) -> str | None:
    """The family of a single-file checkpoint from its tensor names (original or diffusers)."""
    names = set(keys)

    def has(*fragments: str) -> bool:
        return any(any(fragment in name for fragment in fragments) for name in names)

    if has("double_blocks.0.img_attn", "single_transformer_blocks.0.", "context_embedder"):
        if has("joint_blocks.", "pos_embed"):
            return "sd3"
        return "flux"
    if has("joint_blocks.0.context_block", "text_encoders.clip_g"):
        return "sd3"
    if has("conditioner.embedders.1.model.", "add_embedding.linear_1"):
        return "sdxl"
    if has("cond_stage_model.model.transformer.resblocks"):
        return "sd2"
    if has("cond_stage_model.transformer.", "model.diffusion_model.input_blocks"):
        return "sd1"
    return None


def detect_family(source: str, config: str | None = None) -> str | None:
    """The family of a local diffusers folder or single file, from its files; None if unsure.

    Only headers and JSON files are read (no weights): cheap enough to call per request.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return _folder_family(path)
    if path.is_file():
        found = _keys_family(safetensors_header(path)) if path.suffix == ".safetensors" else None
        if found is None and config:
            return _folder_family(Path(config).expanduser())
        return found
    return None


def few_step_of(source: str, family: str | None) -> bool:
    """Whether a local FLUX folder is a distilled few-step model (no guidance embedding)."""
    if family != "flux":
        return False
    config = _read_json(Path(source).expanduser() / "transformer" / "config.json")
    return config.get("guidance_embeds") is False
