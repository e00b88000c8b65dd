"""The one place that loads, places, leases and evicts models (Whisper and image models).

Models load lazily on first lease and stay resident. Before a load the loader decides where
the model goes (:meth:`ModelLoader.plan`): whole on its device, or, for an image model larger
than the whole GPU budget, spread with diffusers' offloading (one component at a time, or layer
by layer) instead of failing. Residency is bounded by a byte budget
per device and by a model count; when room is needed the least recently used model that no
lease holds goes first. A model whose home is the GPU is first demoted to CPU RAM (promotion
back is much cheaper than a reload) and only unloaded when the CPU budget is full too.
Concurrent leases of a model that is loading wait for that single load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from .errors import ModelUnavailable
from .observe import NULL_OBSERVER, Observer

__all__ = [
    "MODEL_LOAD_LOCK",
    "DeviceOutOfMemory",
    "Lease",
    "ModelFactory",
    "ModelLoader",
    "ModelNotAvailable",
    "Placement",
    "get_model_loader",
    "import_engine",
]

log = logging.getLogger(__name__)


#: Held while any model loads in this process (see ModelLoader._load_lock).
MODEL_LOAD_LOCK = threading.RLock()

# The interpreter's modules are process-wide, so is the lock that guards importing them.
_ENGINE_IMPORT_LOCK = threading.Lock()
_engines_imported: set[str] = set()


def import_engine(name: str, importer: Callable[[], object]) -> None:
    """Run ``importer`` (an engine's heavy imports) once per process, one thread at a time.

    torch, diffusers, transformers and faster-whisper import each other. Two threads importing
    them at once (the first requests after start-up) can each be handed a partially
    initialised module by the interpreter's circular-import handling ("partially initialized
    module 'torch'"). Every engine imports through here, before it touches those libraries.
    """
    if name in _engines_imported:
        return
    with _ENGINE_IMPORT_LOCK:
        if name not in _engines_imported:
            importer()
            _engines_imported.add(name)


class ModelNotAvailable(Exception):
    """A factory cannot produce its model here (not installed, not downloadable)."""


class DeviceOutOfMemory(Exception):
    """A device ran out of memory while loading or running a model."""


class ModelFactory(Protocol):
    """What an engine adapter provides so the loader can manage one model."""

    kind: str

    def home_device(self) -> str:
        """The device the model serves from: 'cpu' or 'cuda'."""

    def describe(self) -> dict[str, Any]:
        """Source and availability, without loading (for `speech2image models` and /status)."""

    def estimate_bytes(self) -> int:
        """Bytes the model will take once loaded (0 when unknown); used to make room first."""

    def load(self, device: str) -> Any:
        """Load and return the model on ``device``; raise ModelNotAvailable or DeviceOutOfMemory."""

    def measure(self, model: Any) -> int | None:
        """Exact resident bytes of ``model``, or None to use the loader's memory readings."""

    def move(self, model: Any, device: str) -> Any | None:
        """Move ``model`` to ``device`` and return it; None when the model cannot move."""

    def release(self, model: Any) -> None:
        """Free the model's memory."""


# Optional, for factories that can offload (image models): ``offload_modes`` (the modes their
# ``load(device, offload=mode)`` takes), ``offload`` (the operator's choice: "auto", "none" or a
# mode), ``component_bytes()`` (bytes per component) and ``status_fields()`` (extra /status).


@dataclasses.dataclass(frozen=True)
class Placement:
    """How a model is placed: whole on its device, or offloaded, and why."""

    device: str
    offload: str | None  # None: whole on the device; "model": a component at a time; "group"
    reason: str
    nbytes: int = 0  # bytes expected on the device (the largest part when offloaded)

    def as_dict(self) -> dict[str, Any]:
        """JSON for /status."""
        return {"device": self.device, "offload": self.offload, "reason": self.reason}


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 10**9 else f"{nbytes / 1e6:.1f} MB"


@dataclasses.dataclass
class _Entry:
    name: str
    model: Any = None
    device: str | None = None  # where it is now; None: not loaded
    nbytes: int = 0
    last_nbytes: int = 0  # measured size of the last load, kept after unloading
    leases: int = 0
    busy: bool = False  # loading or moving: others wait
    last_used: float = 0.0
    loads: int = 0
    load_seconds: float = 0.0
    error: str | None = None
    error_at: float = 0.0  # clock reading of the failed load that set ``error``
    placement: Placement | None = None  # how its last load placed it


@dataclasses.dataclass(frozen=True)
class Lease:
    """A model handed out by :meth:`ModelLoader.lease`; valid inside the ``with`` block."""

    name: str
    model: Any
    device: str
    load_seconds: float  # time this lease spent loading or promoting (0 if resident)
    wait_seconds: float  # time spent waiting for another thread's load


def _memory_reading(device: str) -> int | None:
    """Bytes in use on ``device`` now: process RSS for the CPU, used memory for CUDA."""
    if device == "cuda":
        try:
            import torch

            free, total = torch.cuda.mem_get_info()
        except Exception:  # no torch, or no CUDA: the factory must measure
            return None
        return total - free
    import psutil

    return psutil.Process().memory_info().rss


class ModelLoader:
    """Registry of models with leases, LRU eviction under byte budgets, and idle unload."""

    def __init__(
        self,
        *,
        budgets: dict[str, int],
        max_models: int,
        idle_seconds: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        observer: Observer = NULL_OBSERVER,
    ) -> None:
        self.budgets = dict(budgets)
        self.observer = observer
        self.max_models = max_models
        self.idle_seconds = idle_seconds
        self._clock = clock
        self._factories: dict[str, ModelFactory] = {}
        self._entries: dict[str, _Entry] = {}
        self._cond = threading.Condition()
        # One load at a time in the whole process, whichever loader (or other code, through
        # MODEL_LOAD_LOCK) loads: memory readings stay honest, and accelerate's empty-weights
        # context (patched into torch process-wide while diffusers/transformers load with
        # low_cpu_mem_usage) never leaves another thread's model on the meta device.
        self._load_lock = MODEL_LOAD_LOCK
        self.events: list[tuple[str, str, str]] = []  # (action, name, device), newest last

    # --- registry ------------------------------------------------------------------------
    def register(self, name: str, factory: ModelFactory) -> None:
        """Make ``name`` leasable; nothing loads until the first lease."""
        with self._cond:
            self._factories[name] = factory
            self._entries.setdefault(name, _Entry(name))

    def names(self) -> list[str]:
        """Registered model names, in registration order."""
        return list(self._factories)

    def factory(self, name: str) -> ModelFactory:
        """The factory behind ``name``."""
        try:
            return self._factories[name]
        except KeyError:
            raise ModelUnavailable(f"model {name!r} is not configured") from None

    def init_app(self, app: Any) -> None:
        """Store the loader on a Flask app as ``app.extensions['model_loader']``."""
        app.extensions["model_loader"] = self

    # --- leasing -------------------------------------------------------------------------
    @contextlib.contextmanager
    def lease(self, name: str) -> Iterator[Lease]:
        """Hand out model ``name``, loading or promoting it first; never evicted while held."""
        factory = self.factory(name)
        home = factory.home_device()
        started = self._clock()
        load_seconds = 0.0
        with self._cond:
            entry = self._entries[name]
            while entry.busy:
                self._cond.wait()
            waited = self._clock() - started
            must_load = entry.device != home
            entry.busy = must_load
            entry.leases += 1  # held from now: eviction must skip it
        try:
            if must_load:
                load_seconds = self._bring_home(entry, factory, home)
        except BaseException:
            with self._cond:
                entry.leases -= 1
                entry.busy = False
                self._cond.notify_all()
            raise
        try:
            yield Lease(name, entry.model, home, load_seconds, waited)
        finally:
            with self._cond:
                entry.leases -= 1
                entry.last_used = self._clock()
                self._cond.notify_all()
                over = self._over_budget(home)
            if over:  # a load while everything was held overshot: settle now
                with contextlib.suppress(ModelUnavailable):
                    self._make_room(home, 0, exclude=name)

    def _bring_home(self, entry: _Entry, factory: ModelFactory, home: str) -> float:
        """Load ``entry`` on ``home`` or promote it there; returns the seconds it took."""
        started = time.perf_counter()
        try:
            if entry.device is not None:  # resident on another tier: promote
                self._make_room(home, entry.nbytes, exclude=entry.name)
                moved = self._move(factory, entry, home)
                if moved is None:  # could not move: reload instead
                    self._drop(entry, factory)
                else:
                    self._record("promote", entry.name, home)
            if entry.device is None:
                self._load(entry, factory, home)
        finally:
            with self._cond:
                entry.busy = False
                self._cond.notify_all()
        return time.perf_counter() - started

    def plan(self, name: str) -> Placement:
        """Where model ``name`` goes when it loads now, and why.

        Whole on its home device when it fits the device's budget (other models are evicted to
        make room). A model that can offload and is larger than the whole GPU budget is
        offloaded instead of failing: one component at a time when the largest component fits
        the budget, else layer by layer. S2I_IMAGE_OFFLOAD may force a mode or turn it off.
        """
        factory = self.factory(name)
        device = factory.home_device()
        modes = tuple(getattr(factory, "offload_modes", ()))
        total = factory.estimate_bytes()
        if not modes:
            return Placement(device, None, "loaded whole", total)
        budget = self._budget(device)
        size = f"{_gb(total)} of weights"
        if device != "cuda":
            if budget and total > budget:
                why = (
                    f"{size} exceed the {device} budget of {_gb(budget)}, but RAM is the last tier"
                )
                return Placement(device, None, f"{why}: loaded whole", total)
            return Placement(device, None, f"{size} in RAM: loaded whole", total)
        parts = dict(getattr(factory, "component_bytes", dict)())
        largest = max(parts.values(), default=total)
        choice = getattr(factory, "offload", "auto")
        if choice == "none":
            return Placement(device, None, "offloading is off (S2I_IMAGE_OFFLOAD=none)", total)
        if choice in modes:
            nbytes = largest if choice == "model" else 0
            return Placement(device, choice, f"S2I_IMAGE_OFFLOAD={choice}", nbytes)
        if not budget or not total:
            return Placement(device, None, "size or budget unknown: loaded whole", total)
        if total <= budget:
            return Placement(
                device, None, f"{size} fit the {device} budget of {_gb(budget)}", total
            )
        over = f"{size} exceed the {device} budget of {_gb(budget)}"
        if largest <= budget:
            reason = f"{over}: model CPU offload (its largest component, {_gb(largest)}, fits)"
            return Placement(device, "model", reason, largest)
        reason = f"{over} and so does its largest component ({_gb(largest)}): group offloading"
        return Placement(device, "group", reason, 0)

    def _load(self, entry: _Entry, factory: ModelFactory, device: str) -> None:
        placement = self.plan(entry.name)
        # A model loaded the same way before tells its real size; else trust the estimate.
        same = entry.placement is not None and entry.placement.offload == placement.offload
        estimate = (entry.last_nbytes if same else 0) or placement.nbytes
        # Room-making and loading are serialised: two loads never both count the same room.
        with self._load_lock:
            self._make_room(device, estimate, exclude=entry.name, count_new=True)
            model, nbytes, seconds, placement = self._timed_load(
                factory, device, entry.name, estimate, placement
            )
        with self._cond:
            entry.model, entry.device, entry.nbytes = model, device, nbytes
            entry.placement = placement
            entry.last_nbytes = nbytes
            entry.loads += 1
            entry.load_seconds = seconds
            entry.error = None
            entry.last_used = self._clock()
        log.info(
            "loaded model %s on %s in %.2fs (%.1f MiB)", entry.name, device, seconds, nbytes / 2**20
        )
        self._record("load", entry.name, device)
        self.observer.model_loaded(entry.name, device, seconds, nbytes)
        # The estimate may have been low: settle the budget with the measured size. The model
        # is loaded and will serve this lease; if every other model is held, say so and go on.
        try:
            self._make_room(device, 0, exclude=entry.name)
        except ModelUnavailable:
            log.warning("%s is over its memory budget while every model is in use", device)

    def _timed_load(
        self, factory: ModelFactory, device: str, name: str, estimate: int, placement: Placement
    ) -> tuple[Any, int, float, Placement]:
        before = _memory_reading(device)
        started = time.perf_counter()
        can_offload = "model" in getattr(factory, "offload_modes", ()) and device == "cuda"
        for attempt in (1, 2, 3):
            try:
                if placement.offload:
                    model = factory.load(device, offload=placement.offload)  # type: ignore[call-arg]
                else:
                    model = factory.load(device)
                break
            except DeviceOutOfMemory:
                if attempt == 2 and can_offload and not placement.offload:
                    # It does not fit even alone: serve it offloaded rather than not at all.
                    reason = f"did not fit in {device} memory even alone: model CPU offload"
                    placement = Placement(device, "model", reason, 0)
                    log.warning("%s: %s", name, reason)
                    continue
                if attempt >= 2:
                    raise ModelUnavailable(
                        f"model {name!r} does not fit in {device} memory right now",
                        retry_after=30,
                    ) from None
                log.warning("out of memory loading %s on %s: freeing and retrying", name, device)
                self.free_device(device, exclude=name)
            except ModelNotAvailable as exc:
                with self._cond:
                    self._entries[name].error = str(exc)
                    self._entries[name].error_at = self._clock()
                raise ModelUnavailable(str(exc), details={"model": name}) from exc
        seconds = time.perf_counter() - started
        measured = factory.measure(model)
        if measured is None:
            after = _memory_reading(device)
            delta = after - before if after is not None and before is not None else 0
            measured = max(delta, estimate, 0)
        return model, measured, seconds, placement

    def _move(self, factory: ModelFactory, entry: _Entry, device: str) -> Any | None:
        moved = factory.move(entry.model, device)
        if moved is not None:
            with self._cond:
                entry.model, entry.device = moved, device
        return moved

    # --- eviction ------------------------------------------------------------------------
    def _resident(self, device: str | None = None) -> list[_Entry]:
        return [
            e for e in self._entries.values() if e.device and (device is None or e.device == device)
        ]

    def _make_room(
        self, device: str, incoming: int, *, exclude: str, count_new: bool = False
    ) -> None:
        """Evict LRU unheld models until ``incoming`` bytes fit on ``device`` and count fits."""
        budget = self._budget(device)
        while True:
            with self._cond:
                resident = [e for e in self._resident() if e.name != exclude]
                on_device = [e for e in resident if e.device == device]
                used = sum(e.nbytes for e in on_device)
                if exclude in self._entries and self._entries[exclude].device == device:
                    used += self._entries[exclude].nbytes
                over_bytes = budget > 0 and used + incoming > budget
                count = len(resident) + (1 if count_new or self._is_resident(exclude) else 0)
                over_count = count > self.max_models
                if not (over_bytes or over_count):
                    return
                pool = on_device if over_bytes else resident
                victims = sorted(
                    (e for e in pool if e.leases == 0 and not e.busy), key=lambda e: e.last_used
                )
                if not victims:
                    if over_bytes and not on_device:
                        return  # nothing else is there: let the load try (OOM is handled)
                    if over_bytes:
                        raise ModelUnavailable(
                            f"no room on {device}: every resident model is in use",
                            retry_after=5,
                        )
                    return  # over the count only because all are held: allow temporarily
                victim = victims[0]
                victim.busy = True
            try:
                self._evict(victim, over_count_only=not over_bytes)
            finally:
                with self._cond:
                    victim.busy = False
                    self._cond.notify_all()

    def _budget(self, device: str) -> int:
        """The byte budget of ``device``; an unset CUDA budget becomes 85% of the card."""
        budget = self.budgets.get(device, 0)
        if budget == 0 and device == "cuda":
            import torch

            if torch.cuda.is_available():
                budget = int(torch.cuda.mem_get_info()[1] * 0.85)
                self.budgets["cuda"] = budget
        return budget

    def _over_budget(self, device: str) -> bool:
        """Called with the lock held."""
        budget = self.budgets.get(device, 0)
        over_bytes = budget > 0 and sum(e.nbytes for e in self._resident(device)) > budget
        return over_bytes or len(self._resident()) > self.max_models

    def _is_resident(self, name: str) -> bool:
        entry = self._entries.get(name)
        return bool(entry and entry.device)

    def _evict(self, entry: _Entry, *, over_count_only: bool) -> None:
        """Demote a GPU model to CPU when that fits, else unload it."""
        factory = self._factories[entry.name]
        if entry.device == "cuda" and not over_count_only:
            cpu_budget = self.budgets.get("cpu", 0)
            with self._cond:
                cpu_used = sum(e.nbytes for e in self._resident("cpu"))
            fits = cpu_budget == 0 or cpu_used + entry.nbytes <= cpu_budget
            if fits and self._move(factory, entry, "cpu") is not None:
                log.info("demoted model %s to cpu (%.1f MiB)", entry.name, entry.nbytes / 2**20)
                self._record("demote", entry.name, "cpu")
                self.observer.model_evicted(entry.name, "cuda", "demote")
                return
        self._drop(entry, factory)

    def _drop(self, entry: _Entry, factory: ModelFactory) -> None:
        device, model = entry.device, entry.model
        with self._cond:
            entry.model, entry.device = None, None
        factory.release(model)
        log.info("unloaded model %s from %s (%.1f MiB)", entry.name, device, entry.nbytes / 2**20)
        self._record("unload", entry.name, device or "?")
        self.observer.model_evicted(entry.name, device or "?", "unload")
        entry.nbytes = 0

    def _record(self, action: str, name: str, device: str) -> None:
        with self._cond:
            self.events.append((action, name, device))
            del self.events[:-200]

    # --- maintenance ---------------------------------------------------------------------
    def unload(self, name: str) -> bool:
        """Unload ``name`` now unless a lease holds it; True if it was unloaded."""
        with self._cond:
            entry = self._entries.get(name)
            if not entry or not entry.device or entry.leases or entry.busy:
                return False
            entry.busy = True
        try:
            self._drop(entry, self._factories[name])
        finally:
            with self._cond:
                entry.busy = False
                self._cond.notify_all()
        return True

    def unload_idle(self, max_idle: float | None = None) -> list[str]:
        """Unload every unheld model unused for ``max_idle`` seconds (default: the setting)."""
        limit = self.idle_seconds if max_idle is None else max_idle
        if limit <= 0 and max_idle is None:
            return []
        now = self._clock()
        with self._cond:
            idle = [
                e.name
                for e in self._resident()
                if not e.leases and not e.busy and now - e.last_used >= limit
            ]
        return [name for name in idle if self.unload(name)]

    def start_idle_reaper(self, interval: float | None = None) -> threading.Event:
        """Unload idle models from a daemon thread; set the returned event to stop it."""
        stop = threading.Event()
        period = interval or max(1.0, min(60.0, self.idle_seconds / 4))

        def reap() -> None:
            while not stop.wait(period):
                try:
                    self.unload_idle()
                except Exception:  # keep reaping; the next round may succeed
                    log.exception("idle unload failed")

        threading.Thread(target=reap, name="model-idle-reaper", daemon=True).start()
        return stop

    def free_device(self, device: str, *, exclude: str | None = None) -> None:
        """Evict every unheld model on ``device`` and return cached memory (after an OOM)."""
        with self._cond:
            victims = [
                e
                for e in self._resident(device)
                if e.name != exclude and not e.leases and not e.busy
            ]
        for entry in victims:
            self.unload(entry.name)
        if device == "cuda":
            import torch

            torch.cuda.empty_cache()

    def preload(self, names: list[str]) -> None:
        """Load ``names`` now (start-up preloading)."""
        for name in names:
            with self.lease(name):
                pass

    def is_resident(self, name: str) -> bool:
        """True when ``name`` is loaded on its home device (a lease would not load it)."""
        entry = self._entries.get(name)
        if entry is None or entry.device is None:
            return False
        return entry.device == self._factories[name].home_device()

    def recent_failure(self, name: str, within: float) -> str | None:
        """Why the last load of ``name`` failed, if it did less than ``within`` seconds ago."""
        with self._cond:
            entry = self._entries.get(name)
            if entry is None or entry.device is not None or entry.error is None:
                return None
            return entry.error if self._clock() - entry.error_at < within else None

    def resident_bytes(self, device: str) -> int:
        """Bytes of resident models on ``device``."""
        with self._cond:
            return sum(e.nbytes for e in self._resident(device))

    def status(self) -> list[dict[str, Any]]:
        """One dict per registered model: where it is, its bytes, leases and load history.

        An image model's row also says its family and how its last load placed it
        (``placement``: whole, or offloaded and why).
        """
        extras = {
            name: dict(getattr(factory, "status_fields", dict)())
            for name, factory in list(self._factories.items())
        }
        now = self._clock()
        with self._cond:
            return [
                extras[e.name]
                | {
                    "name": e.name,
                    "kind": self._factories[e.name].kind,
                    "loaded": e.device is not None,
                    "device": e.device,
                    # Resolving "auto" may import torch: only for models already loaded.
                    "home_device": self._factories[e.name].home_device() if e.device else None,
                    "bytes": e.nbytes,
                    "leases": e.leases,
                    "loading": e.busy,
                    "loads": e.loads,
                    "last_load_seconds": round(e.load_seconds, 3),
                    "idle_seconds": round(now - e.last_used, 1) if e.device else None,
                    "last_error": e.error,
                    "offload": e.placement.offload if e.placement else None,
                    "placement": e.placement.as_dict() if e.placement else None,
                }
                for e in self._entries.values()
            ]


def get_model_loader(app: Any) -> ModelLoader:
    """The app's model loader."""
    return app.extensions["model_loader"]
