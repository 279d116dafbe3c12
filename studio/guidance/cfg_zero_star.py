"""CFG-Zero*: projection-scaled CFG with zero-init (survey §5.3.3, L949-977; Fan et al.).

    s* = <u_cond, u_uncond> / ||u_uncond||^2                      (per sample; least squares, L955-967)
    u  = s* u_uncond + w (u_cond - s* u_uncond)

and zero-init: the first `zero_init_steps` steps use u = 0. With s* = 1 this is CFG.

Space: the velocity. For flow models u = eps - x0 (pred.velocity()); for variance-preserving
diffusion we use the v-prediction output v = alpha eps - sigma x0 (pred.v), the VP analogue. s* is a
least-squares fit, so the space matters. The guided u is converted back with the step's alpha and
sigma into a prediction consistent with x (flow: x0 = x - sigma u, eps = x + alpha u). Zero-init
returns the prediction whose velocity is zero: for flow, with x = (1 - t) x0 + t eps and eps - x0 = 0,
x0 = eps = x, so the state does not move; for VP, v = 0 gives x0 = alpha x, eps = sigma x.
Diffusers' `ClassifierFreeZeroStarGuidance` applies the same rule to the network's native output:
the same result for flow models.

Default zero_init_steps = 1: diffusers' `ClassifierFreeZeroStarGuidance` default (the survey gives no
number). As there, zero-init is counted from the first step of the run and applies also outside the
[start, stop) window. A zero-init step still evaluates the conditional branch (the contract needs
one), although its output is not used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..denoiser import Prediction, to_prediction
from .base import Guidance, StepInfo, register


def velocity_space(step: StepInfo) -> str:
    return "flow" if step.is_flow else "v_prediction"


def optimized_scale(u_cond: torch.Tensor, u_uncond: torch.Tensor) -> torch.Tensor:
    """s* per sample, shaped to broadcast against the inputs."""
    n = u_cond.shape[0]
    c, u = u_cond.reshape(n, -1).double(), u_uncond.reshape(n, -1).double()
    s = (c * u).sum(dim=1) / ((u * u).sum(dim=1) + 1e-8)
    return s.to(u_cond.dtype).reshape(-1, *([1] * (u_cond.dim() - 1)))


@register
@dataclass
class CFGZeroStar(Guidance):
    zero_init_steps: int = 1

    name = "cfg_zero_star"
    space = "velocity (flow) / v (diffusion)"

    def __post_init__(self):
        if isinstance(self.zero_init_steps, float) and self.zero_init_steps.is_integer():
            self.zero_init_steps = int(self.zero_init_steps)  # a slider's 2.0

    def validate(self) -> None:
        super().validate()
        k = self.zero_init_steps
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"{self.name}: zero_init_steps={self.zero_init_steps!r} must be a whole number >= 0")

    def zero_init(self, step: StepInfo) -> bool:
        return step.index < self.zero_init_steps

    def branches(self, step: StepInfo) -> tuple[str, ...]:
        if self.zero_init(step) or not self.active(step) or self.guidance_scale == 1.0:
            return ("cond",)
        return ("uncond", "cond")

    def __call__(self, preds: dict[str, Prediction], step: StepInfo, x: torch.Tensor) -> Prediction:
        if self.zero_init(step):
            return to_prediction(torch.zeros_like(x), x, step.alpha, step.sigma, velocity_space(step))
        return super().__call__(preds, step, x)

    def combine(self, preds: dict[str, Prediction], step: StepInfo, x) -> Prediction:
        space, a, s = velocity_space(step), step.alpha, step.sigma
        u_c = preds["cond"].as_(space, a, s)
        u_u = preds["uncond"].as_(space, a, s)
        scaled = optimized_scale(u_c, u_u) * u_u
        return to_prediction(scaled + self.guidance_scale * (u_c - scaled), x, a, s, space)
