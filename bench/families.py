"""Benchmark of every image family through the service's engine against diffusers called directly.

Run: ``.venv/bin/python bench/families.py [--families sd,sdxl,flux] [--steps 4] [--size 64]
[--batch 4] [--repeats 9]`` (a few minutes on 2 shared cores)

One run, side by side, on the tiny random-weight pipelines of the tests (built offline into a
temporary folder; ``speech2image build-tiny-model --family``), each loaded once through the
service's own factory (``DiffusersFactory``: AutoPipelineForText2Image, CPU float32). For each
family, with the family's default scheduler and guidance (SD 1.x euler_a and 7.0, SDXL
euler_a and 6.0, FLUX flow matching without guidance):

- direct: the loaded pipeline called as diffusers documents it, ``pipe(prompt=..., ...)`` with
  the same scheduler class set once, a CPU generator per image, PIL output;
- engine: ``speech2image.engines.diffusers_sd.generate`` on the same pipeline, what a job runs:
  a pipeline object of its own (``from_pipe``) with a fresh scheduler, the prompts encoded under
  the tokenizer lock, the LoRA gate, the step callback;
- batched: the engine with ``--batch`` prompts in one call (what merged requests get).

Each repeat times a direct call, an engine call (their order alternating) and a batched call,
back to back, so each ratio compares calls made under the same load; the ratios printed are the
medians of the per-repeat ratios. Columns: ``s/image`` (engine, one image per call, median),
``direct`` (median), ``engine/direct`` (the pipeline-call overhead of the service's engine;
the target is at most 1.05), ``batch s/image`` and ``batching gain`` (one image per call over
``--batch`` images per call, per image: above 1, merging requests pays), and whether engine and
direct made the same pixels from the same seed (max difference, 0-255).
Timings on a small shared machine drift between runs: compare the ratios, not the seconds.
``bench/families_gpu.py`` takes the same figures on a GPU with the published architectures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

DEFAULTS = {"sd": ("euler_a", 7.0), "sdxl": ("euler_a", 6.0), "flux": ("flow_euler", 0.0)}
PROMPTS = ["a lighthouse on a cliff", "a red fox in snow", "a busy harbour", "a glass teapot"]


def _direct(pipe: Any, family: str, prompts: list[str], seeds: list[int], args: Any) -> list:
    import torch

    extra = {"max_sequence_length": 256} if family == "flux" else {}
    result = pipe(
        prompt=prompts,
        width=args.size,
        height=args.size,
        num_inference_steps=args.steps,
        guidance_scale=DEFAULTS[family][1],
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        **extra,
    )
    return list(result.images)


def _engine(pipe: Any, family: str, prompts: list[str], seeds: list[int], args: Any) -> list:
    from speech2image.engines.diffusers_sd import GenerationSpec, generate

    scheduler, guidance = DEFAULTS[family]
    spec = GenerationSpec(
        prompts,
        [None] * len(prompts),
        seeds,
        args.size,
        args.size,
        args.steps,
        guidance,
        scheduler,
        few_step=family == "flux",
        max_sequence_length=256 if family == "flux" else 0,
    )
    return generate(pipe, spec)


def _timed(call: Any, *call_args: Any) -> tuple[float, list]:
    started = time.perf_counter()
    images = call(*call_args)
    return time.perf_counter() - started, images


def bench_family(family: str, folder: Path, args: Any) -> dict[str, Any]:
    """Medians of direct and engine calls, one image and a batch, on one loaded pipeline."""
    import diffusers

    from speech2image.config import ImageModelSpec
    from speech2image.engines.diffusers_sd import SCHEDULERS, DiffusersFactory

    factory = DiffusersFactory(family, ImageModelSpec(source=str(folder)), cache_dir=folder)
    pipe = factory.load("cpu")
    class_name, extra = SCHEDULERS[DEFAULTS[family][0]]
    # The direct caller picks the same sampler once, as a diffusers user would.
    direct_pipe = type(pipe).from_pipe(pipe)
    direct_pipe.scheduler = getattr(diffusers, class_name).from_config(
        pipe.scheduler.config, **extra
    )
    direct_pipe.set_progress_bar_config(disable=True)
    one, seeds = PROMPTS[:1], [11]
    batch = (PROMPTS * args.batch)[: args.batch]
    batch_seeds = list(range(20, 20 + args.batch))
    for call in (_direct, _engine):  # warm up, untimed
        call(direct_pipe if call is _direct else pipe, family, one, seeds, args)
    direct_s, engine_s, batch_s = [], [], []
    diff = 0
    for repeat in range(args.repeats):
        order = [(_direct, direct_pipe, direct_s), (_engine, pipe, engine_s)]
        for call, target, times in order if repeat % 2 == 0 else order[::-1]:
            seconds, images = _timed(call, target, family, one, seeds, args)
            times.append(seconds)
            if call is _direct:
                direct_image = np.asarray(images[0], dtype=np.int16)
            else:
                engine_image = np.asarray(images[0], dtype=np.int16)
        diff = max(diff, int(np.abs(direct_image - engine_image).max()))
        seconds, _ = _timed(_engine, pipe, family, batch, batch_seeds, args)
        batch_s.append(seconds / args.batch)
    return {
        "family": family,
        "s/image": statistics.median(engine_s),
        "direct s/image": statistics.median(direct_s),
        "engine/direct": statistics.median(e / d for e, d in zip(engine_s, direct_s, strict=True)),
        "batch s/image": statistics.median(batch_s),
        "batching gain": statistics.median(e / b for e, b in zip(engine_s, batch_s, strict=True)),
        "max pixel diff": diff,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="sd,sdxl,flux")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    import diffusers
    import torch
    import transformers

    from speech2image.devtools.tiny_models import build_tiny_model

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    print(
        f"tiny random-weight pipelines, CPU float32, {torch.get_num_threads()} threads, "
        f"{args.size}x{args.size}, {args.steps} steps, batch {args.batch}, "
        f"{args.repeats} repeats"
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-families-") as tmp:
        for family in families:
            folder = build_tiny_model(Path(tmp) / family, family)
            rows.append(bench_family(family, folder, args))
    header = (
        f"{'family':<7} {'s/image':>9} {'direct':>9} {'engine/direct':>14} "
        f"{'batch s/image':>14} {'batching gain':>14} {'max pixel diff':>15}"
    )
    print(header)
    for row in rows:
        print(
            f"{row['family']:<7} {row['s/image']:>9.4f} {row['direct s/image']:>9.4f} "
            f"{row['engine/direct']:>14.3f} {row['batch s/image']:>14.4f} "
            f"{row['batching gain']:>14.2f} {row['max pixel diff']:>15d}"
        )
    worst = max(row["engine/direct"] for row in rows)
    print(f"engine/direct worst {worst:.3f} (target <= 1.05)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
