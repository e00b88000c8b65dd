"""What English prompts from non-English speech cost: transcribe-then-translate vs the others.

Run: ``.venv/bin/python bench/translate.py [--repeats 3]``

It synthesises a German and an English spoken request with espeak-ng and times, with Whisper
``base`` on CPU (int8) and the service's decoding options, interleaved on every repeat:

- transcribe: one pass, ``task=transcribe`` (it detects the language as it goes);
- translate: one pass, ``task=translate`` with the clip's language;
- detect: ``WhisperModel.detect_language`` alone (one encoder pass over the first 30 s).

/speech-to-image uses transcribe, then translate only when the language is not English: the
original words are kept and English speech costs nothing more. The alternative, detect then
translate, skips the transcript the answer must keep, and adds the detect pass to English
speech. Each cell is the median of the repeats; compare the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from speech2image.audio import decode_audio
from speech2image.engines.whisper import resolve_whisper_model, transcribe

CLIPS = {
    "de": ("de", "Ich habe einen kleinen Hund und eine schwarze Katze."),
    "en": ("en", "Um, can you draw me a lighthouse on a cliff, but without any people?"),
}


def _timed(fn, *args, **kwargs) -> tuple[float, Any]:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - started, result


def main() -> None:
    """Print the median seconds of each pass per clip and the cost ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from faster_whisper import WhisperModel

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = WhisperModel(
            str(resolve_whisper_model("base", root / "cache")), device="cpu", compute_type="int8"
        )
        print(f"{'clip':<5} {'transcribe':>11} {'translate':>10} {'detect':>8}  text")
        for name, (voice, text) in CLIPS.items():
            wav = root / f"{name}.wav"
            subprocess.run(
                ["espeak-ng", "-v", voice, "-s", "150", "-w", str(wav), text], check=True
            )
            samples = decode_audio(wav, 60).samples
            times: dict[str, list[float]] = {"transcribe": [], "translate": [], "detect": []}
            options = {"word_timestamps": False, "beam_size": 5, "vad": False}
            for _ in range(args.repeats):
                seconds, heard = _timed(
                    transcribe, model, samples, language=None, task="transcribe", **options
                )
                times["transcribe"].append(seconds)
                seconds, english = _timed(
                    transcribe, model, samples, language=voice, task="translate", **options
                )
                times["translate"].append(seconds)
                times["detect"].append(_timed(model.detect_language, samples)[0])
            med = {k: statistics.median(v) for k, v in times.items()}
            print(
                f"{name:<5} {med['transcribe']:>10.2f}s {med['translate']:>9.2f}s "
                f"{med['detect']:>7.2f}s  {heard.language}: {heard.text!r} -> {english.text!r}"
            )
            if voice != "en":
                both = med["transcribe"] + med["translate"]
                print(
                    f"      transcribe+translate / transcribe: {both / med['transcribe']:.2f}x; "
                    f"detect+translate / transcribe+translate: "
                    f"{(med['detect'] + med['translate']) / both:.2f}x"
                )
            else:
                print(
                    "      English: no second pass (ratio 1.00x); detect-first would add "
                    f"{med['detect'] / med['transcribe']:.2f}x"
                )


if __name__ == "__main__":
    main()
