"""The `speech2image` command and the production server (gunicorn, one worker, threads)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "speech2image"]


def run_cli(*args: str, env: dict[str, str], timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


@pytest.fixture
def cli_env(tmp_path: Path, model_cache: Path, tiny_models: dict[str, Path]):  # type: ignore[no-untyped-def]
    def build(**extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("S2I_")}
        models = {name: {"source": str(path)} for name, path in tiny_models.items()}
        env.update(
            S2I_MODEL_CACHE_DIR=str(model_cache),
            S2I_LOG_DIR=str(tmp_path / "logs"),
            S2I_UPLOAD_DIR=str(tmp_path / "uploads"),
            S2I_IMAGE_DIR=str(tmp_path / "images"),
            S2I_DATA_DIR=str(tmp_path / "data"),
            S2I_IMAGE_MODELS=json.dumps(models),
            S2I_STYLE_MODELS=json.dumps({"artistic": "tiny-art", "photographic": "tiny-photo"}),
            S2I_DEFAULT_WIDTH="64",
            S2I_DEFAULT_HEIGHT="64",
            S2I_DEFAULT_STEPS="2",
            S2I_IMAGE_ALLOW_DOWNLOAD="false",  # no test reaches a model hub
        )
        env.update(extra)
        return env

    return build


def test_models_lists_availability(cli_env) -> None:
    result = run_cli("models", "--json", env=cli_env())
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["whisper:base"]["available"] and rows["whisper:base"]["offline"]
    assert rows["whisper:base"]["required"]
    assert rows["sd:tiny-art"]["available"] and rows["sd:tiny-art"]["required"]
    dreamshaper = rows["sd:dreamshaper"]
    assert not dreamshaper["available"] and not dreamshaper["required"]
    assert "Lykon/dreamshaper-8" in dreamshaper["problem"]

    missing = run_cli("models", env=cli_env(S2I_WHISPER_MODEL="large-v3"))
    assert missing.returncode == 1
    assert "NOT AVAILABLE" in missing.stdout and "hub:large-v3" in missing.stdout


def test_build_tiny_model_then_generate(cli_env, tmp_path) -> None:
    built = run_cli("build-tiny-model", str(tmp_path / "tiny"), "--seed", "3", env=cli_env())
    assert built.returncode == 0, built.stderr
    assert (tmp_path / "tiny" / "model_index.json").is_file()
    assert "S2I_IMAGE_MODELS=" in built.stdout
    models = json.dumps({"mine": {"source": str(tmp_path / "tiny")}})
    env = cli_env(
        S2I_IMAGE_MODELS=models,
        S2I_STYLE_MODELS=json.dumps({"artistic": "mine", "photographic": "mine"}),
    )
    result = run_cli("generate", "a lighthouse", "--seed", "9", env=env)
    assert result.returncode == 0, result.stderr
    assert "model: mine" in result.stdout
    (line,) = [ln for ln in result.stdout.splitlines() if ln.endswith("seed=9")]
    assert Path(line.split()[0]).is_file()
    bad = run_cli("generate", "a lighthouse", "--width", "100", env=env)
    assert bad.returncode != 0 and "`width`" in bad.stderr


def test_transcribe_prints_text(cli_env, speech) -> None:
    result = run_cli("transcribe", str(speech["english"]), env=cli_env())
    assert result.returncode == 0, result.stderr
    assert "forest" in result.stdout.lower()


def test_transcribe_reports_bad_audio(cli_env, tmp_path) -> None:
    bogus = tmp_path / "notes.txt"
    bogus.write_text("not audio")
    result = run_cli("transcribe", str(bogus), env=cli_env())
    assert result.returncode != 0
    assert "unsupported_audio" in result.stderr


def test_bad_setting_stops_cli_with_variable_name(cli_env) -> None:
    result = run_cli("models", env=cli_env(S2I_WHISPER_BEAM_SIZE="99"))
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


def test_gunicorn_config_serves_with_one_worker(cli_env) -> None:
    port = _free_port()
    gunicorn = shutil.which("gunicorn", path=str(Path(sys.executable).parent))
    assert gunicorn, "gunicorn is installed with the package"
    process = subprocess.Popen(
        [gunicorn, "-c", "gunicorn.conf.py"],
        cwd=ROOT,
        env=cli_env(PORT=str(port), S2I_THREADS="4"),
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


def test_generate_and_transcribe_show_progress_on_a_terminal(cli_env, speech) -> None:
    import fcntl
    import pty
    import struct
    import termios

    def on_terminal(*args: str) -> str:
        leader, follower = pty.openpty()
        # A real terminal has a size; a fresh pty is 0x0, which leaves no room for a bar.
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        process = subprocess.Popen(
            [*CLI, *args], env=cli_env(), stdout=follower, stderr=follower, cwd=ROOT
        )
        os.close(follower)
        output = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
        assert process.wait(120) == 0, output.decode(errors="replace")
        os.close(leader)
        return output.decode(errors="replace")

    shown = on_terminal("generate", "a castle", "--steps", "12")
    assert re.search(r"generating: +\d+%.*\d+/12 \[", shown), shown
    heard = on_terminal("transcribe", str(speech["long"]))
    assert "transcribing" in heard and "lighthouse" in heard.lower()
