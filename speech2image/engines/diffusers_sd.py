"""diffusers adapter: Stable Diffusion 1.x checkpoints from the hub, a folder or a single file.

Knows nothing about HTTP. torch and diffusers are imported only when a model is loaded.
A loaded pipeline is shared, but every call runs through a pipeline object of its own with a
fresh scheduler: schedulers keep step state and must never be shared between threads
(diffusers issues #1606, #3672). The tokenizer is shared state too (a fast tokenizer sets its
padding and truncation on the object before encoding), so prompts are encoded under a lock
per pipeline and the denoising loop gets the embeddings.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import socket
import sys
import threading
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import ImageModelSpec
from ..model_loader import DeviceOutOfMemory, ModelNotAvailable, import_engine

__all__ = [
    "SCHEDULERS",
    "DiffusersFactory",
    "GenerationCancelled",
    "generate",
    "import_diffusers",
    "local_path",
    "prompt_token_count",
    "public_source",
]

log = logging.getLogger(__name__)

# name -> (diffusers class, extra config). Names are what the API accepts.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt")


class GenerationCancelled(Exception):
    """Raised from the step callback to stop a generation between denoising steps."""


def _engine_imports() -> None:
    """Every heavy import of this engine, lazy attributes resolved (see ``import_engine``)."""
    import diffusers
    import torch
    import transformers

    torch.cuda.is_available()
    for name in ("AutoencoderKL", "StableDiffusionPipeline", "UNet2DConditionModel"):
        getattr(diffusers, name)
    for class_name, _ in SCHEDULERS.values():
        getattr(diffusers, class_name)
    for name in ("CLIPTextModel", "CLIPTokenizer", "CLIPTokenizerFast"):
        getattr(transformers, name)


def _hub_imports() -> None:
    from huggingface_hub import try_to_load_from_cache  # noqa: F401


def import_diffusers() -> None:
    """Import torch, diffusers and transformers once, safely from any thread."""
    import_engine("diffusers", _engine_imports)


def _cuda_available() -> bool:
    import_diffusers()
    import torch

    return bool(torch.cuda.is_available())


def _why(exc: BaseException, downloading: bool) -> str:
    """A one-line reason for a failed load; a network failure deep in the chain is named."""
    cause: BaseException | None = exc
    while cause is not None:
        network = isinstance(cause, ConnectionError | TimeoutError | socket.gaierror) or (
            type(cause).__module__.split(".")[0].rstrip("0123456789") in _NETWORK_LIBRARIES
        )
        if downloading and network:
            reason = f"{type(cause).__name__}: {cause}".splitlines()[0]
            return f"the model hub could not be reached to download it ({reason})"
        cause = cause.__cause__ or cause.__context__
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


_NETWORK_LIBRARIES = {"httpx", "httpcore", "requests", "urllib", "aiohttp"}


def local_path(source: str) -> Path | None:
    """The local file or folder ``source`` names, or None for a hub id."""
    path = Path(source).expanduser()
    return path if path.exists() or source.startswith(("/", ".", "~")) else None


def public_source(name: str, spec: ImageModelSpec) -> str:
    """What records may show of where model ``name`` came from: its hub id, never a path."""
    return name if local_path(spec.source) is not None else spec.source


class DiffusersFactory:
    """Loads one Stable Diffusion pipeline for the model loader."""

    kind = "diffusers"

    def __init__(
        self,
        name: str,
        spec: ImageModelSpec,
        *,
        cache_dir: Path,
        device: str = "auto",
        dtype: str = "auto",
        allow_download: bool = False,
    ) -> None:
        self.name = name
        self.spec = spec
        self.cache_dir = cache_dir
        self.device = device
        self.dtype = dtype
        self.allow_download = allow_download

    # --- where it comes from -------------------------------------------------------------
    def _local(self, source: str) -> Path | None:
        return local_path(source)

    def _hub_cached(self, repo: str) -> bool:
        # Request threads ask this while a job thread may be importing the engine.
        import_engine("huggingface_hub", _hub_imports)
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, "model_index.json", cache_dir=self._hub_dir())
        if repo == self.spec.vae:
            found = try_to_load_from_cache(repo, "config.json", cache_dir=self._hub_dir())
        return isinstance(found, str)

    def _hub_dir(self) -> str:
        return str(self.cache_dir / "hub")

    def describe(self) -> dict[str, Any]:
        """Source and whether it can be loaded here without a network."""
        info: dict[str, Any] = {"name": self.name, "kind": self.kind, "source": self.spec.source}
        problems = []
        for source in filter(None, (self.spec.source, self.spec.vae, self.spec.config)):
            local = self._local(source)
            if local is not None:
                if not local.exists():
                    problems.append(f"{source} does not exist")
            elif not self._hub_cached(source) and not self.allow_download:
                problems.append(f"hub model {source} is not in {self._hub_dir()}")
        single = self.spec.source.endswith(WEIGHT_SUFFIXES)
        if single and not self.spec.config:
            problems.append("a single-file checkpoint needs `config`: a local diffusers folder")
        info["available"] = not problems
        info["offline"] = not problems and not self.allow_download
        if problems:
            info["problem"] = "; ".join(problems)
        return info

    def unavailable(self, detail: str) -> ModelNotAvailable:
        """The error saying why this checkpoint cannot be had and how to get one that can."""
        ways = [
            "put the checkpoint in a local diffusers folder or .safetensors file and point "
            "S2I_IMAGE_MODELS at it",
            f"pre-download it into {self._hub_dir()}",
        ]
        if not self.allow_download:
            ways.append("set S2I_IMAGE_ALLOW_DOWNLOAD=true where the hub is reachable")
        ways.append(
            "or try the service with the tiny demo model: `speech2image build-tiny-model DIR` "
            "prints the S2I_IMAGE_MODELS value that uses it"
        )
        return ModelNotAvailable(
            f"image model {self.name!r} ({self.spec.source}) is not available: {detail}. "
            f"To fix it: {'; '.join(ways)}"
        )

    # --- loader protocol -----------------------------------------------------------------
    def home_device(self) -> str:
        """CUDA when asked for or available under 'auto', else CPU."""
        import_diffusers()  # the first lease of a fresh process imports the engine here
        if self.device == "auto":
            self.device = "cuda" if _cuda_available() else "cpu"
        return self.device

    def torch_dtype(self, device: str) -> Any:
        """float16 on CUDA and float32 on CPU under 'auto'."""
        import torch

        if self.dtype == "auto":
            return torch.float16 if device == "cuda" else torch.float32
        return getattr(torch, self.dtype)

    def estimate_bytes(self) -> int:
        """Weight file sizes when local; 0 when unknown."""
        local = self._local(self.spec.source)
        if local is None or not local.exists():
            return 0
        if local.is_file():
            return local.stat().st_size
        return sum(
            p.stat().st_size
            for sub in ("unet", "vae", "text_encoder")
            for p in (local / sub).glob("*")
            if p.suffix in WEIGHT_SUFFIXES
        )

    def load(self, device: str) -> Any:
        """Build the pipeline on ``device``; offline unless downloads are allowed."""
        import_diffusers()
        import diffusers
        import torch
        import transformers
        from diffusers import AutoencoderKL, StableDiffusionPipeline

        # Progress bars and advice about optional packages are noise in a server's log.
        diffusers.utils.logging.disable_progress_bar()
        diffusers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        problem = self.describe().get("problem")
        if problem:
            raise self.unavailable(problem)
        dtype = self.torch_dtype(device)
        common: dict[str, Any] = {
            "dtype": dtype,
            "local_files_only": not self.allow_download,
            "cache_dir": self._hub_dir(),
        }
        extra: dict[str, Any] = {
            "safety_checker": None,
            "feature_extractor": None,
            "requires_safety_checker": False,
        }
        try:
            if self.spec.vae:
                extra["vae"] = AutoencoderKL.from_pretrained(self.spec.vae, **common)
            if self.spec.source.endswith(WEIGHT_SUFFIXES):
                pipe = StableDiffusionPipeline.from_single_file(
                    self.spec.source, config=self.spec.config, **common, **extra
                )
            else:
                pipe = StableDiffusionPipeline.from_pretrained(self.spec.source, **common, **extra)
            pipe.set_progress_bar_config(disable=True)
            pipe = pipe.to(device)
            if device == "cuda":
                pipe.unet.to(memory_format=torch.channels_last)
                self._warm_up(pipe)
        except torch.cuda.OutOfMemoryError as exc:
            raise DeviceOutOfMemory(str(exc)) from exc
        except (OSError, ValueError) as exc:
            raise self.unavailable(_why(exc, self.allow_download)) from exc
        return pipe

    def _warm_up(self, pipe: Any) -> None:
        """One tiny generation so the first real request does not pay for kernel selection."""
        import torch

        with torch.inference_mode():
            pipe(prompt="warm up", num_inference_steps=1, width=64, height=64, output_type="latent")

    def measure(self, model: Any) -> int:
        """Exact bytes of every parameter and buffer of the pipeline's modules."""
        import torch

        total = 0
        for module in model.components.values():
            if isinstance(module, torch.nn.Module):
                for tensor in (*module.parameters(), *module.buffers()):
                    total += tensor.numel() * tensor.element_size()
        return total

    def move(self, model: Any, device: str) -> Any | None:
        """Move every module (the GPU->CPU offload tier and back); None if the GPU is full."""
        import torch

        try:
            return model.to(device)
        except torch.cuda.OutOfMemoryError:
            # Half-moved: put it all back in RAM; the loader then reloads or reports 503.
            model.to("cpu")
            torch.cuda.empty_cache()
            return None

    def release(self, model: Any) -> None:
        """Drop the pipeline and return cached GPU memory."""
        del model
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()


@dataclasses.dataclass(frozen=True)
class GenerationSpec:
    """One pipeline call: a batch of prompts sharing size, steps, guidance and scheduler."""

    prompts: list[str]
    negative_prompts: list[str | None]
    seeds: list[int]
    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: str


_TOKENIZER_LOCKS: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _tokenizer_lock(pipe: Any) -> threading.Lock:
    """The lock that serialises use of ``pipe``'s tokenizer."""
    with _LOCKS_GUARD:
        lock = _TOKENIZER_LOCKS.get(pipe.tokenizer)
        if lock is None:
            lock = _TOKENIZER_LOCKS[pipe.tokenizer] = threading.Lock()
        return lock


def prompt_token_count(pipe: Any, prompt: str) -> int:
    """Tokens of ``prompt`` for the pipeline's text encoder (with start and end tokens)."""
    with _tokenizer_lock(pipe):
        return len(pipe.tokenizer(prompt, truncation=False).input_ids)


def _scheduler_for(pipe: Any, name: str) -> Any:
    import diffusers

    class_name, extra = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(pipe.scheduler.config, **extra)


def generate(
    pipe: Any,
    spec: GenerationSpec,
    *,
    on_step: Callable[[int, int], None] | None = None,
) -> list[Any]:
    """Run one isolated pipeline call; returns PIL images in the order of ``spec.prompts``.

    ``on_step(done, total)`` is called after each denoising step; raising
    :class:`GenerationCancelled` from it stops the call before the next step.
    """
    import_diffusers()
    import torch
    from diffusers import StableDiffusionPipeline

    # A pipeline object of our own around the shared modules, with a scheduler of our own.
    request_pipe = StableDiffusionPipeline(
        **{**pipe.components, "scheduler": _scheduler_for(pipe, spec.scheduler)},
        requires_safety_checker=False,
    )
    request_pipe.set_progress_bar_config(disable=True)
    # CPU generators: the same seed gives the same image whatever the device or batch.
    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in spec.seeds]
    negatives = None
    if any(spec.negative_prompts):
        negatives = [n or "" for n in spec.negative_prompts]
    guided = spec.guidance_scale > 1.0

    def step_end(_pipe: Any, index: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if on_step is not None:
            on_step(index + 1, spec.steps)
        return tensors

    try:
        with torch.inference_mode():
            with _tokenizer_lock(pipe):
                prompt_embeds, negative_embeds = request_pipe.encode_prompt(
                    spec.prompts,
                    request_pipe._execution_device,
                    1,
                    guided,
                    negative_prompt=negatives,
                )
            result = request_pipe(
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_embeds if guided else None,
                width=spec.width,
                height=spec.height,
                num_inference_steps=spec.steps,
                guidance_scale=spec.guidance_scale,
                generator=generators,
                callback_on_step_end=step_end,
            )
    except torch.cuda.OutOfMemoryError as exc:
        raise DeviceOutOfMemory(str(exc)) from exc
    return list(result.images)
