"""One bad request never fails the others merged into its batch (issue 7, point 1b)."""

from __future__ import annotations

import pytest

from .test_images import image_files
from .test_jobs import submit, wait_state

POISON = "POISONED prompt"
ALPHA = {"X-API-Key": "alpha"}
BETA = {"X-API-Key": "beta"}


def _poison_tokenizer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tokenizer fails on the poisoned prompt, like a lone UTF-16 surrogate would."""
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    real_call = PreTrainedTokenizerBase.__call__

    def call(self, text=None, *args, **kwargs):  # type: ignore[no-untyped-def]
        texts = [text] if isinstance(text, str) else list(text or [])
        if any(POISON in t for t in texts):
            raise UnicodeEncodeError("utf-8", POISON, 0, 1, "surrogates not allowed")
        return real_call(self, text, *args, **kwargs)

    monkeypatch.setattr(PreTrainedTokenizerBase, "__call__", call)


def _poison_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline call fails whenever the poisoned prompt is part of it."""
    import speech2image.image_service as image_service

    real_generate = image_service.generate

    def generate(pipe, spec, **kwargs):  # type: ignore[no-untyped-def]
        if POISON in spec.prompts:
            raise RuntimeError("the text encoder choked on one prompt")
        return real_generate(pipe, spec, **kwargs)

    monkeypatch.setattr(image_service, "generate", generate)


@pytest.mark.parametrize(
    ("fault", "good_batch_size"), [("tokenizer", 3), ("pipeline", 1)], ids=["tokenizer", "pipeline"]
)
def test_poisoned_request_fails_alone_in_a_merged_batch(
    make_app, monkeypatch: pytest.MonkeyPatch, fault: str, good_batch_size: int
) -> None:
    import speech2image.image_service as image_service

    {"tokenizer": _poison_tokenizer, "pipeline": _poison_pipeline}[fault](monkeypatch)
    calls: list[list[str]] = []
    inner = image_service.generate

    def counting(pipe, spec, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(list(spec.prompts))
        return inner(pipe, spec, **kwargs)

    monkeypatch.setattr(image_service, "generate", counting)
    app = make_app(
        api_keys=["alpha", "beta"], job_workers=1, batch_max_wait_ms=1500, batch_max_images=4
    )
    client = app.test_client()
    bad = submit(client, headers=ALPHA, prompt=POISON, seed=1, model="tiny-art").json
    good = [
        submit(
            client, headers=BETA, prompt=f"a quiet harbour {i}", seed=10 + i, model="tiny-art"
        ).json
        for i in range(3)
    ]

    failed = wait_state(client, bad["id"], {"succeeded", "failed"}, headers=ALPHA, timeout=300)
    assert failed["state"] == "failed"
    assert failed["error"]["status"] >= 400 and failed["error"]["code"]
    assert "choked" not in str(failed["error"])  # no internals in the answer
    for job in good:
        done = wait_state(client, job["id"], {"succeeded", "failed"}, headers=BETA, timeout=300)
        assert done["state"] == "succeeded", done
        assert len(done["result"]["images"]) == 1
        assert done["result"]["batch_size"] == good_batch_size
    assert len(calls[0]) == (3 if fault == "tokenizer" else 4)  # the four were merged
    assert app.extensions["jobs"].stats().batches_run == 1
    assert client.get("/images", headers=ALPHA).json["total"] == 0
    assert client.get("/images", headers=BETA).json["total"] == 3
    assert len(image_files(app)) == 3
