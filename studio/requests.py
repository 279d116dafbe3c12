"""Typed requests: the same objects drive the CLI, the Gradio API and the tests."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, asdict, fields
from typing import Any


@dataclass
class GenerateRequest:
    prompt: str
    model: str = "shapesworld"
    negative_prompt: str = ""
    sampler: str | None = None  # None: the model's default (ddim for diffusion, flow_euler for flow)
    steps: int = 25
    guidance: str = "cfg"
    guidance_scale: float = 5.0
    guidance_params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    width: int | None = None  # None: the model's native size
    height: int | None = None
    eta: float = 0.0
    num_images: int = 1
    loras: list[dict[str, Any]] = field(default_factory=list)  # [{"path": ..., "weight": ...}]
    # textual-inversion embeddings: [{"path": <safetensors file>, "token": "<name>"}] (token optional for a
    # file whose single key is the token, as diffusers saves them)
    embeddings: list[dict[str, Any]] = field(default_factory=list)
    # ControlNets: [{"model": <ControlNetModel folder>, "image": <control image>, "scale": 1.0, "start": 0.0, "stop": 1.0}]
    controlnets: list[dict[str, Any]] = field(default_factory=list)
    # IP-Adapter: {"path": <file or folder>, "image_encoder": <folder>, "image": <reference image>, "scale": 1.0}
    ip_adapter: dict[str, Any] | None = None

    def validate(self) -> None:
        if not isinstance(self.prompt, str):
            raise ValueError("prompt must be text")
        if self.steps is None or int(self.steps) < 1:
            raise ValueError(f"steps must be at least 1 (got {self.steps})")
        if self.steps > 1000:
            raise ValueError(f"steps must be at most 1000 (got {self.steps})")
        if self.num_images < 1 or self.num_images > 64:
            raise ValueError(f"num_images must be between 1 and 64 (got {self.num_images})")
        if not (0.0 <= self.eta <= 1.0):
            raise ValueError(f"eta must be in [0, 1] (got {self.eta})")
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None and (int(v) <= 0 or int(v) % 8):
                raise ValueError(f"{name} must be a positive multiple of 8 (got {v})")
        for l in self.loras:
            if not isinstance(l, dict) or "path" not in l:
                raise ValueError("each LoRA needs a path (and optionally a weight)")
            if not -4.0 <= float(l.get("weight", 1.0)) <= 4.0:
                raise ValueError(f"LoRA weight {l.get('weight')} is outside [-4, 4]")
        self._validate_adapters()
        if not (0 <= int(self.seed) < 2**63):
            raise ValueError(f"seed must be a non-negative integer below 2^63 (got {self.seed})")

    def _validate_adapters(self) -> None:
        """Shape and ranges of the adapter entries; files are checked when the session loads them."""
        if not isinstance(self.embeddings, list) or not isinstance(self.controlnets, list):
            raise ValueError("embeddings and controlnets must be lists")
        for emb in self.embeddings:
            if not isinstance(emb, dict) or not emb.get("path"):
                raise ValueError("each embedding needs a path (and optionally a token)")
            if emb.get("token") is not None and (not isinstance(emb["token"], str) or not emb["token"].strip()
                                                 or len(emb["token"].split()) != 1):
                raise ValueError(f"embedding token {emb.get('token')!r} must be one word without spaces")
        if len(self.controlnets) > 8:
            raise ValueError(f"at most 8 ControlNets at once (got {len(self.controlnets)})")
        for cn in self.controlnets:
            if not isinstance(cn, dict) or not cn.get("model") or not cn.get("image"):
                raise ValueError("each ControlNet needs a model folder and a control image")
            unknown = set(cn) - {"model", "image", "scale", "start", "stop"}
            if unknown:
                raise ValueError(f"unknown ControlNet field(s): {', '.join(sorted(unknown))}")
            if not 0.0 <= float(cn.get("scale", 1.0)) <= 4.0:
                raise ValueError(f"ControlNet scale {cn.get('scale')} is outside [0, 4]")
            start, stop = float(cn.get("start", 0.0)), float(cn.get("stop", 1.0))
            if not 0.0 <= start < stop <= 1.0:
                raise ValueError(f"ControlNet window start={start}, stop={stop} must satisfy 0 <= start < stop <= 1")
        ip = self.ip_adapter
        if ip is not None:
            if not isinstance(ip, dict) or not ip.get("path") or not ip.get("image"):
                raise ValueError("the IP-Adapter needs a path and a reference image (and optionally an image_encoder)")
            unknown = set(ip) - {"path", "image_encoder", "image", "scale"}
            if unknown:
                raise ValueError(f"unknown IP-Adapter field(s): {', '.join(sorted(unknown))}")
            if not 0.0 <= float(ip.get("scale", 1.0)) <= 4.0:
                raise ValueError(f"IP-Adapter scale {ip.get('scale')} is outside [0, 4]")

    def to_json(self) -> str:
        return json.dumps({"type": "generate", **asdict(self)}, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "GenerateRequest":
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        return cls(**d)


@dataclass
class MethodSpec:
    """One guidance method of a comparison, with its own parameters (guidance_scale included)."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class CompareRequest:
    """Several guidance methods (optionally swept over one parameter) on one prompt and one seed."""

    base: GenerateRequest
    methods: list[MethodSpec]
    sweep_param: str | None = None  # e.g. "guidance_scale"
    sweep_values: list[float] = field(default_factory=list)

    MAX_IMAGES = 64

    def validate(self) -> None:
        self.base.validate()
        if not self.methods:
            raise ValueError("pick at least one guidance method to compare")
        if self.sweep_param and not self.sweep_values:
            raise ValueError(f"give at least one value to sweep {self.sweep_param} over")
        n = len(self.methods) * max(1, len(self.sweep_values))
        if n > self.MAX_IMAGES:
            raise ValueError(f"{n} images requested; at most {self.MAX_IMAGES} per comparison")

    def cells(self) -> list[tuple[MethodSpec, dict[str, Any]]]:
        """(method, full parameters) for every image, methods in rows and sweep values in columns."""
        out = []
        for m in self.methods:
            params = {"guidance_scale": self.base.guidance_scale, **m.params}
            if self.sweep_param:
                for v in self.sweep_values:
                    out.append((m, {**params, self.sweep_param: v}))
            else:
                out.append((m, params))
        return out

    def to_json(self) -> str:
        return json.dumps({"type": "compare", **asdict(self)}, sort_keys=True)
