"""The model loader's policies with real in-memory models (NumPy weights of exact sizes).

The loader is model-agnostic: what it must get right is when to load, what to evict, and what
never to touch. Real Whisper goes through it in the API tests; here the weights are plain
arrays so sizes are exact and the order of events is deterministic.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from speech2image.errors import ModelUnavailable
from speech2image.model_loader import DeviceOutOfMemory, ModelLoader, ModelNotAvailable

MiB = 1024 * 1024


class ArrayModel:
    """A 'model' whose weights are a real array of ``nbytes`` bytes, on a labelled device."""

    def __init__(self, nbytes: int, device: str) -> None:
        self.weights = np.ones(nbytes, dtype=np.uint8)
        self.device = device


class ArrayFactory:
    kind = "test"

    def __init__(
        self, nbytes: int, home: str = "cpu", *, movable: bool = True, estimate: int | None = None
    ) -> None:
        self.nbytes = nbytes
        self.estimate = nbytes if estimate is None else estimate
        self.home = home
        self.movable = movable
        self.loads = 0
        self.moves: list[str] = []
        self.released = 0
        self.fail_with: list[Exception] = []
        self.gate: threading.Event | None = None

    def home_device(self) -> str:
        return self.home

    def describe(self) -> dict[str, Any]:
        return {"available": True}

    def estimate_bytes(self) -> int:
        return self.estimate

    def load(self, device: str) -> ArrayModel:
        if self.gate is not None:
            assert self.gate.wait(10)
        if self.fail_with:
            raise self.fail_with.pop(0)
        self.loads += 1
        return ArrayModel(self.nbytes, device)

    def measure(self, model: ArrayModel) -> int:
        return model.weights.nbytes

    def move(self, model: ArrayModel, device: str) -> ArrayModel | None:
        if not self.movable:
            return None
        self.moves.append(device)
        model.device = device
        return model

    def release(self, model: ArrayModel) -> None:
        self.released += 1


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_loader(cpu: int = 100 * MiB, cuda: int = 100 * MiB, max_models: int = 8, **kw: Any):  # type: ignore[no-untyped-def]
    clock = Clock()
    loader = ModelLoader(
        budgets={"cpu": cpu, "cuda": cuda}, max_models=max_models, clock=clock, **kw
    )
    return loader, clock


def use(loader: ModelLoader, clock: Clock, name: str) -> Any:
    clock.now += 1
    with loader.lease(name) as lease:
        return lease


def resident(loader: ModelLoader) -> dict[str, str]:
    return {row["name"]: row["device"] for row in loader.status() if row["loaded"]}


def test_loads_lazily_once_and_reports_bytes() -> None:
    loader, clock = make_loader()
    factory = ArrayFactory(3 * MiB)
    loader.register("a", factory)
    assert resident(loader) == {}
    first = use(loader, clock, "a")
    second = use(loader, clock, "a")
    assert factory.loads == 1
    assert first.model is second.model
    assert first.load_seconds > 0 and second.load_seconds == 0
    (row,) = loader.status()
    assert row["bytes"] == 3 * MiB and row["device"] == "cpu" and row["loads"] == 1


def test_evicts_least_recently_used_under_byte_budget() -> None:
    loader, clock = make_loader(cpu=5 * MiB)
    for name in "abc":
        loader.register(name, ArrayFactory(2 * MiB))
    use(loader, clock, "a")
    use(loader, clock, "b")
    use(loader, clock, "a")  # b is now the least recently used
    use(loader, clock, "c")
    assert resident(loader) == {"a": "cpu", "c": "cpu"}
    assert ("unload", "b", "cpu") in loader.events
    assert loader.resident_bytes("cpu") <= 5 * MiB


def test_evicts_under_model_count() -> None:
    loader, clock = make_loader(max_models=2)
    for name in "abc":
        loader.register(name, ArrayFactory(MiB))
    use(loader, clock, "a")
    use(loader, clock, "b")
    use(loader, clock, "c")
    assert set(resident(loader)) == {"b", "c"}


def test_leased_model_is_never_evicted() -> None:
    loader, clock = make_loader(cpu=5 * MiB)
    for name in "abc":
        loader.register(name, ArrayFactory(2 * MiB))
    with loader.lease("a") as held:
        use(loader, clock, "b")
        use(loader, clock, "c")  # a is the oldest but held: b goes
        assert "a" in resident(loader)
        assert held.model.weights.sum() == 2 * MiB  # still intact while held
    assert set(resident(loader)) == {"a", "c"}


def test_no_room_when_every_resident_model_is_held() -> None:
    loader, clock = make_loader(cpu=3 * MiB)
    loader.register("a", ArrayFactory(2 * MiB))
    loader.register("b", ArrayFactory(2 * MiB))
    with loader.lease("a"), pytest.raises(ModelUnavailable) as caught:
        use(loader, clock, "b")
    assert caught.value.code == 503 and caught.value.retry_after
    use(loader, clock, "b")  # once a is released, b loads (evicting a)
    assert set(resident(loader)) == {"b"}


def test_concurrent_leases_share_one_load() -> None:
    loader, _ = make_loader()
    factory = ArrayFactory(MiB)
    factory.gate = threading.Event()
    loader.register("a", factory)
    models: list[Any] = []

    def lease() -> None:
        with loader.lease("a") as held:
            models.append(held.model)

    threads = [threading.Thread(target=lease) for _ in range(4)]
    for thread in threads:
        thread.start()
    factory.gate.set()
    for thread in threads:
        thread.join(10)
    assert factory.loads == 1
    assert len(models) == 4 and all(m is models[0] for m in models)


def test_idle_models_are_unloaded_but_not_held_ones() -> None:
    loader, clock = make_loader(idle_seconds=60)
    loader.register("a", ArrayFactory(MiB))
    loader.register("b", ArrayFactory(MiB))
    use(loader, clock, "a")
    use(loader, clock, "b")
    clock.now += 30
    assert loader.unload_idle() == []
    with loader.lease("b"):
        clock.now += 61
        assert loader.unload_idle() == ["a"]
    assert set(resident(loader)) == {"b"}


def test_idle_reaper_thread_unloads(monkeypatch) -> None:
    loader = ModelLoader(budgets={"cpu": 0}, max_models=4, idle_seconds=0.05)
    loader.register("a", ArrayFactory(MiB))
    with loader.lease("a"):
        pass
    stop = loader.start_idle_reaper(interval=0.02)
    try:
        for _ in range(200):
            if not resident(loader):
                break
            threading.Event().wait(0.01)
        assert resident(loader) == {}
    finally:
        stop.set()


def test_gpu_models_are_demoted_to_cpu_then_promoted() -> None:
    loader, clock = make_loader(cpu=10 * MiB, cuda=5 * MiB)
    factories = {name: ArrayFactory(2 * MiB, home="cuda") for name in "abc"}
    for name, factory in factories.items():
        loader.register(name, factory)
    use(loader, clock, "a")
    use(loader, clock, "b")
    use(loader, clock, "c")  # no room on cuda: a (LRU) moves to RAM instead of unloading
    assert resident(loader) == {"a": "cpu", "b": "cuda", "c": "cuda"}
    lease = use(loader, clock, "a")  # promotion back: b (LRU on cuda) is demoted
    assert lease.device == "cuda" and lease.model.device == "cuda"
    assert resident(loader) == {"a": "cuda", "b": "cpu", "c": "cuda"}
    assert factories["a"].loads == 1  # never reloaded
    assert factories["a"].moves == ["cpu", "cuda"]
    assert ("promote", "a", "cuda") in loader.events


def test_demotion_falls_back_to_unload_when_ram_is_full() -> None:
    loader, clock = make_loader(cpu=1 * MiB, cuda=3 * MiB)
    loader.register("a", ArrayFactory(2 * MiB, home="cuda"))
    loader.register("b", ArrayFactory(2 * MiB, home="cuda"))
    use(loader, clock, "a")
    use(loader, clock, "b")
    assert resident(loader) == {"b": "cuda"}


def test_out_of_memory_frees_others_and_retries_once() -> None:
    loader, clock = make_loader()
    loader.register("a", ArrayFactory(MiB, home="cpu"))
    big = ArrayFactory(MiB, home="cpu")
    big.fail_with = [DeviceOutOfMemory("CUDA out of memory")]
    loader.register("big", big)
    use(loader, clock, "a")
    use(loader, clock, "big")  # first attempt OOMs; a is freed; the retry succeeds
    assert set(resident(loader)) == {"big"}
    again = ArrayFactory(MiB)
    again.fail_with = [DeviceOutOfMemory("oom"), DeviceOutOfMemory("oom")]
    loader.register("hopeless", again)
    with pytest.raises(ModelUnavailable) as caught:
        use(loader, clock, "hopeless")
    assert caught.value.code == 503 and caught.value.retry_after == 30
    assert "hopeless" not in resident(loader)
    use(loader, clock, "a")  # the loader keeps serving


def test_unavailable_model_is_503_and_others_still_serve() -> None:
    loader, clock = make_loader()
    missing = ArrayFactory(MiB)
    missing.fail_with = [ModelNotAvailable("weights for 'x' are not installed")]
    loader.register("x", missing)
    loader.register("a", ArrayFactory(MiB))
    with pytest.raises(ModelUnavailable, match="not installed"):
        use(loader, clock, "x")
    assert use(loader, clock, "a").model is not None
    row = next(r for r in loader.status() if r["name"] == "x")
    assert row["last_error"] == "weights for 'x' are not installed"
    assert not row["loading"] and row["leases"] == 0


def test_low_estimate_never_turns_a_successful_load_into_503() -> None:
    loader, clock = make_loader(cpu=5 * MiB)
    loader.register("a", ArrayFactory(3 * MiB))
    loader.register("b", ArrayFactory(3 * MiB, estimate=MiB))  # measures 3x its estimate
    with loader.lease("a"):
        lease = use(loader, clock, "b")  # over budget only because a is held: still served
        assert lease.model is not None
        assert loader.resident_bytes("cpu") == 6 * MiB
    assert loader.resident_bytes("cpu") <= 5 * MiB  # settled once the lease was released
    assert resident(loader) == {"a": "cpu"}


class OffloadableFactory(ArrayFactory):
    """An image-model-like factory: components of known sizes, loadable offloaded."""

    offload_modes = ("model", "group")

    def __init__(self, parts: dict[str, int], *, offload: str = "auto") -> None:
        super().__init__(sum(parts.values()), home="cuda")
        self.parts = parts
        self.offload = offload
        self.placements: list[str | None] = []

    def component_bytes(self) -> dict[str, int]:
        return dict(self.parts)

    def load(self, device: str, offload: str | None = None) -> ArrayModel:
        self.placements.append(offload)
        model = super().load(device)
        if offload == "model":  # one component on the device at a time
            model.weights = np.ones(max(self.parts.values()), dtype=np.uint8)
        return model


def test_a_model_larger_than_the_gpu_budget_is_offloaded_not_refused() -> None:
    loader, clock = make_loader(cuda=50 * MiB)
    big = OffloadableFactory({"transformer": 40 * MiB, "text_encoder_2": 30 * MiB})
    loader.register("flux", big)
    assert use(loader, clock, "flux").model is not None
    assert big.placements == ["model"]
    row = next(r for r in loader.status() if r["name"] == "flux")
    assert row["offload"] == "model" and row["device"] == "cuda"
    assert "exceed the cuda budget" in row["placement"]["reason"]
    assert row["bytes"] == 40 * MiB  # what it holds on the GPU: its largest component
    use(loader, clock, "flux")
    assert big.placements == ["model"]  # resident: not loaded again

    forced = OffloadableFactory({"unet": 5 * MiB}, offload="group")
    loader.register("xl", forced)
    use(loader, clock, "xl")
    assert forced.placements == ["group"]  # S2I_IMAGE_OFFLOAD=group


def test_a_model_that_does_not_fit_even_alone_is_offloaded_after_freeing() -> None:
    loader, clock = make_loader(cuda=100 * MiB)
    factory = OffloadableFactory({"unet": 10 * MiB, "text_encoder": 5 * MiB})
    factory.fail_with = [DeviceOutOfMemory("oom"), DeviceOutOfMemory("oom")]
    loader.register("xl", factory)
    use(loader, clock, "xl")
    assert factory.placements == [None, None, "model"]
    row = next(r for r in loader.status() if r["name"] == "xl")
    assert row["offload"] == "model" and "even alone" in row["placement"]["reason"]
