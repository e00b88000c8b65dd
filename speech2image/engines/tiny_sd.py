"""Build a tiny, randomly initialised Stable Diffusion 1.x pipeline fully offline (tests, dev)."""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any

MODEL_MAX_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MERGES_HEADER = "#version: 0.2\n"


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


def build_tiny_pipeline(path: str | os.PathLike, seed: int = 0) -> pathlib.Path:
    """Build a tiny random-weight SD 1.x pipeline into `path` (diffusers layout, safetensors)."""
    return build_random_pipeline(path, seed=seed, architecture="tiny")


def build_random_pipeline(
    path: str | os.PathLike, *, seed: int = 0, architecture: str = "tiny", half: bool = False
) -> pathlib.Path:
    """Build a random-weight SD 1.x pipeline of ``architecture`` into ``path``, offline."""
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sizes = ARCHITECTURES[architecture]
    path = pathlib.Path(path)
    with tempfile.TemporaryDirectory(prefix="tiny-sd-tokenizer-") as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(
            str(write_tokenizer_files(tmp)),
            model_max_length=MODEL_MAX_LENGTH,
            pad_token=EOS_TOKEN,
            local_files_only=True,
        )

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

    # fork_rng keeps the caller's global CPU RNG state untouched.
    with torch.random.fork_rng(devices=[]):
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
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32, **sizes["vae"]
        )
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                max_position_embeddings=MODEL_MAX_LENGTH,
                hidden_act="quick_gelu",
                layer_norm_eps=1e-5,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **sizes["text"],
            )
        )

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if half:
        pipe.to(torch.float16)
    pipe.save_pretrained(path, safe_serialization=True)
    # Recent transformers only writes tokenizer.json; keep the classic files for older readers.
    tokenizer_dir = path / "tokenizer"
    if not (tokenizer_dir / "vocab.json").exists() or not (tokenizer_dir / "merges.txt").exists():
        write_tokenizer_files(tokenizer_dir)
    return path
