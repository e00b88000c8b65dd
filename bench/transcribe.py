"""Benchmark of POST /transcribe-audio against faster-whisper called directly.

Run: ``.venv/bin/python bench/transcribe.py [--model base] [--repeats 3]``

It synthesises its own audio with espeak-ng (three English clips of about 3, 10 and 25 seconds,
and one "unintelligible" clip: Spanish text read by the English voice), then measures:

Part A - service overhead. For every clip, in the same run and interleaved (the order of the
two paths alternates on each repeat, so slow drift of the machine hits both alike):

- direct: ``WhisperModel(folder, device="cpu", compute_type="int8")``, the file decoded by
  ``faster_whisper.decode_audio`` and transcribed with the service's decoding options
  (``speech2image.engines.whisper.transcribe``: beam size and VAD from the settings,
  temperature fallback (0.0, 0.4, 0.8), ``condition_on_previous_text=False``, token cap);
- http: the whole service, a real werkzeug server in a thread, the file posted as multipart
  from the client side, timed from the first byte sent to the JSON parsed;
- direct*: a control, as direct but with the service's own PyAV decode
  (``speech2image.audio.decode_audio``). faster-whisper's decoder rounds to 16-bit, the
  service's keeps float samples; that one-LSB difference is enough to change the beam search
  (another segment, other words), so direct and http may do different work. http/direct* is the
  overhead on identical samples.

Both paths are warmed once (untimed) first. Each cell is the median of the repeats. The
overhead ratio is http / direct; the summary line sums the medians of the English clips:
``overhead: X.XX%`` is (http total / direct total - 1). The service adds upload storage, the
hardened PyAV decode, the model lease and JSON; the target is at most 10%.

Part B - unintelligible audio. On the Spanish-as-English clip with the English-only ``tiny.en``
model, faster-whisper's DEFAULT decoding (``model.transcribe(samples)``: beam 5, the full
temperature fallback 0.0-1.0, ``condition_on_previous_text=True``, no token cap) is timed
against the service's decoding (same run, interleaved, medians). It prints the real-time
factor (processing seconds / audio seconds) of each and the ratio default / service: above 1
means the service's options stop the hallucination loops sooner.

Part C - long audio (``--long``, or ``--only-long`` to run it alone). A 5-minute and a
20-minute recording (espeak-ng reading generated English sentences; the text read is the
reference), side by side in one run: the whole service over HTTP with the batched pipeline
(``S2I_WHISPER_BATCH_SECONDS`` below both lengths, ``--batch-size``) against faster-whisper
called directly and sequentially with the service's options. It prints both times, the ratio
batched / sequential (goal <= 0.5 on 2 CPU cores) and the word error rate of each against the
reference (goal: batched no worse by more than 1 point).

Timings on a small shared machine drift between runs; compare the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import Server, interleaved, print_machine_facts, quiet_service_logs

CLIPS: dict[str, tuple[str, str, int]] = {
    # name -> (espeak voice, text, words per minute)
    "en-short": ("en", "The quick brown fox jumps over the lazy dog today.", 175),
    "en-medium": (
        "en",
        "Yesterday afternoon the committee met in the library to discuss the budget for next "
        "year. After a long debate, they agreed to spend more money on books, computers and "
        "the repair of the old roof.",
        175,
    ),
    "en-long": (
        "en",
        "The history of the city begins on the banks of a slow river, where farmers traded "
        "grain and wool every Saturday morning. Over the centuries the market grew into a town, "
        "and the town built walls, churches and a bridge of grey stone. When the railway arrived "
        "in the nineteenth century, factories appeared along the water and the population "
        "doubled in twenty years. Today most of the factories are gone, but the bridge still "
        "stands, and on Saturday mornings there is still a market in the square.",
        175,
    ),
    "es-as-en": (
        "en",
        "El perro de mi vecino ladra todas las noches cuando sale la luna llena.",
        175,
    ),
}
Run = tuple[float, str]  # seconds, transcript text
ENGLISH = ("en-short", "en-medium", "en-long")
UNINTELLIGIBLE = "es-as-en"


@dataclasses.dataclass
class Clip:
    """One synthesised audio file."""

    name: str
    path: Path
    seconds: float


def synthesise(folder: Path) -> list[Clip]:
    """Write every clip of ``CLIPS`` as WAV into ``folder`` with espeak-ng."""
    import faster_whisper

    clips = []
    for name, (voice, text, wpm) in CLIPS.items():
        path = folder / f"{name}.wav"
        subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(wpm), "-w", str(path), text],
            check=True,
            capture_output=True,
        )
        samples = faster_whisper.decode_audio(str(path))
        clips.append(Clip(name, path, len(samples) / 16_000))
    return clips


def machine_facts() -> None:
    """Print what the numbers depend on."""
    import ctranslate2
    import faster_whisper

    print_machine_facts(
        f"faster-whisper {faster_whisper.__version__}, ctranslate2 {ctranslate2.__version__}",
        f"cuda devices  {ctranslate2.get_cuda_device_count()}",
    )
    print()


def multipart(field: str, filename: str, data: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body with one file field, and its content type."""
    boundary = f"----s2i-bench-{uuid.uuid4().hex}"
    head = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    return head + data + tail, f"multipart/form-data; boundary={boundary}"


def upload(server: Server, clip: Clip) -> tuple[float, dict[str, Any]]:
    """POST the clip to /transcribe-audio; client-side seconds and the JSON body."""
    body, content_type = multipart("audio", clip.path.name, clip.path.read_bytes())
    return server.post("/transcribe-audio", body, content_type)


def timed_runs(
    repeats: int, runs: dict[str, Callable[[], Run]]
) -> dict[str, tuple[list[float], str]]:
    """Each run's seconds over ``repeats`` interleaved repeats, and its last text."""
    results = interleaved(repeats, runs)
    return {name: ([s for s, _ in done], done[-1][1]) for name, done in results.items()}


def service_transcribe(model: Any, samples: Any, settings: Any) -> Run:
    """Transcribe ``samples`` with the service's decoding options; seconds and text."""
    from speech2image.engines.whisper import transcribe

    start = time.perf_counter()
    result = transcribe(
        model,
        samples,
        language=None,
        task="transcribe",
        word_timestamps=False,
        beam_size=settings.whisper_beam_size,
        vad=settings.whisper_vad,
    )
    return time.perf_counter() - start, result.text


def part_a(model_name: str, repeats: int, clips: list[Clip], tmp: Path) -> None:
    """Service overhead: direct faster-whisper against the HTTP endpoint."""
    import faster_whisper

    from speech2image.app import create_app
    from speech2image.audio import decode_audio
    from speech2image.config import load_settings
    from speech2image.engines.whisper import resolve_whisper_model

    settings = load_settings(
        log_dir=tmp / "logs",
        upload_dir=tmp / "uploads",
        ratelimit_enabled=False,
        whisper_model=model_name,
        whisper_device="cpu",
        whisper_compute_type="int8",
    )
    folder = resolve_whisper_model(model_name, Path(settings.model_cache_dir))
    model = faster_whisper.WhisperModel(str(folder), device="cpu", compute_type="int8")

    def direct(clip: Clip, decode: Callable[[str], Any] = faster_whisper.decode_audio) -> Run:
        start = time.perf_counter()
        samples = decode(str(clip.path))
        _, text = service_transcribe(model, samples, settings)
        return time.perf_counter() - start, text  # the decode included

    def service_decode(path: str) -> Any:
        return decode_audio(path, settings.max_audio_seconds).samples

    app = create_app(settings)
    server = Server(app)
    try:
        with quiet_service_logs():

            def http(clip: Clip) -> Run:
                seconds, body = upload(server, clip)
                return seconds, body["text"]

            warm = clips[0]
            direct(warm)
            direct(warm, service_decode)
            http(warm)

            print(
                f"Part A - service overhead, model {model_name!r}, beam "
                f"{settings.whisper_beam_size}, vad {settings.whisper_vad}, median of {repeats}"
            )
            header = (
                f"{'clip':<10} {'audio s':>8} {'direct s':>9} {'http s':>8} {'http/direct':>12} "
                f"{'direct* s':>10} {'http/direct*':>13}"
            )
            print(header)
            print("-" * len(header))
            totals = {"direct": 0.0, "direct*": 0.0, "http": 0.0}
            mismatches: dict[str, list[tuple[str, str, str]]] = {"direct": [], "direct*": []}
            for clip in clips:
                results = timed_runs(
                    repeats,
                    {
                        "direct": lambda c=clip: direct(c),
                        "http": lambda c=clip: http(c),
                        "direct*": lambda c=clip: direct(c, service_decode),
                    },
                )
                med = {name: statistics.median(times) for name, (times, _) in results.items()}
                print(
                    f"{clip.name:<10} {clip.seconds:8.2f} {med['direct']:9.3f} {med['http']:8.3f} "
                    f"{med['http'] / med['direct']:12.3f} {med['direct*']:10.3f} "
                    f"{med['http'] / med['direct*']:13.3f}"
                )
                if clip.name in ENGLISH:
                    for name in totals:
                        totals[name] += med[name]
                for name, found in mismatches.items():
                    if results[name][1] != results["http"][1]:
                        found.append((clip.name, results[name][1], results["http"][1]))
        overhead = (totals["http"] / totals["direct"] - 1) * 100
        print(
            f"overhead: {overhead:.2f}% (target <= 10%) over the English clips "
            f"({totals['direct']:.3f} s direct, {totals['http']:.3f} s http)"
        )
        same_work = (totals["http"] / totals["direct*"] - 1) * 100
        print(
            f"overhead on identical samples (direct*: the service's PyAV decode): {same_work:.2f}%"
        )
        for name, found in mismatches.items():
            if not found:
                print(f"transcripts {name} vs http: match (all {len(clips)} clips)")
                continue
            print(f"transcripts {name} vs http: DIFFER in {len(found)} of {len(clips)} clips")
            for clip_name, d_text, h_text in found:
                print(f"  {clip_name}: {name:<7} {d_text!r}")
                print(f"  {clip_name}: {'http':<7} {h_text!r}")
        print(
            "  (direct rounds samples to 16 bits, so its beam search may differ; the "
            f"{UNINTELLIGIBLE} clip falls back to sampling at temperature > 0, which is random)"
        )
        print()
    finally:
        server.close()


def part_b(repeats: int, clip: Clip, cache_dir: Path) -> None:
    """Unintelligible audio: faster-whisper's default decoding against the service's."""
    import faster_whisper

    from speech2image.config import load_settings
    from speech2image.engines.whisper import resolve_whisper_model

    settings = load_settings()
    folder = resolve_whisper_model("tiny.en", cache_dir)
    model = faster_whisper.WhisperModel(str(folder), device="cpu", compute_type="int8")
    samples = faster_whisper.decode_audio(str(clip.path))

    def default() -> Run:
        start = time.perf_counter()
        segments, _ = model.transcribe(samples)
        text = "".join(s.text for s in segments).strip()
        return time.perf_counter() - start, text

    def service() -> Run:
        return service_transcribe(model, samples, settings)

    default()
    service()
    results = timed_runs(repeats, {"default": default, "service": service})
    print(
        f"Part B - unintelligible audio ({clip.name}, {clip.seconds:.2f} s), model 'tiny.en', "
        f"median of {repeats}"
    )
    header = f"{'decoding':<10} {'median s':>9} {'RTF':>7}  text"
    print(header)
    print("-" * len(header))
    medians = {}
    for name, (times, text) in results.items():
        medians[name] = statistics.median(times)
        shown = text if len(text) <= 70 else text[:67] + "..."
        print(f"{name:<10} {medians[name]:9.3f} {medians[name] / clip.seconds:7.3f}  {shown!r}")
    print(f"default/service: {medians['default'] / medians['service']:.2f}x")
    print(
        f"(service: beam {settings.whisper_beam_size}, vad {settings.whisper_vad}, temperatures "
        "(0.0, 0.4, 0.8), condition_on_previous_text False, token cap; default: beam 5, no vad, "
        "temperatures 0.0-1.0 step 0.2, condition_on_previous_text True)"
    )


LONG_WORDS = {
    "adjective": [
        "small",
        "old",
        "green",
        "quiet",
        "busy",
        "bright",
        "heavy",
        "narrow",
        "famous",
        "gentle",
    ],
    "noun": [
        "farmer",
        "river",
        "market",
        "teacher",
        "bridge",
        "garden",
        "window",
        "village",
        "doctor",
        "station",
    ],
    "verb": [
        "visited",
        "painted",
        "repaired",
        "watched",
        "cleaned",
        "opened",
        "followed",
        "found",
        "built",
        "sold",
    ],
    "place": [
        "morning",
        "evening",
        "winter",
        "summer",
        "harbour",
        "valley",
        "forest",
        "kitchen",
        "library",
        "square",
    ],
}


def long_text(minutes: float, words_per_minute: int, seed: int) -> str:
    """Plain English sentences, about ``minutes`` of speech at ``words_per_minute``."""
    import random

    pick = random.Random(seed).choice
    words: list[str] = []
    sentences = []
    while len(words) < minutes * words_per_minute:
        sentence = (
            f"The {pick(LONG_WORDS['adjective'])} {pick(LONG_WORDS['noun'])} "
            f"{pick(LONG_WORDS['verb'])} the {pick(LONG_WORDS['noun'])} in the "
            f"{pick(LONG_WORDS['place'])}."
        )
        sentences.append(sentence)
        words += sentence.split()
    return " ".join(sentences)


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level Levenshtein distance / reference words (lower case, no punctuation)."""
    import re

    ref = re.findall(r"[a-z']+", reference.lower())
    hyp = re.findall(r"[a-z']+", hypothesis.lower())
    previous = list(range(len(hyp) + 1))
    for i, word in enumerate(ref, 1):
        current = [i] + [0] * len(hyp)
        for j, other in enumerate(hyp, 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (word != other))
        previous = current
    return previous[-1] / max(len(ref), 1)


def part_c(model_name: str, batch_size: int, threads: int, tmp: Path) -> None:
    """Long audio: the batched service against sequential direct faster-whisper."""
    import faster_whisper

    from speech2image.app import create_app
    from speech2image.config import load_settings
    from speech2image.engines.whisper import resolve_whisper_model

    settings = load_settings(
        log_dir=tmp / "logs",
        upload_dir=tmp / "uploads",
        ratelimit_enabled=False,
        whisper_model=model_name,
        whisper_device="cpu",
        whisper_compute_type="int8",
        whisper_cpu_threads=threads,
        whisper_batch_seconds=60,
        whisper_batch_size=batch_size,
        max_audio_seconds=3600,
        max_upload_bytes=256 * 1024 * 1024,
    )
    folder = resolve_whisper_model(model_name, Path(settings.model_cache_dir))
    model = faster_whisper.WhisperModel(
        str(folder), device="cpu", compute_type="int8", cpu_threads=threads
    )
    clips = []
    for minutes, seed in ((5, 1), (20, 2)):
        text = long_text(minutes, 175, seed)
        path = tmp / f"long-{minutes}.wav"
        subprocess.run(
            ["espeak-ng", "-v", "en", "-s", "175", "-w", str(path), text],
            check=True,
            capture_output=True,
        )
        samples = faster_whisper.decode_audio(str(path))
        clips.append((Clip(f"{minutes} min", path, len(samples) / 16_000), text))

    app = create_app(settings)
    server = Server(app)
    try:
        with quiet_service_logs():
            print(
                f"Part C - long audio, model {model_name!r}, batch size {batch_size}, cpu "
                f"threads {threads or 'auto'}, beam {settings.whisper_beam_size}"
            )
            header = (
                f"{'clip':<8} {'audio s':>8} {'sequential s':>13} {'batched s':>10} "
                f"{'batched/seq':>12} {'WER seq':>8} {'WER batched':>12}"
            )
            print(header)
            print("-" * len(header))
            for clip, reference in clips:
                start = time.perf_counter()
                samples = faster_whisper.decode_audio(str(clip.path))
                _, sequential_text = service_transcribe(model, samples, settings)
                sequential = time.perf_counter() - start
                batched, body = upload(server, clip)
                ratio = batched / sequential
                print(
                    f"{clip.name:<8} {clip.seconds:8.1f} {sequential:13.1f} {batched:10.1f} "
                    f"{ratio:12.3f} {word_error_rate(reference, sequential_text):8.3f} "
                    f"{word_error_rate(reference, body['text']):12.3f}",
                    flush=True,
                )
            print("goal: batched/seq <= 0.5; WER batched <= WER seq + 0.01")
    finally:
        server.close()


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, synthesise the clips, run both parts."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="base", help="service model for part A (base, tiny.en)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path and clip")
    parser.add_argument("--long", action="store_true", help="also part C (5 and 20 minutes)")
    parser.add_argument("--only-long", action="store_true", help="part C alone")
    parser.add_argument("--batch-size", type=int, default=8, help="part C: batched decode size")
    parser.add_argument("--threads", type=int, default=0, help="part C: CPU threads (0: auto)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    from speech2image.config import load_settings

    machine_facts()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="s2i-bench-") as name:
        tmp = Path(name)
        if not args.only_long:
            clips = synthesise(tmp)
            part_a(args.model, args.repeats, clips, tmp)
            unintelligible = next(c for c in clips if c.name == UNINTELLIGIBLE)
            part_b(args.repeats, unintelligible, Path(load_settings().model_cache_dir))
        if args.long or args.only_long:
            part_c(args.model, args.batch_size, args.threads, tmp)
    print(f"\nwall time: {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
