"""Benchmark of dynamic batching: the same concurrent load with batching on and off.

Run: ``.venv/bin/python bench/batching.py [--model tiny|sd15] [--clients 8] [--steps 8]
[--size 64] [--repeats 3]``

What it measures. Two apps built with ``create_app`` serve the same random-weight model (built
offline into a temporary folder as ``bench/generate.py`` builds it: ``tiny`` is the test
suite's tiny SD 1.x pipeline, 64x64 by default; ``sd15`` the full SD 1.5 architecture in
float16, 512x512 by default, meant for a GPU; on a CPU try ``--size 64 --steps 1 --clients 2
--repeats 1``). Each app sits behind its own threaded werkzeug server on 127.0.0.1:

- on:  ``batch_max_images=8``, ``batch_max_wait_ms=50``: the job runner merges compatible
  requests into one pipeline call (more than 8 clients: several calls per run);
- off: ``batch_max_images=1``: one pipeline call per request.

Both have ``job_workers=1``, so at most one pipeline call runs at a time in either app and the
comparison isolates batching (with more workers, "off" would also overlap calls). N client
threads (urllib, ``--clients``) POST /generate-image at the same moment (synchronous requests),
all compatible (same size, steps, scheduler, guidance and model; distinct prompts and seeds).
A run is timed from the clients' release to the last response.

Each app is warmed first (one request to load the model, then one untimed concurrent run).
Each repeat runs both, the order alternating (on, off / off, on / ...). It prints:

- images/s of each (median of the repeats, and each repeat's value) and ``on/off``, the ratio
  of the medians: above 1 batching raises throughput, near 1 it brings nothing on this device
  (a CPU already busy with one image gains little from eight), below 1 it costs (the 50 ms
  wait, or padding work);
- the batch sizes seen: how many responses reported each ``batch_size`` (the size of the
  pipeline call that made the image), and the number of pipeline calls per run;
- latency per request under that load (client-side, median) and the service's own median
  ``queue``/``inference``/``save`` split. With batching, a request waits less in the queue but
  its pipeline call takes longer; the first response of a run comes later, the last sooner.

Timings on a small shared machine drift between runs; compare the ratio, not the seconds.
Exits 1 if any request failed (causes summarised from the service log), else 0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import _common as common

SCHEDULER = "euler_a"
MODEL = "bench"
BATCH_MAX_IMAGES = 8
BATCH_WAIT_MS = 50.0


Run = tuple[float, list[common.Timed | None], int]  # wall seconds, responses, pipeline calls


def make_app(
    tmp: Path, name: str, folder: Path, size: int, steps: int, batch: int, clients: int
) -> Any:
    """An app serving ``folder`` with one job worker and at most ``batch`` images per call."""
    return common.image_app(
        tmp / name,
        tmp / "logs",  # one log: logging is process-wide, the last app's setup wins
        {MODEL: folder},
        size,
        steps,
        job_workers=1,
        batch_max_images=batch,
        batch_max_wait_ms=BATCH_WAIT_MS,
        queue_max=max(64, clients),  # every client is the same local identity
        queue_max_per_owner=max(16, clients),
    )


def concurrent_run(server: Any, app: Any, payloads: list[dict[str, Any]]) -> Run:
    """All payloads POSTed at once by one thread each; wall seconds, responses, pipeline calls."""
    from speech2image.jobs import get_job_runner

    runner = get_job_runner(app)
    calls_before = runner.batches_run
    wall, results = common.together(len(payloads), lambda i: server.generate(payloads[i]))
    return wall, results, runner.batches_run - calls_before


def report(
    runs: dict[str, list[Run]], clients: int, settings: dict[str, Any], log_path: Path
) -> int:
    """Print the table, batch sizes and latencies; return the number of failed requests."""
    ips: dict[str, list[float]] = {
        name: [sum(r is not None for r in timed) / wall for wall, timed, _ in done]
        for name, done in runs.items()
    }
    med = {name: statistics.median(values) for name, values in ips.items()}
    header = (
        f"{'batching':<9} {'images/s':>9} {'wall s':>7} {'latency s':>10} {'queue s':>8} "
        f"{'infer s':>8} {'save s':>7}  per repeat images/s"
    )
    print(header)
    print("-" * len(header))
    failed = 0
    for name, done in runs.items():
        responses = [r for _, timed, _ in done for r in timed if r is not None]
        failed += clients * len(done) - len(responses)
        wall = statistics.median(w for w, _, _ in done)

        def median_of(key: str, responses: list[common.Timed] = responses) -> float:
            values = [body.get("timings", {}).get(key, 0.0) for _, body in responses]
            return statistics.median(values) if values else float("nan")

        latency = statistics.median(s for s, _ in responses) if responses else float("nan")
        each = " ".join(f"{v:.3f}" for v in ips[name])
        print(
            f"{name:<9} {med[name]:9.3f} {wall:7.3f} {latency:10.3f} {median_of('queue'):8.3f} "
            f"{median_of('inference'):8.3f} {median_of('save'):7.3f}  {each}"
        )
    ratio = med["on"] / med["off"] if med["off"] else float("nan")
    print(f"on/off: {ratio:.3f}x (images/s, ratio of the medians)")
    print("latency: client-side per request, median; queue/infer/save: the service's timings")
    for name, done in runs.items():
        sizes = Counter(r[1].get("batch_size") for _, timed, _ in done for r in timed if r)
        order = sorted(sizes, key=lambda k: (k is None, k or 0))
        shown = ", ".join(f"size {k}: {sizes[k]}" for k in order)
        calls = [c for _, _, c in done]
        print(
            f"batch sizes ({name}): {shown or 'none'} (requests); "
            f"pipeline calls per run: {' '.join(map(str, calls))}"
        )
    print(
        "settings: "
        + "; ".join(f"{name}: {value}" for name, value in settings.items())
        + " (job_workers 1 in both: at most one pipeline call at a time, so only batching differs)"
    )
    if failed:
        print(f"FAILED: {failed} of {clients * sum(map(len, runs.values()))} requests; causes:")
        for line in common.logged_errors(log_path):
            print(f"  {line}")
    return failed


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, build the model and both apps, run the interleaved repeats."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_image_arguments(parser, "clients", "concurrent requests per run")
    args = parser.parse_args(argv)
    size = common.image_size(parser, args, "clients")

    from speech2image.engines.families import FAMILIES

    common.print_image_machine_facts()
    started = time.perf_counter()
    device, dtype = common.device_and_dtype()
    with tempfile.TemporaryDirectory(prefix="s2i-bench-batch-") as name:
        tmp = Path(name)
        with common.quiet_logs():
            (folder,) = common.build_models(args.model, tmp, 1)
            apps = {
                "on": make_app(tmp, "on", folder, size, args.steps, BATCH_MAX_IMAGES, args.clients),
                "off": make_app(tmp, "off", folder, size, args.steps, 1, args.clients),
            }
        guidance = apps["on"].config["S2I_SETTINGS"].default_guidance_scale
        guidance = guidance or FAMILIES["sd1"].guidance_scale  # the SD 1.x model's default
        payloads = [
            {
                "prompt": f"a lighthouse on a cliff at dusk, study number {i}",
                "seed": i,
                "steps": args.steps,
                "width": size,
                "height": size,
                "model": MODEL,
                "scheduler": SCHEDULER,
                "guidance_scale": guidance,
            }
            for i in range(args.clients)
        ]
        servers = {key: common.Server(app) for key, app in apps.items()}
        try:
            with common.quiet_logs():
                for key in apps:  # load the model, then one untimed concurrent run
                    servers[key].generate(payloads[0])
                    concurrent_run(servers[key], apps[key], payloads)
                runs: dict[str, list[Run]] = common.interleaved(
                    args.repeats,
                    {
                        key: lambda key=key: concurrent_run(servers[key], apps[key], payloads)
                        for key in apps
                    },
                )
        finally:
            for server in servers.values():
                server.close()
        print(
            f"Dynamic batching, {args.clients} concurrent clients, {args.model} {size}x{size}, "
            f"{args.steps} steps, {SCHEDULER}, guidance {guidance}, {device} "
            f"{str(dtype).removeprefix('torch.')}, median of {args.repeats}"
        )
        failed = report(
            runs,
            args.clients,
            {
                "on": f"batch_max_images {BATCH_MAX_IMAGES}, batch_max_wait_ms {BATCH_WAIT_MS:g}",
                "off": "batch_max_images 1",
            },
            tmp / "logs" / "app.log",
        )
    print(
        f"\nwall time: {time.perf_counter() - started:.1f} s, "
        f"load average now {common.load_average()}"
    )
    if failed:
        print(f"exit 1: {failed} request(s) failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
