"""A tiny random-weight Stable Diffusion safety checker, built offline (tests and demos)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["build_tiny_safety_checker"]


def build_tiny_safety_checker(path: Path, seed: int = 0) -> Path:
    """Write ``safety_checker/`` and ``feature_extractor/`` under ``path``; return ``path``.

    The real architecture (a CLIP vision tower, a projection, concept embeddings) at a tiny
    size. Its random embeddings flag nothing at the default thresholds (``S2I_MODERATION_
    IMAGE_ADJUSTMENT=4`` flags everything).
    """
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=8,
    )
    model = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        model.concept_embeds.normal_()
        model.special_care_embeds.normal_()
    path = Path(path)
    model.save_pretrained(path / "safety_checker")
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(path / "feature_extractor")
    return path
