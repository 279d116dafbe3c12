"""SessionManager: the only code that loads, moves, caches or frees weights.

- Device and dtype are chosen once, on first use (CUDA bf16/fp16, MPS fp16, CPU fp32), overridable.
- Models live in an LRU cache under a memory budget in bytes. When a model must be loaded or moved
  onto the device and the budget would be exceeded, the least recently used models that are not in
  use move to CPU RAM (when an offload budget is set: the default on GPUs) and, past that budget,
  are dropped. The accounted total on each tier never exceeds its budget.
- One run at a time on the device (a lock); each run gets a fresh schedule from the model's config.
- Per-run patches (LoRA set and weights, attention processors, guidance perturbations) are applied
  for the run and restored afterwards, also when the run raises or is interrupted.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import runtime
from .families import Bundle, load_bundle
from .registry import ModelSpec, Policy, fetch_hub_model, resolve
from .safety import check_weights_file


class OutOfBudget(MemoryError):
    """A model cannot fit the memory budget even after evicting everything else."""


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def default_budget(device: str) -> int:
    """A sensible share of the device's memory: 85% of free GPU memory, or half of the RAM."""
    if device.startswith("cuda") and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return int(free * 0.85)
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return int(pages * size * 0.5)
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def estimate_bytes(path: str, dtype: torch.dtype) -> int:
    """Bytes the weights of a diffusers folder will take once loaded in `dtype` (read from safetensors headers)."""
    from safetensors import safe_open

    size = torch.tensor([], dtype=dtype).element_size()
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            if f.endswith(".safetensors"):
                with safe_open(os.path.join(root, f), framework="pt") as sf:
                    for k in sf.keys():
                        shape = sf.get_slice(k).get_shape()
                        n = 1
                        for d in shape:
                            n *= d
                        total += n * size
    return total


@dataclass
class LoraRef:
    """A LoRA file (diffusers format, safetensors) and its weight for one run."""

    path: str
    weight: float = 1.0


@dataclass
class _Entry:
    spec: ModelSpec
    bundle: Bundle
    bytes: int
    where: str  # "device" | "offload"
    in_use: int = 0
    loras: dict = field(default_factory=dict)  # adapter name -> file path
    lora_layers: list = field(default_factory=list)  # the network's LoRA-wrapped layers (cached)


class SessionManager:
    def __init__(self, device: str | None = None, dtype: torch.dtype | None = None, *,
                 memory_budget: int | None = None, offload_budget: int | None = None,
                 policy: Policy | None = None, allow_pickle: bool | None = None, max_models: int | None = None):
        self._device = device
        self._dtype = dtype
        self._budget = memory_budget if memory_budget is not None else _env_int("STUDIO_MEMORY_BUDGET")
        self._offload_budget = offload_budget if offload_budget is not None else _env_int("STUDIO_OFFLOAD_BUDGET")
        self.policy = policy or Policy.from_env()
        if allow_pickle is not None:
            self.policy.allow_pickle = allow_pickle
        self.max_models = max_models  # optional count limit on top of the byte budget
        self._entries: "OrderedDict[str, _Entry]" = OrderedDict()  # LRU order: first = least recently used
        self._lock = threading.RLock()  # guards the cache
        self._run_lock = threading.Lock()  # one run at a time on the device
        self._stop = threading.Event()
        self.peak_accounted = {"device": 0, "offload": 0}
        self.events: list[str] = []  # load / offload / drop log, newest last

    # ------------------------------------------------------------------ settings
    @property
    def device(self) -> str:
        if self._device is None:
            self._device = runtime.pick_device()
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        if self._dtype is None:
            self._dtype = runtime.pick_dtype(self.device)
        return self._dtype

    @property
    def memory_budget(self) -> int:
        if self._budget is None:
            self._budget = default_budget(self.device)
        return self._budget

    @property
    def offload_budget(self) -> int:
        """CPU RAM for models moved off the device; 0 on a CPU device (offloading would free nothing)."""
        if self._offload_budget is None:
            self._offload_budget = 0 if self.device == "cpu" else default_budget("cpu")
        return self._offload_budget

    # ------------------------------------------------------------------ accounting
    def accounted(self, where: str = "device") -> int:
        return sum(e.bytes for e in self._entries.values() if e.where == where)

    def _note(self, msg: str) -> None:
        self.events.append(msg)
        del self.events[:-200]

    def _track_peak(self) -> None:
        for w in ("device", "offload"):
            self.peak_accounted[w] = max(self.peak_accounted[w], self.accounted(w))

    def _drop(self, key: str) -> None:
        e = self._entries.pop(key)
        self._note(f"drop {e.spec.name}")
        e.bundle.modules.clear()
        del e
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _offload(self, key: str) -> None:
        e = self._entries[key]
        if e.bytes > self.offload_budget:
            self._drop(key)
            return
        self._make_room("offload", e.bytes, keep=key)
        for m in e.bundle.modules.values():
            m.to("cpu")
        e.where = "offload"
        self._note(f"offload {e.spec.name}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _make_room(self, where: str, need: int, keep: str | None = None) -> None:
        budget = self.memory_budget if where == "device" else self.offload_budget
        if need > budget:
            raise OutOfBudget(f"the model needs {_gib(need)} but the {where} memory budget is {_gib(budget)}")
        for key in list(self._entries):
            if self.accounted(where) + need <= budget:
                return
            e = self._entries[key]
            if key == keep or e.where != where or e.in_use:
                continue
            if where == "device" and self.offload_budget > 0:
                self._offload(key)
            else:
                self._drop(key)
        if self.accounted(where) + need > budget:
            busy = [e.spec.name for e in self._entries.values() if e.in_use and e.where == where]
            raise OutOfBudget(f"cannot fit {_gib(need)} in the {where} budget of {_gib(budget)}: in use by a run: {busy}")

    def _count_limit(self, keep: str) -> None:
        if self.max_models is None:
            return
        for key in list(self._entries):
            if len(self._entries) <= self.max_models:
                break
            if key != keep and not self._entries[key].in_use:
                self._drop(key)

    # ------------------------------------------------------------------ models
    def resolve(self, model: str | ModelSpec) -> ModelSpec:
        spec = model if isinstance(model, ModelSpec) else resolve(model)
        self.policy.check(spec)
        return spec

    def get(self, model: str | ModelSpec) -> Bundle:
        """The loaded bundle of `model`, on the device; loads, moves or evicts as needed."""
        spec = self.resolve(model)
        with self._lock:
            key = spec.key
            if key in self._entries:
                e = self._entries[key]
                self._entries.move_to_end(key)
                if e.where == "offload":
                    self._make_room("device", e.bytes, keep=key)
                    for m in e.bundle.modules.values():
                        m.to(self.device)
                    e.where = "device"
                    self._note(f"reload {spec.name} from CPU RAM")
                self._track_peak()
                return e.bundle
            path = fetch_hub_model(spec.location) if spec.source == "hub" else spec.location
            estimate = estimate_bytes(path, self.dtype) if os.path.isdir(path) else 0
            self._make_room("device", estimate)
            bundle = load_bundle(path, name=spec.name, family=spec.family, dtype=self.dtype, device=self.device,
                                 allow_pickle=self.policy.allow_pickle)
            bundle.label = spec.label
            e = _Entry(spec, bundle, bundle.memory_bytes(), "device")
            self._entries[key] = e
            self._note(f"load {spec.name} ({_gib(e.bytes)})")
            try:
                self._make_room("device", 0, keep=key)  # the estimate may have been short
                if self.accounted("device") > self.memory_budget:
                    raise OutOfBudget(f"{spec.name} takes {_gib(e.bytes)}, over the budget of {_gib(self.memory_budget)}")
            except OutOfBudget:
                self._drop(key)
                raise
            self._count_limit(keep=key)
            self._track_peak()
            return bundle

    def loaded(self) -> list[str]:
        return [e.spec.name for e in self._entries.values()]

    def status(self) -> list[dict]:
        return [{"name": e.spec.name, "where": e.where, "bytes": e.bytes, "in_use": bool(e.in_use),
                 "loras": sorted(e.loras)} for e in self._entries.values()]

    def unload(self, model: str | ModelSpec) -> None:
        spec = self.resolve(model)
        with self._lock:
            if spec.key in self._entries and not self._entries[spec.key].in_use:
                self._drop(spec.key)

    @contextlib.contextmanager
    def use(self, model: str | ModelSpec):
        """Hold a model for a run: it cannot be evicted until the block ends."""
        with self._lock:
            bundle = self.get(model)
            e = self._entries[self.resolve(model).key]
            e.in_use += 1
        try:
            yield bundle
        finally:
            with self._lock:
                e.in_use -= 1

    # ------------------------------------------------------------------ adapters
    def _entry_of(self, bundle: Bundle) -> _Entry:
        for e in self._entries.values():
            if e.bundle is bundle:
                return e
        raise KeyError(f"{bundle.name} is not loaded in this session")

    def _lora_name(self, e: _Entry, path: str) -> str:
        path = os.path.realpath(path)
        for name, p in e.loras.items():
            if p == path:
                return name
        name = f"lora{len(e.loras)}_{os.path.splitext(os.path.basename(path))[0]}"[:60].replace(".", "_")
        file = path if os.path.isfile(path) else os.path.join(path, "pytorch_lora_weights.safetensors")
        self.policy.check_local_path(path)
        check_weights_file(file, allow_pickle=False)
        from safetensors.torch import load_file

        sd = load_file(file)
        unet = e.bundle.modules["unet"] if "unet" in e.bundle.modules else e.bundle.modules["transformer"]
        prefix = "unet" if any(k.startswith("unet.") for k in sd) else ("transformer" if any(k.startswith("transformer.") for k in sd) else None)
        if prefix is None:
            raise ValueError(f"{file}: no UNet/transformer LoRA weights found (expected keys starting with 'unet.' or 'transformer.')")
        unet.load_lora_adapter(sd, prefix=prefix, adapter_name=name)
        unet.to(self.device)
        from peft.tuners.tuners_utils import BaseTunerLayer

        e.lora_layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
        _activate(e.lora_layers, [], [])  # base state: loaded but inactive
        e.loras[name] = path
        e.bytes = e.bundle.memory_bytes()
        self._note(f"load LoRA {name} into {e.spec.name}")
        return name

    def unload_loras(self, bundle: Bundle) -> None:
        """Remove every LoRA from a model (the base weights were never changed)."""
        with self._lock:
            e = self._entry_of(bundle)
            if e.loras:
                unet = bundle.modules.get("unet") or bundle.modules.get("transformer")
                unet.delete_adapters(list(e.loras))
                e.loras.clear()
                e.lora_layers = []
                e.bytes = bundle.memory_bytes()

    @contextlib.contextmanager
    def patched(self, bundle: Bundle, loras: list[LoraRef] | None = None, extra: list | None = None):
        """Apply per-run patches and restore the base state afterwards, whatever happens."""
        net = bundle.modules.get("unet") or bundle.modules.get("transformer")
        saved_procs = dict(net.attn_processors) if net is not None and hasattr(net, "attn_processors") else None
        e = self._entry_of(bundle)
        try:
            with contextlib.ExitStack() as stack:
                if loras:
                    names = [self._lora_name(e, l.path) for l in loras]
                    _activate(e.lora_layers, names, [float(l.weight) for l in loras])
                for cm in extra or []:
                    stack.enter_context(cm)
                yield bundle
        finally:
            if e.lora_layers:
                _activate(e.lora_layers, [], [])
            if saved_procs is not None and dict(net.attn_processors) != saved_procs:
                net.set_attn_processor(saved_procs)

    # ------------------------------------------------------------------ runs
    def stop(self) -> None:
        """Ask the current run to stop at the next step boundary."""
        self._stop.set()

    def should_stop(self) -> bool:
        return self._stop.is_set()

    @contextlib.contextmanager
    def run_scope(self, model: str | ModelSpec, loras: list[LoraRef] | None = None):
        """One run: the device lock, the model held in use, patches applied and restored."""
        with self._run_lock:
            self._stop.clear()
            with self.use(model) as bundle, self.patched(bundle, loras):
                yield bundle

    def generate(self, req, *, callback: Optional[Callable] = None):
        from .engine import generate

        loras = [LoraRef(**l) if isinstance(l, dict) else l for l in (req.loras or [])]
        with self.run_scope(req.model, loras) as bundle:
            return generate(bundle, req, callback=callback, should_stop=self.should_stop)


def _activate(layers: list, names: list[str], weights: list[float]) -> None:
    """Make `names` (with `weights`) the active LoRAs of every adapted layer; [] restores the base layers.

    With no active adapter a LoRA layer computes its base layer alone, so the output is the base
    model's exactly. Switching touches only the cached layers: no weights move, nothing reloads.
    """
    for m in layers:
        m.set_adapter(names, inference_mode=True)
        for n, w in zip(names, weights):
            m.set_scale(n, w)


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if not v:
        return None
    mult = {"k": 2**10, "m": 2**20, "g": 2**30}.get(v[-1].lower(), 1)
    return int(float(v[:-1] if mult > 1 else v) * mult)
