"""The one diffusers adapter: SD 1.x/2.x, SDXL, SD3 and FLUX.1 from a hub id, folder or file.

Knows nothing about HTTP. torch and diffusers are imported only when a model is loaded.
A folder or hub id loads with ``AutoPipelineForText2Image`` (whatever the installed diffusers
knows); a single file loads with its family's class and a local ``config`` folder. What differs
between families (native size, schedulers, negative prompts, text encoders) is read from
:mod:`.families`, not spread over classes.

A loaded pipeline is shared, but every call runs through a pipeline object of its own
(``from_pipe``: the same modules) with a fresh scheduler: schedulers keep step state and must
never be shared between threads (diffusers issues #1606, #3672). Tokenizers are shared state
too (a fast tokenizer sets its padding and truncation on the object before encoding), so
prompts are encoded under a lock per pipeline and the denoising loop gets the embeddings.
LoRA adapters live on the shared modules: a gate per pipeline lets calls with the same adapter
set run together and switches the set only when no call is running, so a LoRA never leaks into
another request's images.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import gc
import logging
import re
import socket
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..config import ImageModelSpec
from ..model_loader import DeviceOutOfMemory, ModelNotAvailable, import_engine
from .families import (
    FAMILIES,
    SCHEDULERS,
    detect_family,
    family_of_pipeline,
    few_step_of,
    safetensors_header,
)
from .previews import step_latents

__all__ = [
    "SCHEDULERS",
    "DiffusersFactory",
    "GenerationCancelled",
    "GenerationSpec",
    "LoraNotApplicable",
    "LoraWeight",
    "generate",
    "import_diffusers",
    "local_path",
    "place",
    "prompt_overflows",
    "prompt_token_count",
    "public_source",
]

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt")
MAX_RESIDENT_ADAPTERS = 8  # LoRAs kept loaded on one pipeline; the least recently used go
_DTYPE_BYTES = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "F16": 2, "BF16": 2, "I16": 2}


class GenerationCancelled(Exception):
    """Raised from the step callback to stop a generation between denoising steps."""


class LoraNotApplicable(Exception):
    """A LoRA file could not be applied to the pipeline (wrong family or size)."""


def _engine_imports() -> None:
    """Every heavy import of this engine, lazy attributes resolved (see ``import_engine``)."""
    import diffusers
    import torch
    import transformers

    torch.cuda.is_available()
    for name in (
        "AutoPipelineForText2Image",
        "AutoencoderKL",
        "StableDiffusionPipeline",
        "StableDiffusionXLPipeline",
        "StableDiffusion3Pipeline",
        "FluxPipeline",
        "UNet2DConditionModel",
        "FluxTransformer2DModel",
        "SD3Transformer2DModel",
    ):
        getattr(diffusers, name)
    for class_name, _ in SCHEDULERS.values():
        getattr(diffusers, class_name)
    for name in (
        "CLIPTextModel",
        "CLIPTextModelWithProjection",
        "CLIPTokenizer",
        "CLIPTokenizerFast",
        "T5EncoderModel",
        "T5TokenizerFast",
    ):
        getattr(transformers, name)
    with contextlib.suppress(ImportError):  # LoRA support (diffusers' PEFT integration)
        import peft  # noqa: F401


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


def _file_params(path: Path) -> int:
    """Parameters in a weight file: counted from a safetensors header, else guessed (fp32)."""
    if path.suffix == ".safetensors":
        header = safetensors_header(path)
        total = 0
        for name, info in header.items():
            if name == "__metadata__" or not isinstance(info, dict):
                continue
            count = 1
            for dim in info.get("shape", []):
                count *= int(dim)
            total += count
        if total:
            return total
    return path.stat().st_size // 4


def _folder_params(folder: Path) -> dict[str, int]:
    """Parameters of each component of a diffusers folder that has weights."""
    parts: dict[str, int] = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = [p for p in sub.iterdir() if p.suffix in WEIGHT_SUFFIXES]
        # A folder may hold both .bin and .safetensors copies: count one format.
        safe = [p for p in files if p.suffix == ".safetensors"]
        chosen = safe or files
        if chosen:
            parts[sub.name] = sum(_file_params(p) for p in chosen)
    return parts


class DiffusersFactory:
    """Loads one image pipeline of any family diffusers knows, for the model loader."""

    kind = "diffusers"
    offload_modes = ("model", "group")

    def __init__(
        self,
        name: str,
        spec: ImageModelSpec,
        *,
        cache_dir: Path,
        device: str = "auto",
        dtype: str = "auto",
        allow_download: bool = False,
        offload: str = "auto",
    ) -> None:
        self.name = name
        self.spec = spec
        self.cache_dir = cache_dir
        self.device = device
        self.dtype = dtype
        self.allow_download = allow_download
        #: S2I_IMAGE_OFFLOAD: "auto" lets the loader decide by the budget.
        self.offload = offload
        self._family: str | None = spec.family
        self._offloaded: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()

    # --- where it comes from -------------------------------------------------------------
    def _local(self, source: str) -> Path | None:
        return local_path(source)

    def _single_file(self) -> bool:
        return self.spec.source.endswith(WEIGHT_SUFFIXES)

    def _hub_file(self, repo: str, filename: str) -> str | None:
        # Request threads ask this while a job thread may be importing the engine.
        import_engine("huggingface_hub", _hub_imports)
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo, filename, cache_dir=self._hub_dir())
        return found if isinstance(found, str) else None

    def _hub_cached(self, repo: str) -> bool:
        filename = "config.json" if repo == self.spec.vae else "model_index.json"
        return self._hub_file(repo, filename) is not None

    def _hub_dir(self) -> str:
        return str(self.cache_dir / "hub")

    def _weights_folder(self) -> Path | None:
        """The diffusers folder holding the weights: local, or the hub cache's snapshot."""
        local = self._local(self.spec.source)
        if local is not None:
            return local if local.is_dir() else None
        index = self._hub_file(self.spec.source, "model_index.json")
        return Path(index).parent if index else None

    # --- what it is ----------------------------------------------------------------------
    def family(self) -> str | None:
        """sd1, sd2, sdxl, sd3 or flux: declared, read from the files, or seen when loaded."""
        if self._family is None:
            local = self._local(self.spec.source)
            if local is not None:
                self._family = detect_family(str(local), self.spec.config)
            else:
                folder = self._weights_folder()
                self._family = detect_family(str(folder)) if folder else None
        return self._family

    def few_step(self) -> bool:
        """Whether it is a distilled few-step model: declared, or FLUX without guidance."""
        if self.spec.few_step is not None:
            return self.spec.few_step
        folder = self._weights_folder()
        return few_step_of(str(folder), self.family()) if folder else False

    def status_fields(self) -> dict[str, Any]:
        """What /status adds to this model's row."""
        return {"family": self.family(), "few_step": self.few_step()}

    def describe(self) -> dict[str, Any]:
        """Source, family and whether it can be loaded here without a network."""
        info: dict[str, Any] = {"name": self.name, "kind": self.kind, "source": self.spec.source}
        problems = []
        for source in filter(None, (self.spec.source, self.spec.vae, self.spec.config)):
            local = self._local(source)
            if local is not None:
                if not local.exists():
                    problems.append(f"{source} does not exist")
            elif not self._hub_cached(source) and not self.allow_download:
                problems.append(f"hub model {source} is not in {self._hub_dir()}")
        if self._single_file() and not self.spec.config:
            problems.append("a single-file checkpoint needs `config`: a local diffusers folder")
        elif self._single_file() and not problems and self.family() is None:
            problems.append("the family of this single file cannot be told: set `family`")
        info["family"] = self.family()
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

    def _dtype_name(self, device: str) -> str:
        if self.dtype != "auto":
            return self.dtype
        if device != "cuda":
            return "float32"
        return FAMILIES[self.family() or "sd1"].half_dtype

    def torch_dtype(self, device: str) -> Any:
        """The family's half precision on CUDA (float16, bfloat16 for FLUX) and float32 on CPU."""
        import torch

        return getattr(torch, self._dtype_name(device))

    def component_bytes(self) -> dict[str, int]:
        """Bytes each component will take once loaded: from the files, else the family's figures.

        Empty when neither the files nor the family are known.
        """
        device = self.device if self.device != "auto" else "cuda"
        per_param = 4 if self._dtype_name(device) == "float32" else 2
        local = self._local(self.spec.source)
        parts: dict[str, int] = {}
        if local is not None and local.is_file():
            family = FAMILIES.get(self.family() or "")
            name = family.denoiser if family and family.single_file == "denoiser" else "checkpoint"
            parts[name] = _file_params(local)
            config = self._local(self.spec.config or "")
            if name != "checkpoint" and config is not None and config.is_dir():
                parts |= {k: v for k, v in _folder_params(config).items() if k != name}
        elif local is not None and local.is_dir():
            parts = _folder_params(local)
        elif local is None:
            folder = self._weights_folder()
            if folder is not None:
                parts = _folder_params(folder)
            elif self.family() is not None:
                millions = FAMILIES[self.family() or "sd1"].params_millions
                parts = {k: int(v * 1e6) for k, v in millions.items()}
        return {name: count * per_param for name, count in parts.items()}

    def estimate_bytes(self) -> int:
        """Bytes of every component once loaded; 0 when unknown."""
        return sum(self.component_bytes().values())

    def load(self, device: str, offload: str | None = None) -> Any:
        """Build the pipeline on ``device`` (offloaded when asked); offline unless allowed."""
        import_diffusers()
        import diffusers
        import torch
        import transformers
        from diffusers import AutoencoderKL, AutoPipelineForText2Image

        # Progress bars and advice about optional packages are noise in a server's log.
        diffusers.utils.logging.disable_progress_bar()
        diffusers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        problem = self.describe().get("problem")
        if problem:
            raise self.unavailable(problem)
        family_name = self.family()
        common: dict[str, Any] = {
            "dtype": self.torch_dtype(device),
            "local_files_only": not self.allow_download,
            "cache_dir": self._hub_dir(),
        }
        extra: dict[str, Any] = {}
        if family_name in (None, "sd1", "sd2"):
            extra = {"safety_checker": None, "feature_extractor": None}
            extra["requires_safety_checker"] = False
        try:
            if self.spec.vae:
                extra["vae"] = AutoencoderKL.from_pretrained(self.spec.vae, **common)
            if self._single_file():
                family = FAMILIES[family_name or "sd1"]
                pipeline_class = getattr(diffusers, family.pipeline)
                if family.single_file == "denoiser":
                    # The file is the denoiser (as FLUX checkpoints ship); the rest is `config`.
                    denoiser = getattr(diffusers, family.denoiser_class).from_single_file(
                        self.spec.source,
                        config=self.spec.config,
                        subfolder=family.denoiser,
                        **common,
                    )
                    extra[family.denoiser] = denoiser
                    pipe = pipeline_class.from_pretrained(self.spec.config, **common, **extra)
                else:
                    pipe = pipeline_class.from_single_file(
                        self.spec.source, config=self.spec.config, **common, **extra
                    )
            else:
                pipe = AutoPipelineForText2Image.from_pretrained(
                    self.spec.source, **common, **extra
                )
            self._family = self._family or _pipeline_family(pipe)
            pipe.set_progress_bar_config(disable=True)
            pipe = self._place(pipe, device, offload)
            if device == "cuda":
                self._warm_up(pipe)
        except torch.cuda.OutOfMemoryError as exc:
            raise DeviceOutOfMemory(str(exc)) from exc
        except (OSError, ValueError) as exc:
            raise self.unavailable(_why(exc, self.allow_download)) from exc
        return pipe

    def _place(self, pipe: Any, device: str, offload: str | None) -> Any:
        pipe = place(pipe, device, offload)
        if offload:
            self._offloaded[pipe] = offload
            log.info(
                "image model %s is offloaded (%s) to serve from %s", self.name, offload, device
            )
        return pipe

    def _warm_up(self, pipe: Any) -> None:
        """One tiny generation so the first real request does not pay for kernel selection."""
        import torch

        with torch.inference_mode():  # 64 px: a multiple of every family's size step
            pipe(prompt="warm up", num_inference_steps=1, width=64, height=64, output_type="latent")

    def measure(self, model: Any) -> int:
        """Bytes the pipeline holds on its device: every module, or the largest offloaded part."""
        parts = _module_bytes(model)
        mode = self._offloaded.get(model)
        if mode == "model":  # one whole component on the device at a time
            return max(parts.values(), default=0)
        if mode == "group":  # one layer at a time: count the largest block
            return _largest_block(model)
        return sum(parts.values())

    def move(self, model: Any, device: str) -> Any | None:
        """Move every module (the GPU->CPU offload tier and back); None if the GPU is full.

        An offloaded pipeline stays where its hooks put it: None (the loader unloads it).
        """
        import torch

        if model in self._offloaded:
            return None
        try:
            return model.to(device)
        except torch.cuda.OutOfMemoryError:
            # Half-moved: put it all back in RAM; the loader then reloads or reports 503.
            model.to("cpu")
            torch.cuda.empty_cache()
            return None

    def release(self, model: Any) -> None:
        """Drop the pipeline and return cached GPU memory."""
        if model is not None and model in self._offloaded:
            with contextlib.suppress(Exception):  # hooks hold references to the modules
                model.remove_all_hooks()
        del model
        gc.collect()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()


def place(pipe: Any, device: str, offload: str | None = None) -> Any:
    """Move ``pipe`` to ``device`` whole, or spread it with diffusers' offloading.

    ``offload`` "model": each component goes to the device when it runs (model CPU offload);
    "group": layer by layer, copies overlapped with compute on CUDA (group offloading). Whole
    on CUDA, a UNet runs in channels-last layout. Attention is PyTorch's SDPA (diffusers'
    default processors on torch 2).
    """
    import torch

    if offload:
        _OFFLOADED.add(pipe)
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "group":
        pipe.enable_group_offload(
            onload_device=torch.device(device),
            offload_device=torch.device("cpu"),
            offload_type="leaf_level",
            use_stream=device == "cuda",
        )
    else:
        pipe = pipe.to(device)
        denoiser = getattr(pipe, "unet", None)
        if device == "cuda" and denoiser is not None:
            denoiser.to(memory_format=torch.channels_last)
    return pipe


def _pipeline_family(pipe: Any) -> str | None:
    unet = getattr(pipe, "unet", None)
    width = getattr(getattr(unet, "config", None), "cross_attention_dim", None)
    return family_of_pipeline(type(pipe).__name__, width)


def _module_bytes(pipe: Any) -> dict[str, int]:
    import torch

    sizes: dict[str, int] = {}
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            sizes[name] = sum(
                t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers())
            )
    return sizes


def _largest_block(pipe: Any) -> int:
    import torch

    largest = 0
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            for child in module.children():
                size = sum(t.numel() * t.element_size() for t in child.parameters())
                largest = max(largest, size)
    return largest


# --- one generation --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoraWeight:
    """A LoRA file applied at a weight for one call."""

    name: str
    path: str
    weight: float
    mtime: float = 0.0  # a changed file is loaded again


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
    family: str | None = None  # None: read from the pipeline
    few_step: bool = False
    loras: tuple[LoraWeight, ...] = ()
    max_sequence_length: int = 0  # T5 tokens (FLUX, SD3); 0: the family's


_TOKENIZER_LOCKS: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()
_OFFLOADED: weakref.WeakSet[Any] = weakref.WeakSet()  # pipelines placed with offloading
# Per pipeline, a scheduler of each kind configured once: every call gets a copy of its own.
_SCHEDULERS: weakref.WeakKeyDictionary[Any, dict[tuple[str, bool], Any]] = (
    weakref.WeakKeyDictionary()
)


def _tokenizer_lock(pipe: Any) -> threading.Lock:
    """The lock that serialises use of ``pipe``'s tokenizers."""
    with _LOCKS_GUARD:
        lock = _TOKENIZER_LOCKS.get(pipe.tokenizer)
        if lock is None:
            lock = _TOKENIZER_LOCKS[pipe.tokenizer] = threading.Lock()
        return lock


def prompt_token_count(pipe: Any, prompt: str) -> int:
    """Tokens of ``prompt`` for the pipeline's (first) text encoder, with start and end tokens."""
    with _tokenizer_lock(pipe):
        return len(pipe.tokenizer(prompt, truncation=False).input_ids)


def _t5_tokenizer(pipe: Any) -> Any:
    family = _pipeline_family(pipe)
    name = {"flux": "tokenizer_2", "sd3": "tokenizer_3"}.get(family or "")
    return getattr(pipe, name, None) if name else None


def prompt_overflows(pipe: Any, prompt: str, max_sequence_length: int = 0) -> bool:
    """Whether the pipeline reads only part of ``prompt``.

    CLIP reads 77 tokens; a pipeline with a T5 encoder (FLUX, SD3) reads the whole prompt
    through T5, up to ``max_sequence_length`` tokens, so that is the limit that counts there.
    """
    t5 = _t5_tokenizer(pipe)
    with _tokenizer_lock(pipe):
        if t5 is not None and max_sequence_length:
            return len(t5(prompt, truncation=False).input_ids) > max_sequence_length
        return len(pipe.tokenizer(prompt, truncation=False).input_ids) > (
            pipe.tokenizer.model_max_length
        )


def _scheduler_for(pipe: Any, spec: GenerationSpec) -> Any:
    """A fresh scheduler of the kind ``spec`` names, configured from the pipeline's own."""
    import inspect

    import diffusers

    key = (spec.scheduler, spec.few_step)
    with _LOCKS_GUARD:
        template = _SCHEDULERS.setdefault(pipe, {}).get(key)
    if template is None:
        class_name, extra = SCHEDULERS[spec.scheduler]
        scheduler_class = getattr(diffusers, class_name)
        config = dict(extra)
        # Few-step models are distilled for the last timesteps: "trailing" spacing starts there.
        if spec.few_step and "timestep_spacing" in inspect.signature(scheduler_class).parameters:
            config["timestep_spacing"] = "trailing"
        template = scheduler_class.from_config(pipe.scheduler.config, **config)
        with _LOCKS_GUARD:
            _SCHEDULERS[pipe][key] = template
    # Schedulers keep step state: a copy per call (cheaper than configuring one each time).
    return copy.deepcopy(template)


def _request_pipeline(pipe: Any, scheduler: Any) -> Any:
    """A pipeline object of the call's own around the shared modules, with its scheduler.

    A shallow copy: the same modules and configuration, while what a call writes on the
    pipeline (its scheduler, guidance, step counters) stays on the copy. The copy does not
    re-arm model-offload hooks after the call; the shared pipeline keeps them.
    """
    request_pipe = copy.copy(pipe)
    request_pipe.__dict__.pop("_all_hooks", None)
    request_pipe.scheduler = scheduler
    request_pipe.set_progress_bar_config(disable=True)
    return request_pipe


def _device_of(pipe: Any) -> Any:
    """Where the pipeline computes: its onload device when offloaded, else its weights'."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    if pipe in _OFFLOADED or denoiser is None:
        return pipe._execution_device
    return next(denoiser.parameters()).device


class _AdapterGate:
    """The LoRA adapters active on one shared pipeline, switched only when no call runs.

    Calls go in arrival order: one whose adapter set is the active one joins the calls
    running; one that needs another set waits until they have finished, then switches.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.active: tuple[tuple[str, float], ...] | None = ()  # None: unknown (a switch failed)
        self.users = 0
        self.queue: collections.deque[object] = collections.deque()
        self.loaded: collections.OrderedDict[str, tuple[str, float]] = collections.OrderedDict()

    @contextlib.contextmanager
    def use(self, pipe: Any, loras: tuple[LoraWeight, ...]) -> Iterator[None]:
        """Hold ``pipe`` with exactly ``loras`` active for the length of the block."""
        want = tuple(sorted((lora.name, lora.weight) for lora in loras))
        ticket = object()
        with self.cond:
            self.queue.append(ticket)
            try:
                while not (self.queue[0] is ticket and (want == self.active or self.users == 0)):
                    self.cond.wait()
                if want != self.active:
                    self._switch(pipe, loras, want)
                self.users += 1
            finally:
                self.queue.remove(ticket)
                self.cond.notify_all()
        try:
            yield
        finally:
            with self.cond:
                self.users -= 1
                self.cond.notify_all()

    def _switch(
        self, pipe: Any, loras: tuple[LoraWeight, ...], want: tuple[tuple[str, float], ...]
    ) -> None:
        """Load what is missing and activate ``loras`` (none: adapters off). Lock held."""
        self.active = None  # loading an adapter activates it: unknown until the switch is done
        names = [self._load(pipe, lora) for lora in loras]
        if names:
            pipe.enable_lora()
            pipe.set_adapters(names, adapter_weights=[lora.weight for lora in loras])
        elif self.loaded:
            pipe.disable_lora()
        self.active = want

    def _load(self, pipe: Any, lora: LoraWeight) -> str:
        adapter = "lora_" + re.sub(r"\W", "_", lora.name)
        known = self.loaded.get(adapter)
        if known == (lora.path, lora.mtime):
            self.loaded.move_to_end(adapter)
            return adapter
        if known is not None:  # the file changed: load it again
            pipe.delete_adapters(adapter)
            del self.loaded[adapter]
        while len(self.loaded) >= MAX_RESIDENT_ADAPTERS:
            oldest, _ = self.loaded.popitem(last=False)
            pipe.delete_adapters(oldest)
        try:
            pipe.load_lora_weights(lora.path, adapter_name=adapter)
        except Exception as exc:
            with contextlib.suppress(Exception):
                pipe.delete_adapters(adapter)
            # A file for other layer shapes or names is the request's problem; anything else
            # (an I/O or device error) is the server's and propagates as it is.
            mismatch = isinstance(exc, ValueError | KeyError) or "size mismatch" in str(exc)
            if not mismatch:
                raise
            raise LoraNotApplicable(
                f"LoRA {lora.name!r} does not fit this model ({type(exc).__name__})"
            ) from exc
        applied = {name for names in pipe.get_list_adapters().values() for name in names}
        if adapter not in applied:  # diffusers found no layer of this model in the file
            raise LoraNotApplicable(f"LoRA {lora.name!r} has no layer this model has")
        self.loaded[adapter] = (lora.path, lora.mtime)
        return adapter


_GATES: weakref.WeakKeyDictionary[Any, _AdapterGate] = weakref.WeakKeyDictionary()


def _gate(pipe: Any) -> _AdapterGate:
    with _LOCKS_GUARD:
        gate = _GATES.get(pipe)
        if gate is None:
            gate = _GATES[pipe] = _AdapterGate()
        return gate


def _encoded(
    request_pipe: Any, spec: GenerationSpec, family: str, guided: bool, device: Any
) -> dict[str, Any] | None:
    """The call's prompt embeddings for ``family``; None: the pipeline encodes in the call."""
    negatives = None
    if FAMILIES[family].negative_prompt and any(spec.negative_prompts):
        negatives = [n or "" for n in spec.negative_prompts]
    if family in ("sd1", "sd2"):
        embeds, negative = request_pipe.encode_prompt(
            spec.prompts, device, 1, guided, negative_prompt=negatives
        )
        return {"prompt_embeds": embeds, "negative_prompt_embeds": negative if guided else None}
    if family == "sdxl":
        embeds, negative, pooled, negative_pooled = request_pipe.encode_prompt(
            prompt=spec.prompts,
            device=device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=guided,
            negative_prompt=negatives,
        )
        call = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if guided:
            call |= {"negative_prompt_embeds": negative}
            call |= {"negative_pooled_prompt_embeds": negative_pooled}
        return call
    if family == "flux":
        tokens = spec.max_sequence_length or FAMILIES["flux"].t5_tokens
        embeds, pooled, _ids = request_pipe.encode_prompt(
            prompt=spec.prompts,
            prompt_2=None,
            device=device,
            num_images_per_prompt=1,
            max_sequence_length=tokens,
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    return None


def generate(
    pipe: Any,
    spec: GenerationSpec,
    *,
    on_step: Callable[[int, int], None] | None = None,
    variant: Any = None,
    extra: dict[str, Any] | None = None,
) -> list[Any]:
    """Run one isolated pipeline call; returns PIL images in the order of ``spec.prompts``.

    ``on_step(done, total)`` is called after each denoising step; raising
    :class:`GenerationCancelled` from it stops the call before the next step. ``spec.loras``
    are active for this call only. ``variant``: a pipeline sharing ``pipe``'s modules that
    runs the call instead (img2img, inpainting: see ``engines/editing.py``), with ``extra``
    call arguments (a None value removes that argument).
    """
    import_diffusers()
    import torch

    family = spec.family or _pipeline_family(pipe) or "sd1"
    request_pipe = _request_pipeline(variant or pipe, _scheduler_for(pipe, spec))
    # CPU generators: the same seed gives the same image whatever the device or batch.
    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in spec.seeds]
    guided = spec.guidance_scale > 1.0

    def step_end(_pipe: Any, index: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        if on_step is not None:
            on_step(index + 1, spec.steps)
        step_latents(_pipe, spec, index + 1, spec.steps, tensors.get("latents"))
        return tensors

    call: dict[str, Any] = {
        "width": spec.width,
        "height": spec.height,
        "num_inference_steps": spec.steps,
        "guidance_scale": spec.guidance_scale,
        "generator": generators,
        "callback_on_step_end": step_end,
    }
    if family in ("flux", "sd3"):
        call["max_sequence_length"] = spec.max_sequence_length or FAMILIES[family].t5_tokens
    for key, value in (extra or {}).items():
        if value is None:
            call.pop(key, None)
        else:
            call[key] = value
    try:
        with _gate(pipe).use(pipe, spec.loras), torch.inference_mode():
            with _tokenizer_lock(pipe):
                embeddings = _encoded(request_pipe, spec, family, guided, _device_of(pipe))
                if embeddings is None:  # a family without a split encoder: the whole call
                    negatives = [n or "" for n in spec.negative_prompts]
                    extra = {"negative_prompt": negatives} if any(spec.negative_prompts) else {}
                    result = request_pipe(prompt=spec.prompts, **extra, **call)
            if embeddings is not None:
                result = request_pipe(**embeddings, **call)
    except torch.cuda.OutOfMemoryError as exc:
        raise DeviceOutOfMemory(str(exc)) from exc
    return list(result.images)
