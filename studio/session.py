"""SessionManager: the only code that loads, moves, caches or frees weights.

- Device and dtype are chosen once, on first use (CUDA bf16/fp16, MPS fp16, CPU fp32), overridable.
- Models live in an LRU cache under a memory budget in bytes. When a model must be loaded or moved
  onto the device and the budget would be exceeded, the least recently used models that are not in
  use move to CPU RAM (when an offload budget is set: the default on GPUs) and, past that budget,
  are dropped. The accounted total on each tier never exceeds its budget.
- One run at a time on the device (a lock); each run gets a fresh schedule from the model's config.
- Per-run patches (LoRA set and weights, attention processors, guidance perturbations) are applied
  for the run and restored afterwards, also when the run raises or is interrupted.
- Adapters hot-swap without reloading the base model (`studio/adapters/`): textual-inversion tokens
  are added to the model's tokenizer and embedding table once and persist (they change no prompt
  that does not use them); ControlNets and IP-Adapters are loaded once per model, cached with it,
  moved with it and counted in its bytes under the budget. An IP-Adapter's processors are installed
  only for the runs that ask for it and the UNet's own processors are restored afterwards.
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
from .adapters import AdapterInputs, AdapterRefs, ControlUnit
from .families import Bundle, load_bundle
from .registry import ModelSpec, Policy, fetch_hub_model, resolve
from .safety import check_model_folder, check_weights_file


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
    """Bytes the weights of a diffusers folder (or one safetensors file) will take once loaded in `dtype`.

    Read from the safetensors headers; no tensor is loaded.
    """
    from safetensors import safe_open

    size = torch.tensor([], dtype=dtype).element_size()
    total = 0
    walk = [(os.path.dirname(path), [], [os.path.basename(path)])] if os.path.isfile(path) else os.walk(path)
    for root, _, files in walk:
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
    embeddings: dict = field(default_factory=dict)  # textual-inversion token -> file (persist once added)
    adapters: dict = field(default_factory=dict)  # cache key -> ControlNet / IP-Adapter module, moved and counted with the model

    def modules(self) -> list:
        """Every module that lives with this model: its own and its cached adapters."""
        return list(self.bundle.modules.values()) + list(self.adapters.values())

    def refresh_bytes(self) -> None:
        """Recount the model's bytes (call outside runs: an installed IP-Adapter would count twice)."""
        self.bytes = self.bundle.memory_bytes() + sum(_module_bytes(m) for m in self.adapters.values())


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
        self._job_depth = 0  # inside a job of several runs, Stop ends the whole job
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
        e.adapters.clear()
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
        for m in e.modules():
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
                    for m in e.modules():
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
                 "loras": sorted(e.loras), "embeddings": sorted(e.embeddings), "adapters": sorted(e.adapters)}
                for e in self._entries.values()]

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
        e.refresh_bytes()
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
                e.refresh_bytes()

    # ------------------------------------------------------------------ plug-in adapters
    def _attach(self, e: _Entry, key: str, paths: list[str], build: Callable[[], torch.nn.Module], label: str):
        """Load an adapter module into `e`'s cache (once), on the device, counted in `e`'s bytes under the budget."""
        if key in e.adapters:
            return e.adapters[key]
        self._make_room("device", sum(estimate_bytes(p, self.dtype) for p in paths), keep=e.spec.key)
        module = build()
        if any(p.is_floating_point() and p.dtype != self.dtype for p in module.parameters()):
            module.to(dtype=self.dtype)
        module.to(self.device)
        module.eval()
        module.requires_grad_(False)
        e.adapters[key] = module
        e.refresh_bytes()
        try:
            self._make_room("device", 0, keep=e.spec.key)  # the estimate may have been short
            if self.accounted("device") > self.memory_budget:
                raise OutOfBudget(f"{label} takes {_gib(_module_bytes(module))}: {e.spec.name} with it is over the "
                                  f"budget of {_gib(self.memory_budget)}")
        except OutOfBudget:
            del e.adapters[key]
            e.refresh_bytes()
            raise
        self._note(f"load {label} into {e.spec.name} ({_gib(_module_bytes(module))})")
        self._track_peak()
        return module

    def _check_supported(self, bundle: Bundle, refs: AdapterRefs) -> None:
        asked = [("embeddings", "textual-inversion embeddings", refs.embeddings),
                 ("controlnets", "ControlNets", refs.controlnets), ("ip_adapter", "IP-Adapters", refs.ip_adapter)]
        missing = [label for name, label, given in asked if given and name not in bundle.supported_adapters]
        if missing:
            raise ValueError(f"{bundle.name} ({bundle.family}) does not take {' or '.join(missing)} in this studio")

    def _embedding(self, e: _Entry, ref) -> str:
        """Add a textual-inversion embedding to the model's tokenizer and text encoder (once); returns its token."""
        from .adapters.textual_inversion import add_embedding, read_embedding

        path = os.path.abspath(os.path.expanduser(ref.path))
        self.policy.check_local_path(path)
        check_weights_file(path, allow_pickle=False)
        real = os.path.realpath(path)
        if ref.token is not None and e.embeddings.get(ref.token) == real:
            return ref.token
        token, vectors = read_embedding(path, ref.token)
        if token in e.embeddings:
            if e.embeddings[token] == real:
                return token
            raise ValueError(f"token {token!r} is already taken by the embedding {e.embeddings[token]}; "
                             f"give {os.path.basename(path)} another token")
        tokenizer, text_encoder = e.bundle.token_table()
        add_embedding(tokenizer, text_encoder, token, vectors)
        e.embeddings[token] = real
        e.refresh_bytes()
        self._note(f"add embedding {token} ({vectors.shape[0]} vector{'s' if vectors.shape[0] > 1 else ''}) to {e.spec.name}")
        return token

    def _controlnet(self, e: _Entry, path: str) -> torch.nn.Module:
        """The cached ControlNet of folder `path` for model `e` (loaded on first use)."""
        from .adapters.controlnet import check_fits, load_controlnet

        path = os.path.abspath(os.path.expanduser(path))
        self.policy.check_local_path(path)
        check_model_folder(path, allow_pickle=False)

        def build():
            net = load_controlnet(path, self.dtype)
            check_fits(net, e.bundle.modules["unet"], e.bundle.extra["latent_factor"], path)
            return net

        return self._attach(e, f"controlnet:{os.path.realpath(path)}", [path], build,
                            f"ControlNet {os.path.basename(os.path.normpath(path))}")

    def _ip_adapter(self, e: _Entry, ref):
        """The cached IP-Adapter (processors, projection, image encoder) of `ref` for model `e`."""
        from .adapters import ip_adapter

        file = ip_adapter.weights_file(os.path.abspath(os.path.expanduser(ref.path)))
        encoder = ip_adapter.encoder_folder(ref)
        for p in (file, encoder):
            self.policy.check_local_path(p)
        check_weights_file(file, allow_pickle=False)
        check_model_folder(encoder, allow_pickle=False)

        def build():
            from transformers import CLIPVisionModelWithProjection

            sd = ip_adapter.read_state_dict(file)
            enc = CLIPVisionModelWithProjection.from_pretrained(encoder, dtype=self.dtype, use_safetensors=True)
            return ip_adapter.build(e.bundle.modules["unet"], sd, enc, file)

        return self._attach(e, f"ip_adapter:{os.path.realpath(file)}:{os.path.realpath(encoder)}", [file, encoder],
                            build, f"IP-Adapter {os.path.basename(file)}")

    def unload_adapters(self, bundle: Bundle) -> None:
        """Drop the cached ControlNets and IP-Adapters of a model (none is installed between runs).

        Textual-inversion tokens stay: they are part of the tokenizer now and change no other prompt.
        """
        with self._lock:
            e = self._entry_of(bundle)
            if e.adapters:
                e.adapters.clear()
                e.refresh_bytes()
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()

    def load_adapters(self, bundle: Bundle, refs: AdapterRefs) -> None:
        """Load (or find cached) every adapter `refs` names for `bundle`; nothing is installed."""
        with self._lock:
            e = self._entry_of(bundle)
            self._check_supported(bundle, refs)
            for ref in refs.embeddings:
                self._embedding(e, ref)
            for ref in refs.controlnets:
                self._controlnet(e, ref.model)
            if refs.ip_adapter is not None:
                self._ip_adapter(e, refs.ip_adapter)

    def adapter_inputs(self, bundle: Bundle, refs: AdapterRefs | None) -> AdapterInputs | None:
        """The engine's per-run inputs for `refs`: ControlNet units and the IP-Adapter's image embeddings."""
        if not refs:
            return None
        from .adapters.ip_adapter import encode_image

        self.load_adapters(bundle, refs)
        e = self._entry_of(bundle)
        controls = [ControlUnit(self._controlnet(e, c.model), c.image, c.scale, c.start, c.stop) for c in refs.controlnets]
        embeds = encode_image(self._ip_adapter(e, refs.ip_adapter), refs.ip_adapter.image) if refs.ip_adapter else None
        return AdapterInputs(controls=controls, image_embeds=embeds)

    # ------------------------------------------------------------------ per-run patches
    @contextlib.contextmanager
    def patched(self, bundle: Bundle, loras: list[LoraRef] | None = None, extra: list | None = None,
                adapters: AdapterRefs | None = None):
        """Apply per-run patches and restore the base state afterwards, whatever happens.

        `adapters` are loaded (or found cached) first; of them only an IP-Adapter is a per-run patch
        (its processors, projection and scale), undone when the block ends.
        """
        net = bundle.modules.get("unet") or bundle.modules.get("transformer")
        saved_procs = dict(net.attn_processors) if net is not None and hasattr(net, "attn_processors") else None
        e = self._entry_of(bundle)
        try:
            with contextlib.ExitStack() as stack:
                if adapters:
                    self.load_adapters(bundle, adapters)
                if loras:
                    names = [self._lora_name(e, l.path) for l in loras]
                    _activate(e.lora_layers, names, [float(l.weight) for l in loras])
                if adapters and adapters.ip_adapter is not None:
                    from .adapters.ip_adapter import installed

                    stack.enter_context(installed(net, self._ip_adapter(e, adapters.ip_adapter), adapters.ip_adapter.scale))
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
    def job(self):
        """A job of several runs (a comparison, a sweep, an evaluation): Stop ends all of it."""
        if self._job_depth == 0:
            self._stop.clear()
        self._job_depth += 1
        try:
            yield self
        finally:
            self._job_depth -= 1

    @contextlib.contextmanager
    def run_scope(self, model: str | ModelSpec, loras: list[LoraRef] | None = None, adapters: AdapterRefs | None = None):
        """One run: the device lock, the model held in use, patches applied and restored.

        With `adapters`, they are loaded before the block and an IP-Adapter is installed for it; the
        engine's inputs for them come from `adapter_inputs(bundle, adapters)` inside the block.
        """
        with self._run_lock:
            if self._job_depth == 0:
                self._stop.clear()
            with self.use(model) as bundle, self.patched(bundle, loras, adapters=adapters):
                yield bundle

    def generate(self, req, *, callback: Optional[Callable] = None):
        from .engine import generate

        req.validate()
        for image in [c.get("image") for c in req.controlnets] + [(req.ip_adapter or {}).get("image"),
                                                                   (req.guidance_params or {}).get("image")]:
            if image:
                self.policy.check_input_file(image)
        loras = [LoraRef(**l) if isinstance(l, dict) else l for l in (req.loras or [])]
        adapters = AdapterRefs.from_request(req)  # opens the images: bad files fail before any weights load
        with self.run_scope(req.model, loras, adapters) as bundle:
            return generate(bundle, req, callback=callback, should_stop=self.should_stop,
                            adapters=self.adapter_inputs(bundle, adapters))


def _activate(layers: list, names: list[str], weights: list[float]) -> None:
    """Make `names` (with `weights`) the active LoRAs of every adapted layer; [] restores the base layers.

    With no active adapter a LoRA layer computes its base layer alone, so the output is the base
    model's exactly. Switching touches only the cached layers: no weights move, nothing reloads.
    """
    for m in layers:
        m.set_adapter(names, inference_mode=True)
        for n, w in zip(names, weights):
            m.set_scale(n, w)


def _module_bytes(m: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in m.parameters()) + sum(b.numel() * b.element_size() for b in m.buffers())


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if not v:
        return None
    mult = {"k": 2**10, "m": 2**20, "g": 2**30}.get(v[-1].lower(), 1)
    return int(float(v[:-1] if mult > 1 else v) * mult)
