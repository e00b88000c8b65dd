"""SD 1.x, SDXL and FLUX.1 behind one engine, with LoRAs per request (issue 14).

Every family runs through the real loading code on tiny random-weight pipelines built offline:
from a folder and from a single file, with its own defaults and limits, batched across
requests, with LoRAs switched per call and never leaking into another request's images.
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from speech2image.engines.families import FAMILIES

from .test_images import fetch, generate, image_files, loaded_models, pixels
from .test_jobs import submit, wait_state

FAMILY_MODELS = {"sd1": "tiny-art", "sdxl": "tiny-xl", "flux": "tiny-flux"}
INK = {"sd1": "sd-ink", "sdxl": "xl-ink", "flux": "flux-ink"}


def family_app(make_app, tiny_models, family_models, lora_dir=None, **overrides):  # type: ignore[no-untyped-def]
    """An app serving one tiny model per family (and a few-step SDXL), 2 steps at 64x64."""
    models = {
        "tiny-art": {"source": str(tiny_models["tiny-art"])},
        "tiny-photo": {"source": str(tiny_models["tiny-photo"])},
        "tiny-xl": {"source": str(family_models["tiny-xl"])},
        "tiny-xl-fast": {"source": str(family_models["tiny-xl"]), "few_step": True},
        "tiny-flux": {"source": str(family_models["tiny-flux"])},
    }
    settings = {"image_models": models, "default_steps": 2}
    if lora_dir is not None:
        settings["lora_dir"] = lora_dir
    return make_app(**(settings | overrides))


@pytest.fixture
def app(make_app, tiny_models, family_models, lora_dir):  # type: ignore[no-untyped-def]
    return family_app(make_app, tiny_models, family_models, lora_dir)


# --- every family through the same loading code ----------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sdxl", "flux"])
def test_each_family_generates_the_same_pixels_for_the_same_seed(app, family) -> None:
    client = app.test_client()
    model = FAMILY_MODELS[family]
    first = generate(client, prompt="a lighthouse at dusk", model=model, seed=5)
    assert first.status_code == 200, first.json
    again = generate(client, prompt="a lighthouse at dusk", model=model, seed=5).json
    other = generate(client, prompt="a lighthouse at dusk", model=model, seed=6).json
    a, b, c = (pixels(client, r["images"][0]["url"]) for r in (first.json, again, other))
    assert np.array_equal(a, b)
    assert np.abs(a - c).mean() > 5
    body = first.json
    assert body["model_choice"]["family"] == family
    assert body["parameters"]["scheduler"] == FAMILIES[family].scheduler or family == "flux"
    # The family is in the image's metadata and in its history row.
    png = Image.open(io.BytesIO(fetch(client, body["images"][0]["url"]).data))
    meta = json.loads(png.text["parameters"])
    assert meta["family"] == family and meta["loras"] == []
    row = next(
        r for r in client.get("/images").json["images"] if r["id"] == body["images"][0]["id"]
    )
    assert row["parameters"]["family"] == family


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_single_file_loads_like_the_folder(
    make_app, tiny_models, family_models, tmp_path, family
) -> None:
    from .ldm_checkpoint import convert_sdxl, flux_transformer_file

    folder = family_models[FAMILY_MODELS[family]]
    single = tmp_path / f"{family}.safetensors"
    (convert_sdxl if family == "sdxl" else flux_transformer_file)(folder, single)
    app = family_app(
        make_app,
        tiny_models,
        family_models,
        image_models={
            "tiny-art": {"source": str(tiny_models["tiny-art"])},
            "tiny-photo": {"source": str(tiny_models["tiny-photo"])},
            "folder": {"source": str(folder)},
            "file": {"source": str(single), "config": str(folder)},
        },
    )
    client = app.test_client()
    from_file = generate(client, prompt="a red kite", model="file", seed=9)
    assert from_file.status_code == 200, from_file.json
    assert from_file.json["model_choice"]["family"] == family  # read from the file's header
    from_folder = generate(client, prompt="a red kite", model="folder", seed=9).json
    a = pixels(client, from_file.json["images"][0]["url"])
    b = pixels(client, from_folder["images"][0]["url"])
    # The same weights: equal up to floating-point rounding (layouts differ after conversion).
    assert np.abs(a - b).mean() < 0.5 and np.abs(a - b).max() <= 8


def test_requests_are_batched_across_clients_for_every_family(
    make_app, tiny_models, family_models
) -> None:
    app = family_app(
        make_app,
        tiny_models,
        family_models,
        job_workers=1,
        batch_max_wait_ms=1500,
        batch_max_images=3,  # a batch of three goes at once
    )
    client = app.test_client()
    for family in ("sdxl", "flux"):
        model = FAMILY_MODELS[family]
        jobs = [
            submit(client, prompt=f"a boat number {i}", model=model, seed=20 + i).json
            for i in range(3)
        ]
        results = [wait_state(client, j["id"], {"succeeded"}, timeout=120)["result"] for j in jobs]
        assert [r["batch_size"] for r in results] == [3, 3, 3]
        alone = generate(client, prompt="a boat number 1", model=model, seed=21).json
        assert alone["batch_size"] == 1
        batched = pixels(client, results[1]["images"][0]["url"])
        assert np.abs(batched - pixels(client, alone["images"][0]["url"])).mean() < 1


# --- family-aware defaults and limits ------------------------------------------------------


def test_defaults_come_from_the_request_then_settings_then_the_model_then_its_family(
    make_app, tiny_models, family_models
) -> None:
    models = {
        "tiny-art": {"source": str(tiny_models["tiny-art"])},
        "tiny-photo": {"source": str(tiny_models["tiny-photo"])},
        "xl": {"source": str(family_models["tiny-xl"]), "width": 128, "steps": 3},
        "xl-fast": {"source": str(family_models["tiny-xl"]), "few_step": True},
        "flux": {"source": str(family_models["tiny-flux"]), "height": 96},
    }
    # No S2I_DEFAULT_WIDTH/HEIGHT/STEPS: each model's own defaults apply.
    app = make_app(image_models=models, default_width=None, default_height=None, default_steps=None)
    images = app.extensions["images"]

    def prepared(**body):  # type: ignore[no-untyped-def]
        return images.prepare(images.validate({"prompt": "a cat", **body})).request

    xl = prepared(model="xl")
    assert (xl.family, xl.width, xl.height, xl.steps) == ("sdxl", 128, 1024, 3)
    assert (xl.guidance_scale, xl.scheduler) == (6.0, "euler_a")  # the SDXL family's
    fast = prepared(model="xl-fast")
    assert (fast.steps, fast.guidance_scale, fast.scheduler) == (4, 1.0, "euler")
    flux = prepared(model="flux")  # FLUX without guidance embedding: detected as few-step
    assert (flux.family, flux.width, flux.height) == ("flux", 1024, 96)
    assert (flux.steps, flux.guidance_scale, flux.scheduler) == (4, 0.0, "flow_euler")
    sd = prepared(model="tiny-art")
    assert (sd.family, sd.width, sd.steps, sd.guidance_scale) == ("sd1", 512, 25, 7.0)
    assert prepared(model="xl", width=64, steps=2).width == 64  # the request wins

    # A setting applies to every model that can take it; the others keep their own.
    app = make_app(image_models=models, default_guidance_scale=5.0, default_scheduler="ddim")
    images = app.extensions["images"]
    assert (prepared(model="xl").guidance_scale, prepared(model="xl").scheduler) == (5.0, "ddim")
    assert (prepared(model="xl-fast").guidance_scale, prepared(model="xl-fast").scheduler) == (
        1.0,
        "euler",
    )
    assert prepared(model="flux").scheduler == "flow_euler"

    config = app.test_client().get("/config").json
    entry = next(m for m in config["models"]["image"] if m["name"] == "flux")
    assert entry["family"] == "flux" and entry["few_step"] is True
    assert entry["negative_prompt"] is False and entry["schedulers"] == ["flow_euler"]
    assert entry["defaults"]["height"] == 96 and entry["size_multiple"] == 16
    assert loaded_models(app) == {}  # none of this loaded a model


@pytest.mark.parametrize(
    ("body", "field", "needles"),
    [
        (
            {"model": "tiny-flux", "negative_prompt": "blur"},
            "negative_prompt",
            ["FLUX.1", "takes no negative prompt"],
        ),
        (
            {"model": "tiny-flux", "scheduler": "euler_a"},
            "scheduler",
            ["'euler_a' does not apply", "flow_euler"],
        ),
        (
            {"model": "tiny-xl-fast", "scheduler": "ddim"},
            "scheduler",
            ["few-step", "use one of euler, euler_a"],
        ),
        ({"model": "tiny-art", "scheduler": "lcm"}, "scheduler", ["'lcm' does not apply"]),
        (
            {"model": "tiny-xl-fast", "guidance_scale": 7},
            "guidance_scale",
            ["from 0 to 2", "few-step"],
        ),
        ({"model": "tiny-flux", "width": 72}, "width", ["multiple of 16", "got 72"]),
        (
            {"model": "tiny-xl", "loras": [{"name": "flux-ink"}]},
            "loras.0.name",
            ["LoRA for FLUX.1", "Stable Diffusion XL"],
        ),
        (
            {"model": "tiny-xl", "loras": [{"name": "nope"}]},
            "loras.0.name",
            ["not a LoRA here", "xl-ink"],
        ),
        (
            {"model": "tiny-xl", "loras": [{"name": "xl-ink"}, {"name": "xl-ink"}]},
            "loras.1.name",
            ["named twice"],
        ),
        (
            {"model": "tiny-xl", "loras": [{"name": "xl-ink", "weight": 3}]},
            "loras.0.weight",
            ["from -2 to 2"],
        ),
        ({"model": "tiny-xl", "loras": [{"name": "a"}] * 5}, "loras", ["5 items", "limit is 4"]),
    ],
)
def test_what_a_family_cannot_do_is_a_400_that_says_why(app, body, field, needles) -> None:
    response = generate(app.test_client(), prompt="a cat", **body)
    assert response.status_code == 400, response.json
    error = response.json["error"]
    assert error["details"]["field"] == field
    for needle in needles:
        assert needle in error["message"]
    assert loaded_models(app) == {} and image_files(app) == []


@pytest.mark.parametrize("scheduler", ["lcm", "tcd", "euler"])
def test_few_step_models_start_at_the_last_timestep_with_their_schedulers(
    app, family_models, scheduler
) -> None:
    from diffusers import AutoPipelineForText2Image

    from speech2image.engines.diffusers_sd import GenerationSpec, _scheduler_for

    client = app.test_client()
    first = generate(client, prompt="a kite", model="tiny-xl-fast", scheduler=scheduler, seed=3)
    assert first.status_code == 200, first.json
    assert first.json["parameters"]["scheduler"] == scheduler
    again = generate(client, prompt="a kite", model="tiny-xl-fast", scheduler=scheduler, seed=3)
    assert np.array_equal(
        pixels(client, first.json["images"][0]["url"]),
        pixels(client, again.json["images"][0]["url"]),
    )
    # The schedulers the engine configures: "trailing" spacing for a few-step model, so its
    # first of 4 steps is the last training timestep (where a distilled model starts).
    pipe = AutoPipelineForText2Image.from_pretrained(str(family_models["tiny-xl"]))

    def first_timestep(few_step: bool) -> int:
        spec = GenerationSpec(
            prompts=["a kite"],
            negative_prompts=[None],
            seeds=[3],
            width=64,
            height=64,
            steps=4,
            guidance_scale=1.0,
            scheduler=scheduler,
            few_step=few_step,
        )
        made = _scheduler_for(pipe, spec)
        made.set_timesteps(4)
        assert (made.config.timestep_spacing == "trailing") is few_step
        return int(made.timesteps[0])

    last = pipe.scheduler.config.num_train_timesteps - 1
    assert first_timestep(True) == last
    if scheduler == "euler":
        assert first_timestep(False) < last  # a full-step model keeps its own spacing


def test_loras_are_refused_where_no_folder_is_configured(
    make_app, tiny_models, family_models
) -> None:
    app = family_app(make_app, tiny_models, family_models)
    response = generate(app.test_client(), prompt="a cat", loras=[{"name": "xl-ink"}])
    assert response.status_code == 400
    assert response.json["error"]["details"]["field"] == "loras"
    assert (
        "loras"
        not in app.test_client()
        .get("/openapi.json")
        .json["components"]["schemas"]["GenerateImageRequest"]["properties"]
    )


# --- LoRAs per request ---------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sdxl", "flux"])
def test_a_lora_changes_the_pixels_and_leaves_with_its_request(app, family) -> None:
    client = app.test_client()
    body = {"prompt": "a quiet street", "model": FAMILY_MODELS[family], "seed": 3}
    plain = generate(client, **body).json
    inked = generate(client, **body, loras=[{"name": INK[family]}])
    assert inked.status_code == 200, inked.json
    assert inked.json["parameters"]["loras"] == [{"name": INK[family], "weight": 1.0}]
    half = generate(client, **body, loras=[{"name": INK[family], "weight": 0.5}]).json
    after = generate(client, **body).json  # the adapter is loaded but off
    a, b, c, d = (pixels(client, r["images"][0]["url"]) for r in (plain, inked.json, half, after))
    assert np.abs(a - b).mean() > 1  # the LoRA changed the picture
    assert 0 < np.abs(a - c).mean() < np.abs(a - b).mean()  # half the weight, less change
    assert np.array_equal(a, d)  # nothing of it left behind


def test_requests_with_different_loras_are_never_merged_or_mixed(
    make_app, tiny_models, family_models, lora_dir, monkeypatch
) -> None:
    import speech2image.image_service as image_service

    calls: list[tuple[int, tuple[str, ...]]] = []
    real = image_service.generate

    def counting(pipe, spec, **kwargs):  # type: ignore[no-untyped-def]
        calls.append((len(spec.prompts), tuple(lora.name for lora in spec.loras)))
        return real(pipe, spec, **kwargs)

    monkeypatch.setattr(image_service, "generate", counting)
    app = family_app(
        make_app,
        tiny_models,
        family_models,
        lora_dir,
        job_workers=1,
        batch_max_wait_ms=1500,
        batch_max_images=2,  # a batch of two goes at once
    )
    client = app.test_client()
    common = {"model": "tiny-xl", "steps": 2}
    ink = [{"name": "xl-ink"}]
    # Submitted together: plain, inked, plain, inked. Equal sets merge; different ones never.
    jobs = [
        submit(client, prompt=f"a harbour {i}", seed=40 + i, **common, **extra).json
        for i, extra in enumerate([{}, {"loras": ink}, {}, {"loras": ink}])
    ]
    results = [wait_state(client, j["id"], {"succeeded"}, timeout=120)["result"] for j in jobs]
    assert sorted(calls) == [(2, ()), (2, ("xl-ink",))]
    assert [r["batch_size"] for r in results] == [2, 2, 2, 2]
    for i, extra in ((2, {}), (3, {"loras": ink})):
        alone = generate(client, prompt=f"a harbour {i}", seed=40 + i, **common, **extra).json
        job_result = results[i]
        batched = pixels(client, job_result["images"][0]["url"])
        assert np.abs(batched - pixels(client, alone["images"][0]["url"])).mean() < 1


def test_concurrent_calls_with_different_loras_do_not_leak(tiny_models, lora_dir) -> None:
    """Threads share one pipeline; each call's picture is what it makes alone."""
    from diffusers import StableDiffusionPipeline

    from speech2image.engines.diffusers_sd import GenerationSpec, LoraWeight
    from speech2image.engines.diffusers_sd import generate as run

    pipe = StableDiffusionPipeline.from_pretrained(tiny_models["tiny-art"])
    ink = (LoraWeight("sd-ink", str(lora_dir / "sd-ink.safetensors"), 1.0),)
    sets = [(), ink, (), ink]

    def one(i: int) -> np.ndarray:
        spec = GenerationSpec(["a bridge"], [None], [i], 64, 64, 2, 7.0, "euler", loras=sets[i])
        return np.asarray(run(pipe, spec)[0], dtype=np.int16)

    with ThreadPoolExecutor(max_workers=len(sets)) as pool:
        together = list(pool.map(one, range(len(sets))))
    for i, image in enumerate(together):
        assert np.array_equal(image, one(i)), i


def test_a_style_cue_turns_on_its_lora_and_says_why(
    make_app, tiny_models, family_models, lora_dir
) -> None:
    app = family_app(
        make_app,
        tiny_models,
        family_models,
        lora_dir,
        style_loras={"ink drawing": {"lora": "sd-ink", "weight": 0.8}},
    )
    client = app.test_client()
    cued = generate(client, prompt="an ink drawing of a heron", seed=2)
    assert cued.status_code == 200, cued.json
    assert cued.json["model"] == "tiny-art"
    assert cued.json["parameters"]["loras"] == [{"name": "sd-ink", "weight": 0.8}]
    assert "cue 'ink drawing' -> LoRA 'sd-ink' at weight 0.8" in cued.json["model_choice"]["reason"]
    # The caller's own choice wins, an empty list too.
    none = generate(client, prompt="an ink drawing of a heron", seed=2, loras=[]).json
    assert none["parameters"]["loras"] == []
    # A cued LoRA of another family is skipped, with the reason.
    flux = generate(client, prompt="an ink drawing of a heron", seed=2, model="tiny-flux").json
    assert flux["parameters"]["loras"] == []
    assert "for Stable Diffusion 1.x: skipped" in flux["model_choice"]["reason"]
    assert not np.array_equal(
        pixels(client, cued.json["images"][0]["url"]), pixels(client, none["images"][0]["url"])
    )


def test_config_lists_loras_and_status_shows_family_and_placement(app) -> None:
    client = app.test_client()
    config = client.get("/config").json
    assert {(entry["name"], entry["family"]) for entry in config["loras"]} == {
        ("sd-ink", "sd1"),
        ("xl-ink", "sdxl"),
        ("flux-ink", "flux"),
    }
    assert "flow_euler" in config["schedulers"] and "lcm" in config["schedulers"]
    spec = client.get("/openapi.json")  # the LoRA field is described wherever it is taken
    assert spec.status_code == 200
    schemas = spec.json["components"]["schemas"]
    loras = schemas["GenerateImageRequest"]["properties"]["loras"]
    assert loras["maxItems"] == 4 and loras["items"]["properties"]["weight"]["maximum"] == 2
    assert "loras" in schemas["OpenAIImageRequest"]["properties"]
    assert generate(client, prompt="x", model="tiny-flux").status_code == 200
    rows = {row["name"]: row for row in client.get("/status").json["models"]}
    flux = rows["sd:tiny-flux"]
    assert flux["family"] == "flux" and flux["few_step"] is True and flux["loaded"]
    assert flux["offload"] is None
    assert flux["placement"]["device"] == "cpu" and "loaded whole" in flux["placement"]["reason"]
    assert rows["sd:dreamshaper-xl"]["family"] == "sdxl"  # declared by its preset, not loaded
    assert rows["sd:dreamshaper-xl"]["placement"] is None


# --- memory: estimates and offloading decisions ------------------------------------------


def test_estimates_cover_every_component_of_each_family(family_models, tmp_path) -> None:
    from speech2image.config import IMAGE_MODEL_PRESETS, ImageModelSpec
    from speech2image.engines.diffusers_sd import DiffusersFactory

    def factory(spec: ImageModelSpec, device: str = "cuda") -> DiffusersFactory:
        return DiffusersFactory("m", spec, cache_dir=tmp_path, device=device)

    xl = factory(ImageModelSpec(source=str(family_models["tiny-xl"]))).component_bytes()
    assert {"unet", "vae", "text_encoder", "text_encoder_2"} <= set(xl)
    flux = factory(ImageModelSpec(source=str(family_models["tiny-flux"]))).component_bytes()
    assert {"transformer", "vae", "text_encoder", "text_encoder_2"} <= set(flux)
    # On the CPU (float32) a model takes twice its float16 size.
    cpu = factory(ImageModelSpec(source=str(family_models["tiny-xl"])), "cpu").estimate_bytes()
    assert cpu == 2 * sum(xl.values())
    # A hub model not downloaded yet: its family's reference figures, in half precision.
    gb = {
        name: factory(IMAGE_MODEL_PRESETS[name]).estimate_bytes() / 1e9
        for name in ("dreamshaper", "dreamshaper-xl", "flux-schnell")
    }
    assert 2.0 < gb["dreamshaper"] < 2.3 and 6.8 < gb["dreamshaper-xl"] < 7.1
    assert 33 < gb["flux-schnell"] < 34.5


def test_a_model_larger_than_the_gpu_budget_is_placed_offloaded(family_models, tmp_path) -> None:
    """The loader's budget logic, shown on CPU: what a GPU load of each size would do."""
    from speech2image.config import ImageModelSpec
    from speech2image.engines.diffusers_sd import DiffusersFactory
    from speech2image.model_loader import ModelLoader

    spec = ImageModelSpec(source=str(family_models["tiny-flux"]))

    def plan(budget: int, device: str = "cuda", offload: str = "auto"):  # type: ignore[no-untyped-def]
        loader = ModelLoader(budgets={"cpu": budget, "cuda": budget}, max_models=4)
        factory = DiffusersFactory("flux", spec, cache_dir=tmp_path, device=device, offload=offload)
        loader.register("sd:flux", factory)
        return loader.plan("sd:flux"), factory.component_bytes()

    whole, parts = plan(10**9)
    assert whole.offload is None and "fit the cuda budget" in whole.reason
    total, largest = sum(parts.values()), max(parts.values())
    model, _ = plan(total - 1)  # the whole pipeline does not fit; its largest part does
    assert model.offload == "model" and model.nbytes == largest
    assert "exceed the cuda budget" in model.reason and "model CPU offload" in model.reason
    group, _ = plan(largest - 1)  # not even the largest part fits: layer by layer
    assert group.offload == "group" and "group offloading" in group.reason
    assert plan(largest - 1, offload="none")[0].offload is None  # S2I_IMAGE_OFFLOAD=none
    assert plan(10**9, offload="model")[0].offload == "model"  # forced
    on_cpu, _ = plan(total - 1, device="cpu")  # RAM is the last tier: loaded whole
    assert on_cpu.offload is None and "RAM is the last tier" in on_cpu.reason


def test_devtools_build_every_family_from_the_cli(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from speech2image.cli import main
    from speech2image.loras import LoraCatalog

    result = CliRunner().invoke(
        main, ["build-tiny-model", str(tmp_path / "flux"), "--family", "flux", "--lora", "ink"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "flux" / "transformer" / "config.json").exists()
    assert "S2I_LORA_DIR" in result.output
    catalog = LoraCatalog(tmp_path / "flux-loras")
    assert catalog.get("ink") is not None and catalog.get("ink").family == "flux"


def test_a_lora_without_a_stated_family_that_does_not_fit_is_a_400(
    make_app, tiny_models, family_models, lora_dir, tmp_path
) -> None:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "loras"
    folder.mkdir()
    # An SD 1.x LoRA with its metadata stripped: nothing says what it is for until it loads.
    save_file(load_file(lora_dir / "sd-ink.safetensors"), str(folder / "mystery.safetensors"))
    app = family_app(make_app, tiny_models, family_models, folder)
    client = app.test_client()
    assert client.get("/config").json["loras"] == [{"name": "mystery", "family": None}]
    refused = generate(client, prompt="a cat", model="tiny-flux", loras=[{"name": "mystery"}])
    assert refused.status_code == 400, refused.json
    assert "'mystery' has no layer this model has" in refused.json["error"]["message"]
    assert image_files(app) == []
    fine = generate(client, prompt="a cat", model="tiny-flux", seed=1)  # the model still serves
    assert fine.status_code == 200 and fine.json["parameters"]["loras"] == []


def test_the_engine_serves_an_offloaded_pipeline_with_the_same_pixels(
    family_models, lora_dir
) -> None:
    """Group offloading (what a GPU gets for a model beyond its budget), exercised on CPU."""
    from diffusers import AutoPipelineForText2Image

    from speech2image.engines.diffusers_sd import GenerationSpec, LoraWeight, generate, place

    folder = str(family_models["tiny-flux"])
    spec = GenerationSpec(["a kite"], [None], [8], 64, 64, 2, 0.0, "flow_euler")
    ink = (LoraWeight("flux-ink", str(lora_dir / "flux-ink.safetensors"), 1.0),)
    inked = GenerationSpec(["a kite"], [None], [8], 64, 64, 2, 0.0, "flow_euler", loras=ink)
    whole = AutoPipelineForText2Image.from_pretrained(folder)
    spread = place(AutoPipelineForText2Image.from_pretrained(folder), "cpu", "group")
    assert any(hasattr(m, "_diffusers_hook") for m in spread.transformer.modules())
    a, b, c = (
        np.asarray(generate(pipe, s)[0], dtype=np.int16)
        for pipe, s in ((whole, spec), (spread, inked), (spread, spec))
    )
    assert np.abs(a - b).mean() > 1 and np.array_equal(a, c)
