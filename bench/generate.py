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
import contextlib
import json
import logging
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from _common import quiet_service_logs

MODEL_A = "bench"
MODEL_B = "bench2"
SCHEDULER = "euler_a"
Timed = tuple[float, dict[str, Any]]  # client seconds, response JSON


def machine_facts() -> None:
    """Print what the numbers depend on."""
    import diffusers
    import torch
    import transformers

    print(f"python        {platform.python_version()} on {platform.machine()}")
    print(f"cpu count     {os.cpu_count()} (usable: {len(os.sched_getaffinity(0))})")
    print(f"torch         {torch.__version__} ({torch.get_num_threads()} intra-op threads)")
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"cuda device   {cuda}")
    print(f"diffusers     {diffusers.__version__}, transformers {transformers.__version__}")
    print(f"load average  {_load()} (other work on the cores skews every number)")
    print()


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def device_and_dtype() -> tuple[str, Any]:
    """The service's 'auto' rule: CUDA with float16 when available, else CPU with float32."""
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.float16
    return "cpu", torch.float32


# --- models ------------------------------------------------------------------------------
def build_sd15_pipeline(path: Path, seed: int = 0) -> Path:
    """A random-weight pipeline with the full SD 1.5 architecture, saved (float16) to ``path``."""
    from speech2image.devtools.tiny_models import build_random_pipeline

    return build_random_pipeline(path, seed=seed, architecture="sd15", half=True)


def build_models(kind: str, tmp: Path) -> tuple[Path, Path]:
    """Folders of models A and B: two tiny pipelines (seeds 0, 1) or two sd15 copies."""
    from speech2image.devtools.tiny_models import build_tiny_pipeline

    started = time.perf_counter()
    if kind == "tiny":
        folders = build_tiny_pipeline(tmp / "tiny"), build_tiny_pipeline(tmp / "tiny2", seed=1)
    else:
        first = build_sd15_pipeline(tmp / "sd15")
        # A second copy as hard links: another folder, another loader entry, no second build.
        second = Path(shutil.copytree(first, tmp / "sd15-copy", copy_function=os.link))
        folders = first, second
    mib = sum(p.stat().st_size for p in folders[0].rglob("*") if p.is_file()) / 2**20
    print(f"built 2 {kind} models in {time.perf_counter() - started:.1f} s ({mib:.1f} MiB each)")
    return folders


# --- the service -------------------------------------------------------------------------
class Server:
    """The real app behind a werkzeug server on a free local port, in a daemon thread."""

    def __init__(self, app: Any) -> None:
        from werkzeug.serving import make_server

        self.httpd = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def generate(self, payload: dict[str, Any]) -> Timed:
        """POST /generate-image; return client-side seconds and the JSON body."""
        request = urllib.request.Request(
            self.url + "/generate-image",
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"HTTP {exc.code}: {exc.read().decode(errors='replace')}") from exc
        return time.perf_counter() - start, body

    def close(self) -> None:
        """Stop serving."""
        self.httpd.shutdown()
        self.thread.join(timeout=10)
        self.httpd.server_close()


@contextlib.contextmanager
def quiet_logs() -> Iterator[None]:
    """Service logs to its file only (errors are summarised from it); libraries quiet."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with quiet_service_logs(logging.CRITICAL):
        yield


def make_app(tmp: Path, folders: tuple[Path, Path], size: int, steps: int) -> Any:
    """The app with models A and B configured, no rate limits, no background cleanup."""
    from speech2image.app import create_app
    from speech2image.config import load_settings

    settings = load_settings(
        log_dir=tmp / "logs",
        image_dir=tmp / "images",
        model_cache_dir=tmp / "cache",
        ratelimit_enabled=False,
        cleanup_interval_seconds=0,
        image_models={MODEL_A: {"source": str(folders[0])}, MODEL_B: {"source": str(folders[1])}},
        style_models={"artistic": MODEL_A, "photographic": MODEL_A},
        default_width=size,
        default_height=size,
        max_width=max(1024, size),
        max_height=max(1024, size),
        max_steps=max(60, steps),
    )
    return create_app(settings)


def interleaved(repeats: int, runs: dict[str, Callable[[], Any]]) -> dict[str, list[Any]]:
    """Call each run ``repeats`` times, rotating their order every repeat."""
    names = list(runs)
    results: dict[str, list[Any]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            results[name].append(runs[name]())
    return results


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
        barrier = threading.Barrier(requests + 1)
        results: list[Timed | None] = [None] * requests

        def client(i: int) -> None:
            barrier.wait()
            with contextlib.suppress(RuntimeError):  # an HTTP error: counted as a failure
                results[i] = server.generate(payload(i))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(requests)]
        for thread in threads:
            thread.start()
        barrier.wait()
        start = time.perf_counter()
        for thread in threads:
            thread.join()
        return time.perf_counter() - start, results

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
        for line in _logged_errors(Path(settings.log_dir) / "app.log"):
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


def _logged_errors(path: Path, limit: int = 3) -> list[str]:
    """The distinct exception lines (``SomeError: ...``) of the service log, with counts."""
    pattern = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|borrowed)\b.*")
    found: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if pattern.match(line):
                found[line] = found.get(line, 0) + 1
    return [f"{n} x {line}" for line, n in list(found.items())[:limit]]


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
    parser.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--requests", type=int, default=8, help="concurrent requests (part 1)")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps (part 1)")
    parser.add_argument("--size", type=int, default=None, help="side in pixels (tiny 64, sd15 512)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path and state")
    args = parser.parse_args(argv)
    size = args.size or (64 if args.model == "tiny" else 512)
    if args.requests < 1 or args.steps < 1 or args.repeats < 1:
        parser.error("--requests, --steps and --repeats must be at least 1")
    if size < 64 or size % 8:
        parser.error("--size must be a multiple of 8, at least 64")

    machine_facts()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="s2i-bench-gen-") as name:
        tmp = Path(name)
        with quiet_logs():
            folders = build_models(args.model, tmp)
            app = make_app(tmp, folders, size, args.steps)
        server = Server(app)
        try:
            with quiet_logs():
                failed = part_throughput(
                    server, app, folders[0], args.requests, args.steps, size, args.repeats
                )
                part_switch(server, app, size, args.repeats)
        finally:
            server.close()
    print(f"\nwall time: {time.perf_counter() - started:.1f} s, load average now {_load()}")
    if failed:
        print(f"exit 1: {failed} service request(s) failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
