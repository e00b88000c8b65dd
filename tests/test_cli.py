"""The `speech2image` command and the production server (gunicorn, one worker, threads)."""

from __future__ import annotations

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

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "speech2image"]


def run_cli(*args: str, env: dict[str, str], timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def cli_env(tmp_path: Path, model_cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("S2I_")}
    env.update(
        S2I_MODEL_CACHE_DIR=str(model_cache),
        S2I_LOG_DIR=str(tmp_path / "logs"),
        S2I_UPLOAD_DIR=str(tmp_path / "uploads"),
        **extra,
    )
    return env


def test_models_lists_availability(tmp_path, model_cache) -> None:
    result = run_cli("models", "--json", env=cli_env(tmp_path, model_cache))
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)
    assert row["name"] == "whisper:base"
    assert row["available"] is True and row["offline"] is True

    missing = run_cli("models", env=cli_env(tmp_path, model_cache, S2I_WHISPER_MODEL="large-v3"))
    assert missing.returncode == 1
    assert "NOT AVAILABLE" in missing.stdout and "hub:large-v3" in missing.stdout


def test_transcribe_prints_text(tmp_path, model_cache, speech) -> None:
    result = run_cli("transcribe", str(speech["english"]), env=cli_env(tmp_path, model_cache))
    assert result.returncode == 0, result.stderr
    assert "forest" in result.stdout.lower()


def test_transcribe_reports_bad_audio(tmp_path, model_cache) -> None:
    bogus = tmp_path / "notes.txt"
    bogus.write_text("not audio")
    result = run_cli("transcribe", str(bogus), env=cli_env(tmp_path, model_cache))
    assert result.returncode != 0
    assert "unsupported_audio" in result.stderr


def test_bad_setting_stops_cli_with_variable_name(tmp_path, model_cache) -> None:
    result = run_cli("models", env=cli_env(tmp_path, model_cache, S2I_WHISPER_BEAM_SIZE="99"))
    assert result.returncode != 0
    assert "S2I_WHISPER_BEAM_SIZE" in result.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_health(url: str, process: subprocess.Popen, seconds: float = 60) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                return json.loads(response.read())
        except OSError:
            time.sleep(0.2)
    raise AssertionError("server did not answer /health")


def test_gunicorn_config_serves_with_one_worker(tmp_path, model_cache) -> None:
    port = _free_port()
    gunicorn = shutil.which("gunicorn", path=str(Path(sys.executable).parent))
    assert gunicorn, "gunicorn is installed with the package"
    process = subprocess.Popen(
        [gunicorn, "-c", "gunicorn.conf.py"],
        cwd=ROOT,
        env=cli_env(tmp_path, model_cache, PORT=str(port), S2I_THREADS="4"),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert _wait_for_health(f"http://127.0.0.1:{port}", process)["status"] == "ok"
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    assert stderr.count("Booting worker") == 1
    assert "gthread" in stderr
