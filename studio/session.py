"""SessionManager: the only code that loads, moves, caches or frees weights.

One run at a time on the device (a lock); models are cached by spec and loaded on first use.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Optional

import torch

from . import runtime
from .families import Bundle, load_bundle
from .registry import ModelSpec, fetch_hub_model, resolve


class SessionManager:
    def __init__(self, device: str | None = None, dtype: torch.dtype | None = None, max_models: int = 2,
                 allow_pickle: bool = False):
        self._device = device
        self._dtype = dtype
        self.max_models = max_models
        self.allow_pickle = allow_pickle
        self._cache: "OrderedDict[str, Bundle]" = OrderedDict()
        self._lock = threading.RLock()
        self._stop = threading.Event()

    # device and dtype are chosen once, on first use (no import-time side effects)
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

    def get(self, model: str | ModelSpec) -> Bundle:
        spec = model if isinstance(model, ModelSpec) else resolve(model)
        with self._lock:
            if spec.key in self._cache:
                self._cache.move_to_end(spec.key)
                return self._cache[spec.key]
            path = fetch_hub_model(spec.location) if spec.source == "hub" else spec.location
            bundle = load_bundle(path, name=spec.name, family=spec.family, dtype=self.dtype, device=self.device,
                                 allow_pickle=self.allow_pickle)
            bundle.label = spec.label
            self._cache[spec.key] = bundle
            while len(self._cache) > self.max_models:
                self._cache.popitem(last=False)
            return bundle

    def loaded(self) -> list[str]:
        return [b.name for b in self._cache.values()]

    # --- runs
    def stop(self) -> None:
        """Ask the current run to stop at the next step boundary."""
        self._stop.set()

    def should_stop(self) -> bool:
        return self._stop.is_set()

    def generate(self, req, *, callback: Optional[Callable] = None):
        from .engine import generate

        with self._lock:
            self._stop.clear()
            bundle = self.get(req.model)
            return generate(bundle, req, callback=callback, should_stop=self.should_stop)
