"""Classifier-free guidance with negative prompts (survey §4.1, §4.2).

    u_cfg = u_theta(x_t, t, c_neg) + w * (u_theta(x_t, t, c) - u_theta(x_t, t, c_neg))      (§4.1, L455; §4.2, L476-484)

with c_neg the negative prompt (the empty prompt when none is given). Because eps, x0, v and the
flow velocity are affine in the network output for a fixed x_t (L455-467), the same rule holds in
every parameterization; we apply it to x0 and eps together. w = 1 is the plain conditional model
and needs no unconditional branch.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..denoiser import Prediction
from .base import Guidance, StepInfo, register


@register
@dataclass
class CFG(Guidance):
    name = "cfg"
    space = "any"

    def branches(self, step: StepInfo) -> tuple[str, ...]:
        if not self.active(step) or self.guidance_scale == 1.0:
            return ("cond",)
        return ("uncond", "cond")

    def combine(self, preds: dict[str, Prediction], step: StepInfo, x) -> Prediction:
        w, u, c = self.guidance_scale, preds["uncond"], preds["cond"]
        return Prediction(u.x0 + w * (c.x0 - u.x0), u.eps + w * (c.eps - u.eps))
