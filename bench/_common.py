"""Shared by the bench scripts (run as `python bench/NAME.py`, so this folder is on sys.path).

Machine facts, the real app behind a threaded HTTP server, runs interleaved and clients
released together, and what the image benchmarks share: their arguments, device, quiet
library logs, the full-size random-weight model and the errors the service logged. Nothing
heavy at import: torch and diffusers are imported by the functions that need them.
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
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "Server",
    "Timed",
    "add_image_arguments",
    "build_models",
    "build_sd15_pipeline",
    "device_and_dtype",
    "image_app",
    "image_size",
    "interleaved",
    "load_average",
    "logged_errors",
    "print_image_machine_facts",
    "print_machine_facts",
    "quiet_logs",
    "quiet_service_logs",
    "together",
]

Timed = tuple[float, dict[str, Any]]  # client seconds, response JSON


def load_average() -> str:
    """The 1, 5 and 15 minute load averages."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def print_machine_facts(*lines: str) -> None:
    """Print what the numbers depend on: Python, the cores, ``lines``, the load."""
    print(f"python        {platform.python_version()} on {platform.machine()}")
    print(f"cpu count     {os.cpu_count()} (usable: {len(os.sched_getaffinity(0))})")
    for line in lines:
        print(line)
    print(f"load average  {load_average()} (other work on the cores skews every number)")


@contextlib.contextmanager
def quiet_service_logs(level: int = logging.WARNING) -> Iterator[None]:
    """Keep the service logging to its file, but off the console while the tables print."""
    logger = logging.getLogger("speech2image")
    saved = [
        (h, h.level)
        for h in logger.handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]
    for handler, _ in saved:
        handler.setLevel(level)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    try:
        yield
    finally:
        for handler, old in saved:
            handler.setLevel(old)


class Server:
    """The real app behind a werkzeug server on a free local port, in a daemon thread."""

    def __init__(self, app: Any) -> None:
        from werkzeug.serving import make_server

        self.httpd = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def post(self, path: str, data: bytes, content_type: str) -> Timed:
        """POST ``data``; client-side seconds and the JSON answer. RuntimeError if not 2xx."""
        request = urllib.request.Request(
            self.url + path, data=data, headers={"Content-Type": content_type}, method="POST"
        )
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"HTTP {exc.code}: {exc.read().decode(errors='replace')}") from exc
        return time.perf_counter() - start, body

    def generate(self, payload: dict[str, Any]) -> Timed:
        """POST /generate-image; client-side seconds and the JSON answer."""
        return self.post("/generate-image", json.dumps(payload).encode(), "application/json")

    def close(self) -> None:
        """Stop serving."""
        self.httpd.shutdown()
        self.thread.join(timeout=10)
        self.httpd.server_close()


def interleaved(repeats: int, runs: dict[str, Callable[[], Any]]) -> dict[str, list[Any]]:
    """Call each run ``repeats`` times, rotating their order every repeat."""
    names = list(runs)
    results: dict[str, list[Any]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            results[name].append(runs[name]())
    return results


def together(count: int, work: Callable[[int], Any]) -> tuple[float, list[Any]]:
    """``work(i)`` for i < ``count``, one thread each, released at once.

    Returns the seconds from the release to the last return, and what each returned (None
    where it raised RuntimeError: an HTTP error, counted by the caller as a failure).
    """
    barrier = threading.Barrier(count + 1)
    results: list[Any] = [None] * count

    def client(i: int) -> None:
        barrier.wait()
        with contextlib.suppress(RuntimeError):
            results[i] = work(i)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, results


# --- the image benchmarks ----------------------------------------------------------------
def add_image_arguments(parser: argparse.ArgumentParser, count: str, count_help: str) -> None:
    """--model, --COUNT (concurrent requests), --steps, --size and --repeats."""
    parser.add_argument("--model", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument(f"--{count}", type=int, default=8, help=count_help)
    parser.add_argument("--steps", type=int, default=8, help="denoising steps")
    parser.add_argument("--size", type=int, default=None, help="side in pixels (tiny 64, sd15 512)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting")


def image_size(parser: argparse.ArgumentParser, args: argparse.Namespace, count: str) -> int:
    """The image side of ``args`` (checked, as the counts are; a parser error if not)."""
    size = args.size or (64 if args.model == "tiny" else 512)
    if getattr(args, count) < 1 or args.steps < 1 or args.repeats < 1:
        parser.error(f"--{count}, --steps and --repeats must be at least 1")
    if size < 64 or size % 8:
        parser.error("--size must be a multiple of 8, at least 64")
    return size


def print_image_machine_facts() -> None:
    """Machine facts plus torch, CUDA and diffusers, then a blank line."""
    import diffusers
    import torch
    import transformers

    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print_machine_facts(
        f"torch         {torch.__version__} ({torch.get_num_threads()} intra-op threads)",
        f"cuda device   {cuda}",
        f"diffusers     {diffusers.__version__}, transformers {transformers.__version__}",
    )
    print()


def device_and_dtype() -> tuple[str, Any]:
    """The service's 'auto' rule: CUDA with float16 when available, else CPU with float32."""
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.float16
    return "cpu", torch.float32


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


def build_sd15_pipeline(path: Path, seed: int = 0) -> Path:
    """A random-weight pipeline with the full SD 1.5 architecture, saved (float16) to ``path``."""
    from speech2image.devtools.tiny_models import build_random_pipeline

    return build_random_pipeline(path, seed=seed, architecture="sd15", half=True)


def build_models(kind: str, tmp: Path, count: int) -> list[Path]:
    """Folders of ``count`` (1 or 2) random-weight models: tiny (seeds 0, 1) or sd15 copies."""
    from speech2image.devtools.tiny_models import build_tiny_pipeline

    started = time.perf_counter()
    if kind == "tiny":
        folders = [build_tiny_pipeline(tmp / f"tiny{i or ''}", seed=i) for i in range(count)]
    else:
        first = build_sd15_pipeline(tmp / "sd15")
        # Another copy as hard links: another folder, another loader entry, no second build.
        copies = [shutil.copytree(first, tmp / "sd15-copy", copy_function=os.link)][: count - 1]
        folders = [first, *map(Path, copies)]
    mib = sum(p.stat().st_size for p in folders[0].rglob("*") if p.is_file()) / 2**20
    each = " each" if count > 1 else ""
    print(
        f"built {count} {kind} model{'s' if count > 1 else ''} in "
        f"{time.perf_counter() - started:.1f} s ({mib:.1f} MiB{each})"
    )
    return folders


def image_app(
    root: Path, log_dir: Path, models: dict[str, Path], size: int, steps: int, **overrides: Any
) -> Any:
    """The app serving ``models`` (the first for every style) at ``size``, files under ``root``.

    No rate limits and no background cleanup; ``overrides`` are further settings.
    """
    from speech2image.app import create_app
    from speech2image.config import load_settings

    first = next(iter(models))
    settings = load_settings(
        log_dir=log_dir,
        image_dir=root / "images",
        model_cache_dir=root / "cache",
        ratelimit_enabled=False,
        cleanup_interval_seconds=0,
        image_models={name: {"source": str(folder)} for name, folder in models.items()},
        style_models={"artistic": first, "photographic": first},
        default_width=size,
        default_height=size,
        max_width=max(1024, size),
        max_height=max(1024, size),
        max_steps=max(60, steps),
        **overrides,
    )
    return create_app(settings)


def logged_errors(path: Path, limit: int = 3) -> list[str]:
    """The distinct exception lines (``SomeError: ...``) of the service log, with counts."""
    pattern = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|borrowed)\b.*")
    found: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if pattern.match(line):
                found[line] = found.get(line, 0) + 1
    return [f"{n} x {line}" for line, n in list(found.items())[:limit]]
