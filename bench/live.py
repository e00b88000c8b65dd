"""Live features, measured: the cost of image previews and the time to the first transcript
delta.

Run: ``.venv/bin/python bench/live.py [--model tiny|sd15] [--size 128] [--steps 12]
[--repeats 3]``

Part A - preview cost. The same generation (``/generate-image``, one image, fixed seed) on
three apps side by side, interleaved: previews off (``S2I_PREVIEW_MAX_FRACTION=0``), the
default policy (0.1 of the time, every step), and unbounded (1.0: a frame after every step,
to show the raw cost of one frame). It prints the median time of each, the ratio to "off",
and the frames made (counted from the job's event stream).

Part B - time to the first delta. A ~17 s spoken recording streamed through
``/v1/audio/transcriptions`` with ``stream=true``: seconds until the first
``transcript.text.delta`` and until ``transcript.text.done``, against the same request
without streaming.

Timings on a small shared machine drift between runs; compare the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from _common import Server, build_models, image_app, interleaved, print_machine_facts

SPEECH = (
    "The painter walked along the beach and watched the waves roll in. Seagulls circled above "
    "the old lighthouse while the sun went down. Later that evening she painted the harbour in "
    "bright orange and blue."
)


def frames_of(server: Server, job: dict[str, Any]) -> int:
    """Preview frames a finished job's events saw (the last frame stays on the job)."""
    with urllib.request.urlopen(server.url + job["events"] + "?previews=true") as response:
        body = response.read().decode()
    seen = {
        json.loads(line[6:])["partial"]["preview"]["frame"]
        for line in body.splitlines()
        if line.startswith("data: ") and '"preview"' in line
    }
    return max(seen) + 1 if seen else 0


def part_a(args: argparse.Namespace, tmp: Path) -> None:
    """Previews off, default and unbounded, interleaved."""
    models = dict(zip(["bench"], build_models(args.model, tmp, 1), strict=True))
    policies = {"off": 0.0, "default 0.1": 0.1, "unbounded": 1.0}
    servers = {
        name: Server(
            image_app(
                tmp / name,
                tmp / "logs",
                models,
                args.size,
                args.steps,
                preview_max_fraction=fraction,
            )
        )
        for name, fraction in policies.items()
    }
    payload = {"prompt": "a lighthouse at dusk", "seed": 7, "steps": args.steps}
    try:
        for server in servers.values():  # load and warm each
            server.generate(payload)

        def run(server: Server) -> tuple[float, int]:
            seconds, _ = server.generate(payload | {"async": False})
            return seconds, 0

        results = interleaved(
            args.repeats, {name: (lambda s=s: run(s)) for name, s in servers.items()}
        )
        medians = {name: statistics.median(t for t, _ in runs) for name, runs in results.items()}
        frames = {}
        for name, server in servers.items():
            request = urllib.request.Request(
                server.url + "/generate-image",
                data=json.dumps(payload | {"async": True}).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request) as response:
                frames[name] = frames_of(server, json.loads(response.read()))
        print(
            f"Part A - preview cost: {args.model} at {args.size}x{args.size}, {args.steps} "
            f"steps, median of {args.repeats}"
        )
        print(f"{'previews':<12} {'median s':>9} {'vs off':>7} {'frames':>7}")
        for name in policies:
            print(
                f"{name:<12} {medians[name]:9.3f} {medians[name] / medians['off']:7.3f} "
                f"{frames[name]:>7}"
            )
        print()
    finally:
        for server in servers.values():
            server.close()


def part_b(tmp: Path) -> None:
    """Time to the first delta of a streamed transcription."""
    from speech2image.app import create_app
    from speech2image.config import load_settings

    wav = tmp / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), SPEECH], check=True, capture_output=True)
    settings = load_settings(
        log_dir=tmp / "logs", upload_dir=tmp / "uploads", ratelimit_enabled=False
    )
    server = Server(create_app(settings))
    boundary = "bench"

    def body(stream: bool) -> bytes:
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="stream"\r\n\r\n'
            f"{'true' if stream else 'false'}\r\n"
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n"
        ).encode()
        return head + wav.read_bytes() + f"\r\n--{boundary}--\r\n".encode()

    def call(stream: bool) -> tuple[float | None, float]:
        request = urllib.request.Request(
            server.url + "/v1/audio/transcriptions",
            data=body(stream),
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        started = time.perf_counter()
        first = None
        with urllib.request.urlopen(request) as response:
            for line in response:
                if first is None and b"transcript.text.delta" in line:
                    first = time.perf_counter() - started
        return first, time.perf_counter() - started

    try:
        call(False)  # load Whisper
        results = interleaved(3, {"stream": lambda: call(True), "plain": lambda: call(False)})
        first = statistics.median(f for f, _ in results["stream"] if f is not None)
        done = statistics.median(t for _, t in results["stream"])
        plain = statistics.median(t for _, t in results["plain"])
        print("Part B - time to the first delta (~17 s of speech, Whisper base, median of 3)")
        print(f"first delta {first:.2f} s, done {done:.2f} s, without streaming {plain:.2f} s")
        print(f"first delta / whole answer: {first / plain:.3f}")
    finally:
        server.close()


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run both parts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", choices=("tiny", "sd15"))
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print_machine_facts()
    with tempfile.TemporaryDirectory(prefix="s2i-bench-live-") as name:
        part_a(args, Path(name))
        part_b(Path(name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
