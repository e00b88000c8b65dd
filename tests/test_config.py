"""Settings from the environment: typed, defaults documented, bad values named at start-up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from speech2image.config import Settings, SettingsError, env_name, load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_defaults() -> None:
    settings = load_settings()
    assert (settings.host, settings.port, settings.debug) == ("127.0.0.1", 5000, False)
    assert settings.whisper_model == "base"
    assert settings.max_audio_seconds == 600
    assert settings.ratelimit_storage_uri == "memory://"


def test_reads_classic_and_prefixed_variables(monkeypatch) -> None:
    monkeypatch.setenv("PORT", "8080")
    monkeypatch.setenv("DEBUG", "true")
    monkeypatch.setenv("S2I_MAX_UPLOAD_BYTES", "2MiB")
    monkeypatch.setenv("S2I_PRELOAD_MODELS", "whisper, other ")
    monkeypatch.setenv("S2I_WHISPER_MODEL", "tiny.en")
    settings = load_settings()
    assert settings.port == 8080 and settings.debug is True
    assert settings.max_upload_bytes == 2 * 1024 * 1024
    assert settings.preload_models == ["whisper", "other"]
    assert settings.whisper_model == "tiny.en"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PORT", "http"),
        ("PORT", "70000"),
        ("S2I_MAX_AUDIO_SECONDS", "-5"),
        ("S2I_MAX_UPLOAD_BYTES", "lots"),
        ("S2I_WHISPER_DEVICE", "tpu"),
        ("S2I_RATELIMIT_DEFAULT", "fast"),
        ("S2I_RATELIMIT_STORAGE_URI", "mongodb://x"),
        ("S2I_LOG_LEVEL", "LOUD"),
        ("S2I_STYLE_MODEL_SET", "sd4"),
        ("S2I_IMAGE_OFFLOAD", "sometimes"),
        ("S2I_DEFAULT_SCHEDULER", "turbo"),
        ("S2I_STYLE_LORAS", '{"watercolor": {"lora": "wc"}}'),  # no S2I_LORA_DIR
        ("S2I_IMAGE_MODELS", '{"x": {"source": "a/b", "family": "flux", "scheduler": "ddim"}}'),
        (
            "S2I_IMAGE_MODELS",
            '{"x": {"source": "a/b", "family": "sdxl", "few_step": true, "guidance_scale": 7}}',
        ),
    ],
)
def test_invalid_value_names_the_variable(monkeypatch, variable, value) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=variable):
        load_settings()


def test_every_setting_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [env_name(f) for f in Settings.model_fields if f"`{env_name(f)}`" not in readme]
    assert missing == []


def test_importing_the_package_imports_no_torch() -> None:
    code = (
        "import sys, speech2image, speech2image.app, speech2image.config, speech2image.cli;"
        "speech2image.app.create_app;"
        "assert 'torch' not in sys.modules, 'torch imported';"
        "assert 'faster_whisper' not in sys.modules, 'faster_whisper imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_server_refuses_to_start_on_bad_setting(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "run.py"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "S2I_MAX_AUDIO_SECONDS": "soon", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "S2I_MAX_AUDIO_SECONDS" in result.stderr


def test_one_setting_points_the_automatic_choice_at_a_preset_set() -> None:
    from speech2image.config import IMAGE_MODEL_PRESETS, STYLE_MODEL_SETS

    assert load_settings().style_models == {
        "artistic": "dreamshaper",
        "photographic": "realistic-vision",
    }
    assert load_settings(style_model_set="sdxl").style_models == {
        "artistic": "dreamshaper-xl",
        "photographic": "realvis-xl",
    }
    lightning = load_settings(style_model_set="sdxl-lightning").style_models
    assert {IMAGE_MODEL_PRESETS[m].few_step for m in lightning.values()} == {True}
    explicit = load_settings(style_model_set="flux", style_models={"artistic": "dreamshaper"})
    assert explicit.style_models == {"artistic": "dreamshaper"}  # an explicit map wins
    for models in STYLE_MODEL_SETS.values():
        assert set(models.values()) <= set(IMAGE_MODEL_PRESETS)
    # Every preset declares its family; the defaults it declares suit it (checked at start-up).
    assert {spec.family for spec in IMAGE_MODEL_PRESETS.values()} == {"sd1", "sdxl", "flux"}
