"""Tiny random-weight image pipelines and LoRAs, built fully offline (tests, demos, benchmarks).

Each family gets the real architecture at a toy size, saved in the diffusers layout, so the
service loads it through the same code as a real checkpoint (diffusers' own fast tests do the
same with ``get_dummy_components``). The pictures are noise; the loading, batching, seeding,
LoRA and memory logic they exercise are real. Tokenizers are made here too: a byte-level CLIP
vocabulary without merges, and a T5 (Unigram) vocabulary of single characters.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any

__all__ = [
    "ARCHITECTURES",
    "FAMILIES",
    "FULL_SIZES",
    "LORA_ARCHITECTURES",
    "TINY_SIZES",
    "build_random_pipeline",
    "build_tiny_lora",
    "build_tiny_model",
    "build_tiny_pipeline",
    "byte_level_vocab",
    "random_pipeline",
    "t5_vocab",
    "write_tokenizer_files",
]

MODEL_MAX_LENGTH = 77
T5_MAX_LENGTH = 512
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MERGES_HEADER = "#version: 0.2\n"

#: The families ``build-tiny-model --family`` knows (``sd`` is Stable Diffusion 1.x).
FAMILIES = ("sd", "sdxl", "flux")

#: What a LoRA file says it is for (the "modelspec" metadata kohya and ComfyUI write too).
LORA_ARCHITECTURES = {
    "sd": "stable-diffusion-v1/lora",
    "sdxl": "stable-diffusion-xl-v1-base/lora",
    "flux": "flux-1-schnell/lora",
}


def _bytes_to_unicode() -> list[str]:
    """Return CLIP's 256 byte-level unicode symbols in CLIP vocab order (printable bytes first)."""
    byte_values = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    code_points = byte_values[:]
    extra = 0
    for b in range(256):
        if b not in byte_values:
            byte_values.append(b)
            code_points.append(256 + extra)
            extra += 1
    return [chr(c) for c in code_points]


def byte_level_vocab() -> dict[str, int]:
    """Return a merge-free CLIP vocab: byte symbols, their `</w>` forms, then BOS and EOS."""
    symbols = _bytes_to_unicode()
    tokens = symbols + [f"{s}</w>" for s in symbols] + [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}


def write_tokenizer_files(directory: str | os.PathLike) -> pathlib.Path:
    """Write CLIP-style vocab.json and a header-only merges.txt into `directory`."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab_json = json.dumps(byte_level_vocab(), ensure_ascii=False)
    (directory / "vocab.json").write_text(vocab_json, encoding="utf-8")
    (directory / "merges.txt").write_text(MERGES_HEADER, encoding="utf-8")
    return directory


def t5_vocab() -> list[tuple[str, float]]:
    """A SentencePiece-style Unigram vocabulary: T5's specials, the word marker, ASCII pieces.

    Ids 0-2 are ``<pad>``, ``</s>`` and ``<unk>`` as in T5. A word-initial letter costs less
    than a lone marker plus the letter, so words tokenize the way SentencePiece would split them.
    """
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    chars = [(chr(c), -3.0) for c in range(ord("!"), ord("~") + 1)]
    starts = [("\u2581" + chr(c), -2.5) for c in range(ord("!"), ord("~") + 1)]
    return specials + chars + starts


def _clip_tokenizer() -> Any:
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="tiny-clip-tokenizer-") as tmp:
        return CLIPTokenizer.from_pretrained(
            str(write_tokenizer_files(tmp)),
            model_max_length=MODEL_MAX_LENGTH,
            pad_token=EOS_TOKEN,
            local_files_only=True,
        )


def _t5_tokenizer() -> Any:
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=t5_vocab(), extra_ids=0, model_max_length=T5_MAX_LENGTH)


# Component sizes. "tiny" is for tests and the offline demo (about 8 MB, 64x64 images);
# "sd15" is the full Stable Diffusion 1.5 architecture, the honest fixture for load, memory and
# GPU throughput measurements. Both get random weights.
ARCHITECTURES: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "unet": {
            "sample_size": 32,
            "block_out_channels": (32, 64),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
            "cross_attention_dim": 32,
        },
        "vae": {
            "sample_size": 64,
            "block_out_channels": (32, 64),
            "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2,
            "layers_per_block": 1,
        },
        "text": {
            "hidden_size": 32,
            "intermediate_size": 37,
            "projection_dim": 32,
            "num_hidden_layers": 5,
            "num_attention_heads": 4,
        },
    },
    "sd15": {
        "unet": {
            "sample_size": 64,
            "block_out_channels": (320, 640, 1280, 1280),
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "cross_attention_dim": 768,
        },
        "vae": {
            "sample_size": 512,
            "block_out_channels": (128, 256, 512, 512),
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "layers_per_block": 2,
        },
        "text": {
            "hidden_size": 768,
            "intermediate_size": 3072,
            "projection_dim": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
        },
    },
}

# SDXL at toy size: the UNet reads both text encoders (32 + 64 = 96 wide) and the "text_time"
# added conditioning: 6 size/crop numbers of 8 channels each plus the 32-wide pooled embedding.
# The two encoders differ in width, as in SDXL (768 and 1280): single-file loading tells them
# apart by it.
TINY_SDXL_UNET: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (32, 64),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "transformer_layers_per_block": (1, 2),
    "projection_class_embeddings_input_dim": 6 * 8 + 32,
    "cross_attention_dim": 96,
}
TINY_SDXL_TEXT_2: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 74,
    "projection_dim": 32,
    "num_hidden_layers": 5,
    "num_attention_heads": 4,
}

# FLUX at toy size: a 4-channel latent packed 2x2 (16 channels into the transformer), one
# double-stream and one single-stream block, rotary axes summing to the head width; the VAE has
# FLUX's four stages, so sizes are multiples of 16 as for the real model.
TINY_FLUX_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "guidance_embeds": False,
    "axes_dims_rope": (4, 4, 8),
}
TINY_FLUX_VAE: dict[str, Any] = {
    "sample_size": 64,
    "block_out_channels": (8, 8, 8, 8),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "shift_factor": 0.0609,
    "scaling_factor": 1.5035,
}
TINY_T5: dict[str, Any] = {
    "d_model": 32,
    "d_ff": 37,
    "d_kv": 8,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
}

# The published architectures (SDXL base 1.0, FLUX.1-schnell) with random weights: the honest
# fixtures for GPU memory and speed figures (bench/families_gpu.py builds them on the GPU).
FULL_SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "sdxl": {
        "unet": {
            "sample_size": 128,
            "in_channels": 4,
            "out_channels": 4,
            "layers_per_block": 2,
            "block_out_channels": (320, 640, 1280),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "attention_head_dim": (5, 10, 20),
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "transformer_layers_per_block": (1, 2, 10),
            "projection_class_embeddings_input_dim": 2816,
            "cross_attention_dim": 2048,
        },
        "vae": {**ARCHITECTURES["sd15"]["vae"], "sample_size": 1024},
        "text": ARCHITECTURES["sd15"]["text"],
        "text_2": {
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "projection_dim": 1280,
            "num_hidden_layers": 32,
            "num_attention_heads": 20,
        },
    },
    "flux": {
        "transformer": {
            "patch_size": 1,
            "in_channels": 64,
            "num_layers": 19,
            "num_single_layers": 38,
            "attention_head_dim": 128,
            "num_attention_heads": 24,
            "joint_attention_dim": 4096,
            "pooled_projection_dim": 768,
            "guidance_embeds": False,
            "axes_dims_rope": (16, 56, 56),
        },
        "vae": {
            "sample_size": 1024,
            "block_out_channels": (128, 256, 512, 512),
            "layers_per_block": 2,
            "latent_channels": 16,
            "norm_num_groups": 32,
            "shift_factor": 0.1159,
            "scaling_factor": 0.3611,
        },
        "text": ARCHITECTURES["sd15"]["text"],
        "t5": {
            "d_model": 4096,
            "d_ff": 10240,
            "d_kv": 64,
            "num_layers": 24,
            "num_heads": 64,
            "relative_attention_num_buckets": 32,
        },
    },
}
TINY_SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "sdxl": {
        "unet": TINY_SDXL_UNET,
        "vae": ARCHITECTURES["tiny"]["vae"],
        "text": ARCHITECTURES["tiny"]["text"],
        "text_2": TINY_SDXL_TEXT_2,
    },
    "flux": {
        "transformer": TINY_FLUX_TRANSFORMER,
        "vae": TINY_FLUX_VAE,
        "text": ARCHITECTURES["tiny"]["text"],
        "t5": TINY_T5,
    },
}


def _clip_text_config(tokenizer: Any, sizes: dict[str, Any]) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=MODEL_MAX_LENGTH,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **sizes,
    )


def _sd_vae(sizes: dict[str, Any]) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32, **sizes
    )


def _save(
    pipe: Any, path: pathlib.Path, clip_tokenizers: tuple[str, ...], half: bool = False
) -> pathlib.Path:
    import torch

    if half:
        pipe.to(torch.float16)
    pipe.save_pretrained(path, safe_serialization=True)
    # Recent transformers only writes tokenizer.json; keep the classic files for older readers.
    for name in clip_tokenizers:
        folder = path / name
        if not (folder / "vocab.json").exists() or not (folder / "merges.txt").exists():
            write_tokenizer_files(folder)
    return path


def build_tiny_pipeline(path: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Build a tiny random-weight SD 1.x pipeline into `path` (diffusers layout, safetensors)."""
    return build_random_pipeline(path, seed=seed, architecture="tiny")


def _sd_pipeline(sizes: dict[str, dict[str, Any]], seed: int, device: str = "cpu") -> Any:
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = _clip_tokenizer()
    # Same scheduler config as stable-diffusion-v1-5 (PNDM, scaled_linear betas).
    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
        timestep_spacing="leading",
    )
    with torch.device(device):  # the weights are made where they will run
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            attention_head_dim=8,
            norm_num_groups=32,
            **sizes["unet"],
        )
        torch.manual_seed(seed)
        vae = _sd_vae(sizes["vae"])
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(_clip_text_config(tokenizer, sizes["text"]))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _sdxl_pipeline(sizes: dict[str, dict[str, Any]], seed: int, device: str = "cpu") -> Any:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _clip_tokenizer()
    tokenizer_2 = _clip_tokenizer()
    # SDXL base's scheduler: Euler, scaled_linear betas, "leading" spacing.
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        prediction_type="epsilon",
        timestep_spacing="leading",
    )
    with torch.device(device):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**sizes["unet"])
        torch.manual_seed(seed)
        vae = _sd_vae(sizes["vae"])
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(_clip_text_config(tokenizer, sizes["text"]))
        torch.manual_seed(seed + 1)
        text_encoder_2 = CLIPTextModelWithProjection(
            _clip_text_config(tokenizer_2, sizes["text_2"])
        )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _flux_pipeline(sizes: dict[str, dict[str, Any]], seed: int, device: str = "cpu") -> Any:
    import torch
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = _clip_tokenizer()
    tokenizer_2 = _t5_tokenizer()
    # FLUX.1-schnell's: flow matching with a fixed shift.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False
    )
    with torch.device(device):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(**sizes["transformer"])
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            use_quant_conv=False,
            use_post_quant_conv=False,
            **sizes["vae"],
        )
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(_clip_text_config(tokenizer, sizes["text"]))
        torch.manual_seed(seed)
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=len(tokenizer_2),
                pad_token_id=tokenizer_2.pad_token_id,
                eos_token_id=tokenizer_2.eos_token_id,
                decoder_start_token_id=tokenizer_2.pad_token_id,
                feed_forward_proj="gated-gelu",
                dropout_rate=0.0,
                **sizes["t5"],
            )
        )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def random_pipeline(
    family: str, *, size: str = "tiny", seed: int = 0, device: str = "cpu", dtype: Any = None
) -> Any:
    """A random-weight pipeline of ``family`` (sd, sdxl, flux) in memory, on ``device``.

    ``size`` "tiny" is the toy architecture of the tests; "full" the published one (SD 1.5,
    SDXL base, FLUX.1-schnell), built on ``device`` directly (a GPU makes 12B weights fast).
    """
    import torch

    if family not in FAMILIES or size not in ("tiny", "full"):
        raise ValueError(f"no {size} {family!r} pipeline (families: {', '.join(FAMILIES)})")
    # fork_rng keeps the caller's global CPU RNG state untouched.
    with torch.random.fork_rng(devices=[]):
        if family == "sd":
            sizes = ARCHITECTURES["sd15" if size == "full" else "tiny"]
            pipe = _sd_pipeline(sizes, seed, device)
        else:
            sizes = (FULL_SIZES if size == "full" else TINY_SIZES)[family]
            builder = _sdxl_pipeline if family == "sdxl" else _flux_pipeline
            pipe = builder(sizes, seed, device)
    if dtype is not None:
        pipe.to(dtype)
    return pipe


def build_random_pipeline(
    path: str | os.PathLike, *, seed: int = 0, architecture: str = "tiny", half: bool = False
) -> pathlib.Path:
    """Build a random-weight SD 1.x pipeline of ``architecture`` into ``path``, offline."""
    import torch

    with torch.random.fork_rng(devices=[]):
        pipe = _sd_pipeline(ARCHITECTURES[architecture], seed)
    return _save(pipe, pathlib.Path(path), ("tokenizer",), half=half)


def build_tiny_sdxl(path: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Build a tiny random-weight SDXL pipeline (two CLIP text encoders) into ``path``."""
    pipe = random_pipeline("sdxl", seed=seed)
    return _save(pipe, pathlib.Path(path), ("tokenizer", "tokenizer_2"))


def build_tiny_flux(path: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Build a tiny random-weight FLUX.1 pipeline (CLIP + T5, flow matching) into ``path``.

    Like FLUX.1-schnell it has no guidance embedding and a fixed-shift flow-matching scheduler.
    """
    pipe = random_pipeline("flux", seed=seed)
    return _save(pipe, pathlib.Path(path), ("tokenizer",))


def build_tiny_model(path: str | os.PathLike, family: str = "sd", seed: int = 0) -> pathlib.Path:
    """Build the tiny pipeline of ``family`` (sd, sdxl or flux) into ``path``."""
    builders = {"sd": build_tiny_pipeline, "sdxl": build_tiny_sdxl, "flux": build_tiny_flux}
    if family not in builders:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, not {family!r}")
    return builders[family](path, seed=seed)


def build_tiny_lora(
    path: str | os.PathLike, family: str = "sd", *, seed: int = 0, rank: int = 4, scale: float = 4.0
) -> pathlib.Path:
    """Write a random LoRA for the tiny ``family`` model to ``path`` (one .safetensors file).

    It adapts the denoiser's attention projections, in the diffusers (PEFT) key layout, with
    random A and B matrices (B times ``scale``) so it visibly changes the pictures; its
    metadata names the family.
    """
    import torch
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    if family not in LORA_ARCHITECTURES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, not {family!r}")
    path = pathlib.Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"a LoRA file ends in .safetensors, not {path.name!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "flux":
            denoiser: Any = FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER)
        elif family == "sdxl":
            denoiser = UNet2DConditionModel(**TINY_SDXL_UNET)
        else:
            denoiser = UNet2DConditionModel(
                in_channels=4,
                out_channels=4,
                layers_per_block=2,
                attention_head_dim=8,
                norm_num_groups=32,
                **ARCHITECTURES["tiny"]["unet"],
            )
        torch.manual_seed(seed)
        denoiser.add_adapter(
            LoraConfig(
                r=rank,
                lora_alpha=rank,
                target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                init_lora_weights=False,  # random B too: the LoRA changes the output at once
            )
        )
    prefix = "transformer" if family == "flux" else "unet"
    layers = get_peft_model_state_dict(denoiser)
    # Files in the diffusers layout carry no alpha (it is the rank): the scale goes into B.
    state = {
        f"{prefix}.{key}": (tensor * scale if ".lora_B." in key else tensor).contiguous()
        for key, tensor in layers.items()
    }
    metadata = {
        "format": "pt",
        "modelspec.architecture": LORA_ARCHITECTURES[family],
        "modelspec.title": path.stem,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    return path
