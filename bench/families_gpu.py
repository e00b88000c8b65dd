"""The families benchmark on a GPU: the published architectures, half precision, SDPA attention.

Run (on a CUDA machine): ``.venv/bin/python bench/families_gpu.py [--families sd,sdxl,flux]
[--repeats 3] [--batch 4] [--no-offload]``; a dry run of the same code on a CPU with the tiny
architectures: ``--tiny --device cpu``.

Random weights in the real shapes (SD 1.5; SDXL base 1.0: UNet 2.6B, two text encoders; FLUX.1
-schnell: transformer 11.9B, T5-XXL encoder 4.6B), built in memory on the device
(``speech2image.devtools.tiny_models.random_pipeline``), in each family's half precision
(float16; bfloat16 for FLUX) and placed the way the service places them (``place``: channels-
last UNet; attention through PyTorch's scaled_dot_product_attention, diffusers' default
processors, listed in the output). At each family's native size and default steps (SD 1.5 512
px / 25 steps, SDXL 1024 / 30, FLUX.1-schnell 1024 / 4), it prints, side by side:

- ``s/image``: the service's engine (``generate``), one image per call, median;
- ``engine/direct``: against the pipeline called directly (target <= 1.05);
- ``batching gain``: one image per call vs ``--batch`` per call, per image;
  (both the medians of per-repeat ratios: calls compared under the same load);
- ``peak GB``: ``torch.cuda.max_memory_allocated`` over the family's calls;
- with offloading (not ``--no-offload``): the same generation with model CPU offload, what
  the loader chooses for a model beyond the GPU budget: its s/image and peak GB.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from typing import Any

NATIVE = {"sd": (512, 25, "euler_a", 7.0), "sdxl": (1024, 30, "euler_a", 6.0)}
NATIVE["flux"] = (1024, 4, "flow_euler", 0.0)
PROMPTS = ["a lighthouse on a cliff", "a red fox in snow", "a busy harbour", "a glass teapot"]


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _spec(family: str, prompts: list[str], seeds: list[int], side: int, steps: int) -> Any:
    from speech2image.engines.diffusers_sd import GenerationSpec

    _, _, scheduler, guidance = NATIVE[family]
    return GenerationSpec(
        prompts,
        [None] * len(prompts),
        seeds,
        side,
        side,
        steps,
        guidance,
        scheduler,
        few_step=family == "flux",
        max_sequence_length=256 if family == "flux" else 0,
    )


def _direct(pipe: Any, family: str, spec: Any) -> None:
    import torch

    extra = {"max_sequence_length": 256} if family == "flux" else {}
    pipe(
        prompt=spec.prompts,
        width=spec.width,
        height=spec.height,
        num_inference_steps=spec.steps,
        guidance_scale=spec.guidance_scale,
        generator=[torch.Generator("cpu").manual_seed(s) for s in spec.seeds],
        **extra,
    )


def _timed(device: str, call: Any, *args: Any) -> float:
    _sync(device)
    started = time.perf_counter()
    call(*args)
    _sync(device)
    return time.perf_counter() - started


def bench_family(family: str, args: Any) -> dict[str, Any]:
    """One family: engine vs direct, batching, memory, and offloaded."""
    import diffusers
    import torch

    from speech2image.devtools.tiny_models import random_pipeline
    from speech2image.engines.diffusers_sd import SCHEDULERS, generate, place
    from speech2image.engines.families import FAMILIES

    side, steps, scheduler, _ = NATIVE[family]
    if args.tiny:
        side, steps = 64, min(steps, 4)
    family_name = "sd1" if family == "sd" else family
    dtype = getattr(torch, args.dtype or FAMILIES[family_name].half_dtype)
    if args.device == "cpu":
        dtype = torch.float32
    size = "tiny" if args.tiny else "full"
    started = time.perf_counter()
    pipe = random_pipeline(family, size=size, device=args.device, dtype=dtype)
    built = time.perf_counter() - started
    pipe = place(pipe, args.device)
    pipe.set_progress_bar_config(disable=True)
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    processors = sorted({type(p).__name__ for p in denoiser.attn_processors.values()})
    class_name, extra = SCHEDULERS[scheduler]
    direct = type(pipe).from_pipe(pipe)
    direct.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config, **extra)
    direct.set_progress_bar_config(disable=True)
    one = _spec(family, PROMPTS[:1], [1], side, steps)
    batch = _spec(
        family, (PROMPTS * args.batch)[: args.batch], list(range(args.batch)), side, steps
    )
    with torch.inference_mode():
        _direct(direct, family, one)  # warm up: kernels, allocator
    generate(pipe, one)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    engine_s, direct_s, batch_s = [], [], []
    for repeat in range(args.repeats):
        calls = [(engine_s, partial(generate, pipe, one))]
        calls.append((direct_s, partial(_direct_inference, direct, family, one)))
        for times, call in calls if repeat % 2 == 0 else calls[::-1]:
            times.append(_timed(args.device, call))
        batch_s.append(_timed(args.device, partial(generate, pipe, batch)) / args.batch)
    peak = torch.cuda.max_memory_allocated() / 1e9 if args.device == "cuda" else 0.0
    row = {
        "family": family,
        "dtype": str(dtype).removeprefix("torch."),
        "size": side,
        "steps": steps,
        "build s": built,
        "s/image": statistics.median(engine_s),
        "engine/direct": statistics.median(e / d for e, d in zip(engine_s, direct_s, strict=True)),
        "batching gain": statistics.median(e / b for e, b in zip(engine_s, batch_s, strict=True)),
        "peak GB": peak,
        "attention": ", ".join(processors),
        "offload s/image": None,
        "offload peak GB": None,
    }
    del direct
    if args.offload and args.device == "cuda":
        pipe.to("cpu")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        offloaded = place(pipe, "cuda", "model")
        generate(offloaded, one)  # the first call moves every component once
        row["offload s/image"] = _timed("cuda", partial(generate, offloaded, one))
        row["offload peak GB"] = torch.cuda.max_memory_allocated() / 1e9
        offloaded.remove_all_hooks()
    del pipe
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return row


def _direct_inference(pipe: Any, family: str, spec: Any) -> None:
    import torch

    with torch.inference_mode():
        _direct(pipe, family, spec)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="sd,sdxl,flux")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default=None, help="float16 or bfloat16; default: family's")
    parser.add_argument("--tiny", action="store_true", help="The tiny architectures (dry run).")
    parser.add_argument("--no-offload", dest="offload", action="store_false")
    args = parser.parse_args()
    import diffusers
    import torch
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: run on a GPU machine, or try --tiny --device cpu")
        return 2
    if args.device == "cuda":
        print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, SDPA attention")
    rows = [bench_family(f.strip(), args) for f in args.families.split(",") if f.strip()]
    print(
        f"{'family':<6} {'dtype':<9} {'px':>5} {'steps':>5} {'s/image':>8} {'engine/direct':>13} "
        f"{'batch gain':>10} {'peak GB':>8} {'offload s/img':>13} {'offload GB':>10}"
    )
    for row in rows:
        offload_s = row["offload s/image"]
        offload_gb = row["offload peak GB"]
        print(
            f"{row['family']:<6} {row['dtype']:<9} {row['size']:>5} {row['steps']:>5} "
            f"{row['s/image']:>8.3f} {row['engine/direct']:>13.3f} {row['batching gain']:>10.2f} "
            f"{row['peak GB']:>8.2f} "
            f"{'-' if offload_s is None else f'{offload_s:.3f}':>13} "
            f"{'-' if offload_gb is None else f'{offload_gb:.2f}':>10}"
        )
    for row in rows:
        print(f"{row['family']}: built in {row['build s']:.1f}s; attention: {row['attention']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
