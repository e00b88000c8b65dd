"""Benchmark of POST /generate-image against diffusers called directly, and of model switches.

Run: ``.venv/bin/python bench/generate.py [--model tiny|sd15] [--requests 8] [--steps 8]
[--size 64] [--repeats 3]``

Weights are random, built offline into a temporary folder: ``tiny`` is the test suite's tiny
SD 1.x pipeline (``build_tiny_pipeline``, 64x64 by default); ``sd15`` is the full SD 1.5
architecture (UNet 320/640/1280/1280, cross-attention 768; VAE 128/256/512/512; CLIP text
encoder 768 wide, 12 layers; the byte-level tokenizer), saved in float16, 512x512 by default.
sd15 is meant for a GPU; on a CPU try ``--size 64 --steps 1 --requests 2 --repeats 1``.
Device and dtype follow the service's rule: CUDA and float16 when available, else CPU float32.

Part 1 - throughput. N requests (``--requests``) with distinct prompts and seeds:

- direct: one ``StableDiffusionPipeline.from_pretrained(folder)`` with the service's default
  scheduler (euler_a) and guidance, called N times one after another, a CPU generator seeded
  per call, PIL output. Only the pipeline call is timed;
- service: the whole app behind a real threaded werkzeug server in a thread; N client threads
  (urllib) POST /generate-image at the same moment; timed from their release to the last
  response. The service also encodes a PNG, fsyncs the file and commits a history row per
  image, which direct does not do; its job runner may merge requests into batched pipeline
  calls (the settings line shows workers and batch size).

Both are warmed first (untimed). Each repeat runs both, the order alternating. It prints the
median images/s of each and ``service/direct``: above 1 the concurrent service beats the
sequential pipeline, below 1 concurrency costs more than it brings (on a small CPU the N
requests share the same cores). Also the median client latency of one request under that
load, the service's own median wait/inference/save split, and whether the last repeat's
service PNGs hold the same pixels as the direct images (same seeds, same scheduler; a batched
call may differ in the last bit, a difference of 1; more means other work was done).

Part 2 - model switch. Two models of the same architecture (different seeds) behind the
service's model loader. A 1-step request (client-timed) for model A when A is:

- cold: not loaded (``loader.unload``); the load includes the CUDA warm-up generation;
- resident: already on its home device;
- repromote (CUDA only): demoted to CPU RAM. The GPU budget is set to one model's bytes plus
  half of one for this part, so bringing either model home demotes the other; cold and
  repromote therefore both include demoting B.

Each state is set up with untimed requests, checked through ``loader.status()``, and the
states rotate each repeat. It prints the medians and the ratios cold/resident,
repromote/resident and cold/repromote; ``lease load s`` is the service's own
``timings.load`` (the time the lease spent loading or promoting).

Timings on a small shared machine drift between runs; compare the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import (
    Server,
    Timed,
    add_image_arguments,
    build_models,
    device_and_dtype,
    image_app,
    image_size,
    interleaved,
    load_average,
    logged_errors,
    print_image_machine_facts,
    quiet_logs,
    together,
)

MODEL_A = "bench"
MODEL_B = "bench2"
SCHEDULER = "euler_a"


# --- models ------------------------------------------------------------------------------
# --- the service -------------------------------------------------------------------------
# --- part 1 ------------------------------------------------------------------------------
def part_throughput(
    server: Server, app: Any, folder: Path, requests: int, steps: int, size: int, repeats: int
) -> int:
    """N concurrent service requests against N sequential direct calls; returns failures."""
    import diffusers
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from speech2image.engines.diffusers_sd import SCHEDULERS
    from speech2image.engines.families import FAMILIES

    settings = app.config["S2I_SETTINGS"]
    # The service's default for this SD 1.x model (S2I_DEFAULT_GUIDANCE_SCALE when set).
    guidance = settings.default_guidance_scale or FAMILIES["sd1"].guidance_scale
    device, dtype = device_and_dtype()
    pipe = StableDiffusionPipeline.from_pretrained(
        str(folder),
        dtype=dtype,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
        local_files_only=True,
    )
    class_name, extra = SCHEDULERS[SCHEDULER]  # the service's default, built as it builds it
    pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    pipe = pipe.to(device)
    if device == "cuda":  # as the service's factory does
        pipe.unet.to(memory_format=torch.channels_last)

    prompts = [f"a lighthouse on a cliff at dusk, study number {i}" for i in range(requests)]

    def payload(i: int) -> dict[str, Any]:
        return {
            "prompt": prompts[i],
            "seed": i,
            "steps": steps,
            "width": size,
            "height": size,
            "model": MODEL_A,
            "scheduler": SCHEDULER,
            "guidance_scale": guidance,
        }

    def direct_one(i: int) -> Any:
        with torch.inference_mode():
            return pipe(
                prompt=prompts[i],
                width=size,
                height=size,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=torch.Generator("cpu").manual_seed(i),
            ).images[0]

    def direct() -> tuple[float, list[Any]]:
        start = time.perf_counter()
        images = [direct_one(i) for i in range(requests)]
        return time.perf_counter() - start, images

    def service() -> tuple[float, list[Timed | None]]:
        return together(requests, lambda i: server.generate(payload(i)))  # None: an HTTP error

    direct_one(0)
    server.generate(payload(0))  # loads model A in the service
    runs = interleaved(repeats, {"direct": direct, "service": service})

    direct_ips = statistics.median(requests / seconds for seconds, _ in runs["direct"])
    service_ips = statistics.median(
        sum(r is not None for r in timed) / seconds for seconds, timed in runs["service"]
    )
    responses = [r for _, timed in runs["service"] for r in timed if r is not None]
    failed = requests * repeats - len(responses)
    print(
        f"Part 1 - throughput, {requests} requests, {size}x{size}, {steps} steps, {SCHEDULER}, "
        f"guidance {guidance}, {device} {str(dtype).removeprefix('torch.')}, median of {repeats}"
    )
    header = f"{'path':<32} {'images/s':>9} {'wall s':>8}"
    print(header)
    print("-" * len(header))
    print(f"{'direct, sequential':<32} {direct_ips:9.3f} {requests / direct_ips:8.3f}")
    walls = statistics.median(seconds for seconds, _ in runs["service"])
    print(f"{'service, concurrent':<32} {service_ips:9.3f} {walls:8.3f}")
    print(f"service/direct: {service_ips / direct_ips:.3f}x (images/s)")
    runner = ("job_workers", "batch_max_images", "batch_max_wait_ms")
    shown = [f"{name} {getattr(settings, name)}" for name in runner if hasattr(settings, name)]
    if shown:
        print("service settings: " + ", ".join(shown))
    if failed:
        print(
            f"FAILED: {failed} of {requests * repeats} service requests (not counted as "
            "images above); causes in the service log:"
        )
        for line in logged_errors(Path(settings.log_dir) / "app.log"):
            print(f"  {line}")
    if not responses:
        print()
        return failed
    latency = statistics.median(seconds for seconds, _ in responses)
    keys = [k for k in responses[0][1].get("timings", {}) if k not in ("load", "total")]
    split = {
        key: statistics.median(body["timings"].get(key, 0.0) for _, body in responses)
        for key in keys
    }
    print(
        f"service latency per request under load: median {latency:.3f} s "
        f"(direct one image: {1 / direct_ips:.3f} s)"
    )
    print(
        "service per request, median: "
        + ", ".join(f"{key} {value:.3f} s" for key, value in split.items())
        + " (service timings; save: PNG encode, fsync, history row)"
    )

    _, direct_images = runs["direct"][-1]
    _, last = runs["service"][-1]
    image_dir = Path(settings.image_dir)
    same, worst, compared = 0, 0, 0
    for i, timed in enumerate(last):
        if timed is None:
            continue
        filename = timed[1]["images"][0]["filename"]
        got = np.asarray(Image.open(image_dir / filename).convert("RGB"))
        want = np.asarray(direct_images[i].convert("RGB"))
        diff = int(np.abs(got.astype(int) - want.astype(int)).max())
        same += diff == 0
        worst = max(worst, diff)
        compared += 1
    print(f"same pixels as direct: {same}/{compared} images (max abs difference {worst})")
    print()
    return failed


# --- part 2 ------------------------------------------------------------------------------
def where(loader: Any, name: str) -> str | None:
    """The device model ``name`` is on now, or None when it is not loaded."""
    return next(entry["device"] for entry in loader.status() if entry["name"] == name)


def part_switch(server: Server, app: Any, size: int, repeats: int) -> None:
    """A 1-step request for model A when it is cold, resident, or (CUDA) demoted to CPU."""
    from speech2image.image_service import model_key

    loader = app.extensions["model_loader"]
    key_a, key_b = model_key(MODEL_A), model_key(MODEL_B)
    device, _ = device_and_dtype()

    def request(model: str) -> Timed:
        return server.generate(
            {"prompt": "a red cube", "seed": 0, "steps": 1, "width": size, "height": size}
            | {"model": model}
        )

    def expect(want_a: str | None, want_b: str | None) -> None:
        found = where(loader, key_a), where(loader, key_b)
        if found != (want_a, want_b):
            raise RuntimeError(f"set-up failed: A, B are on {found}, wanted {(want_a, want_b)}")

    def timed_a() -> tuple[float, float]:
        seconds, body = request(MODEL_A)
        return seconds, body.get("timings", {}).get("load", 0.0)

    def cold() -> tuple[float, float]:
        request(MODEL_B)
        if not loader.unload(key_a):
            raise RuntimeError("could not unload model A")
        expect(None, device)
        return timed_a()

    def resident() -> tuple[float, float]:
        request(MODEL_A)
        expect(device, "cpu" if device == "cuda" else device)
        return timed_a()

    def repromote() -> tuple[float, float]:
        request(MODEL_A)
        request(MODEL_B)
        expect("cpu", "cuda")
        return timed_a()

    request(MODEL_A)
    request(MODEL_B)
    runs: dict[str, Callable[[], tuple[float, float]]] = {"cold": cold, "resident": resident}
    saved_budget = loader.budgets.get("cuda", 0)
    if device == "cuda":
        sizes = {e["name"]: e["bytes"] for e in loader.status() if e["name"] in (key_a, key_b)}
        loader.budgets["cuda"] = max(sizes.values()) + min(sizes.values()) // 2
        # Both fit the old budget: reload B under the new one so that it demotes A.
        loader.unload(key_b)
        request(MODEL_B)
        expect("cpu", "cuda")
        runs["repromote"] = repromote
    try:
        results = interleaved(repeats, runs)
    finally:
        loader.budgets["cuda"] = saved_budget

    print(f"Part 2 - model switch, 1-step {size}x{size} request for model A, median of {repeats}")
    header = f"{'A is':<10} {'request s':>10} {'lease load s':>13}"
    print(header)
    print("-" * len(header))
    med: dict[str, float] = {}
    for name, timings in results.items():
        med[name] = statistics.median(t for t, _ in timings)
        load = statistics.median(lo for _, lo in timings)
        print(f"{name:<10} {med[name]:10.3f} {load:13.3f}")
    print(f"cold/resident: {med['cold'] / med['resident']:.2f}x")
    if "repromote" in med:
        print(f"repromote/resident: {med['repromote'] / med['resident']:.2f}x")
        print(f"cold/repromote: {med['cold'] / med['repromote']:.2f}x")
        print("  (GPU budget: one model; cold and repromote both include demoting B to CPU)")
    else:
        print("re-promotion: n/a (no CUDA)")
    events = [e for e in loader.events if e[0] in ("load", "promote", "demote", "unload")]
    counts = {a: sum(1 for e in events if e[0] == a) for a in ("load", "promote", "demote")}
    print("loader events: " + ", ".join(f"{a} {n}" for a, n in counts.items()))


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, build the models, run both parts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_image_arguments(parser, "requests", "concurrent requests (part 1)")
    args = parser.parse_args(argv)
    size = image_size(parser, args, "requests")

    print_image_machine_facts()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="s2i-bench-gen-") as name:
        tmp = Path(name)
        with quiet_logs():
            folders = build_models(args.model, tmp, 2)
            models = {MODEL_A: folders[0], MODEL_B: folders[1]}
            app = image_app(tmp, tmp / "logs", models, size, args.steps)
        server = Server(app)
        try:
            with quiet_logs():
                failed = part_throughput(
                    server, app, folders[0], args.requests, args.steps, size, args.repeats
                )
                part_switch(server, app, size, args.repeats)
        finally:
            server.close()
    print(f"\nwall time: {time.perf_counter() - started:.1f} s, load average now {load_average()}")
    if failed:
        print(f"exit 1: {failed} service request(s) failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
