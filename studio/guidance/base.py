"""The guidance contract shared by every method (survey Part II; STYLE item 2).

Every method is a `Guidance`: it says which network predictions it needs at each step
(`branches`), combines them in a pure `combine`, acts only inside its [start, stop) window of
steps (outside, it falls back to the plain conditional prediction unless it says otherwise), and
restores any model perturbation it installs (`patch`, a context manager around the run).

Branch names the engine understands:
  "cond"    the prompt's conditioning,
  "uncond"  the negative prompt's conditioning (the empty prompt when there is none).
Later methods add branches that perturb the network (they declare them and install the
perturbation in `patch`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, fields

import torch

from ..denoiser import Prediction


@dataclass
class StepInfo:
    index: int  # step number, 0 = first (noisiest)
    num_steps: int
    t: float  # normalised time in [0, 1], 1 = pure noise
    alpha: float
    sigma: float

    @property
    def fraction(self) -> float:
        """Fraction of the run completed before this step, in [0, 1)."""
        return self.index / max(1, self.num_steps)


@dataclass
class Guidance:
    """Base class; subclasses are dataclasses whose fields are the method's parameters."""

    guidance_scale: float = 5.0
    start: float = 0.0  # window over the steps, as fractions of the run
    stop: float = 1.0

    name = "base"
    space = "any"  # the parameterization the combination rule is written in
    scale_range = (0.0, 30.0)

    def validate(self) -> None:
        lo, hi = self.scale_range
        if not (lo <= self.guidance_scale <= hi):
            raise ValueError(f"{self.name}: guidance scale {self.guidance_scale} is outside [{lo}, {hi}]")
        if not (0.0 <= self.start <= self.stop <= 1.0):
            raise ValueError(f"{self.name}: window start={self.start}, stop={self.stop} must satisfy 0 <= start <= stop <= 1")

    def active(self, step: StepInfo) -> bool:
        return self.start <= step.fraction < self.stop

    def reset(self) -> None:
        """Forget per-run state (momentum buffers, switches); called before every run."""

    def branches(self, step: StepInfo) -> tuple[str, ...]:
        return ("uncond", "cond") if self.active(step) else ("cond",)

    def combine(self, preds: dict[str, Prediction], step: StepInfo, x: torch.Tensor) -> Prediction:
        raise NotImplementedError

    def __call__(self, preds: dict[str, Prediction], step: StepInfo, x: torch.Tensor) -> Prediction:
        if not self.active(step) or set(preds) == {"cond"}:
            return preds["cond"]
        return self.combine(preds, step, x)

    @contextlib.contextmanager
    def patch(self, bundle):
        """Install model perturbations for the run and restore them afterwards (none by default)."""
        yield

    def params(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


GUIDANCE_METHODS: dict[str, type[Guidance]] = {}


def register(cls: type[Guidance]) -> type[Guidance]:
    GUIDANCE_METHODS[cls.name] = cls
    return cls


def get_guidance(name: str, **params) -> Guidance:
    """Build a guidance method by its name (the file name in studio/guidance/) with its parameters."""
    from . import cfg  # noqa: F401  (registers the built-in methods)

    if name not in GUIDANCE_METHODS:
        raise ValueError(f"unknown guidance {name!r}; available: {', '.join(sorted(GUIDANCE_METHODS))}")
    cls = GUIDANCE_METHODS[name]
    known = {f.name for f in fields(cls)}
    unknown = set(params) - known
    if unknown:
        raise ValueError(f"{name}: unknown parameter(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    g = cls(**params)
    g.validate()
    return g
