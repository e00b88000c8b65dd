"""Safe public defaults (issue 7, point 10): byte cap, exposure warning, cache and type headers,
no server paths in records."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from speech2image.config import IMAGE_MODEL_PRESETS, load_settings
from speech2image.engines.diffusers_sd import public_source

from .test_images import fetch, generate

ROOT = Path(__file__).resolve().parent.parent
WARNING = "authentication off"


def test_image_bytes_are_capped_by_default() -> None:
    assert load_settings().image_max_bytes == 10 * 1024**3


def _server_env(tmp_path: Path, tiny_models: dict[str, Path], **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("S2I_")}
    env |= {
        "S2I_LOG_DIR": str(tmp_path / "logs"),
        "S2I_UPLOAD_DIR": str(tmp_path / "uploads"),
        "S2I_IMAGE_DIR": str(tmp_path / "images"),
        "S2I_DATA_DIR": str(tmp_path / "data"),
        "S2I_IMAGE_MODELS": json.dumps({"tiny": {"source": str(tiny_models["tiny-art"])}}),
        "S2I_STYLE_MODELS": json.dumps({"artistic": "tiny", "photographic": "tiny"}),
        "S2I_CLEANUP_INTERVAL_SECONDS": "0",
        "S2I_THREADS": "2",
        "HOST": "0.0.0.0",
    }
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        env["PORT"] = str(sock.getsockname()[1])
    return env | extra


def _start_and_stop(command: list[str], env: dict[str, str]) -> str:
    """Start a server, wait until /health answers, stop it; returns what it wrote on stderr."""
    process = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, process.communicate()[1]
            try:
                url = f"http://127.0.0.1:{env['PORT']}/health"
                with urllib.request.urlopen(url, timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    return stderr


def test_public_address_without_auth_warns_at_start_up(tmp_path, tiny_models) -> None:
    gunicorn = shutil.which("gunicorn", path=str(Path(sys.executable).parent))
    assert gunicorn
    production = [gunicorn, "-c", "gunicorn.conf.py"]
    exposed = _start_and_stop(production, _server_env(tmp_path, tiny_models))
    assert WARNING in exposed and "S2I_API_KEYS" in exposed
    with_keys = _server_env(tmp_path, tiny_models, S2I_ADMIN_API_KEYS="operator-key")
    assert WARNING not in _start_and_stop(production, with_keys)
    development = _start_and_stop([sys.executable, "run.py"], _server_env(tmp_path, tiny_models))
    assert WARNING in development


@pytest.mark.parametrize(
    ("keys", "scope"),
    [({}, "public"), ({"admin_api_keys": ["boss"]}, "private"), ({"api_keys": ["k"]}, "private")],
    ids=["auth-off", "admin-keys-only", "api-keys"],
)
def test_image_cache_scope_is_private_whenever_a_key_is_configured(
    make_app, keys: dict, scope: str
) -> None:
    app = make_app(**keys)
    headers = {"X-API-Key": (keys.get("admin_api_keys") or keys.get("api_keys") or ["-"])[0]}
    client = app.test_client()
    made = client.post("/generate-image", json={"prompt": "a tower"}, headers=headers)
    assert made.status_code == 200, made.json
    served = fetch(client, made.json["images"][0]["url"], headers=headers)
    assert served.headers["Cache-Control"].startswith(f"{scope},")


def test_every_answer_says_nosniff(make_app) -> None:
    app = make_app(api_keys=["k"])
    client = app.test_client()
    key = {"X-API-Key": "k"}
    made = generate(client, prompt="a tower")  # 401: no key
    assert made.status_code == 401
    answers = [
        made,
        client.get("/health"),
        client.get("/nothing-here", headers=key),
        client.post("/generate-image", json={"prompt": ""}, headers=key),
        client.get("/images", headers=key),
    ]
    made = client.post("/generate-image", json={"prompt": "a tower"}, headers=key)
    answers += [made, fetch(client, made.json["images"][0]["url"], headers=key)]
    for answer in answers:
        assert answer.headers.get("X-Content-Type-Options") == "nosniff", answer.status_code


def test_model_source_names_the_model_never_a_server_path(make_app, tiny_models) -> None:
    app = make_app()
    client = app.test_client()
    made = generate(client, prompt="an oil painting of a tower", model="tiny-art")
    assert made.status_code == 200
    row = client.get("/images").json["images"][0]
    assert row["parameters"]["model_source"] == "tiny-art"
    png = Image.open(io.BytesIO(fetch(client, made.json["images"][0]["url"]).data))
    assert json.loads(png.text["parameters"])["model_source"] == "tiny-art"
    for shown in (json.dumps(row), png.text["parameters"]):
        assert (
            str(tiny_models["tiny-art"]) not in shown
            and str(tiny_models["tiny-art"].parent) not in shown
        )
    assert public_source("dreamshaper", IMAGE_MODEL_PRESETS["dreamshaper"]) == "Lykon/dreamshaper-8"
