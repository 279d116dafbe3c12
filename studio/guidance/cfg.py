"""Classifier-free guidance with negative prompts (survey §4.1, §4.2), with optional guidance rescale.

    u_cfg = u_theta(x_t, t, c_neg) + w * (u_theta(x_t, t, c) - u_theta(x_t, t, c_neg))      (§4.1, L455; §4.2, L476-484)

with c_neg the negative prompt (the empty prompt when none is given). Because eps, x0, v and the
flow velocity are affine in the network output for a fixed x_t (L455-467), the same rule holds in
every parameterization; we apply it to x0 and eps together. w = 1 is the plain conditional model
and needs no unconditional branch.

Guidance rescale (phi = `guidance_rescale`; Lin et al., "Common Diffusion Noise Schedules and Sample
Steps are Flawed", §3.4; not in the survey) pulls the guided output's per-sample standard deviation
back toward the conditional one, against the over-exposure of large w:

    g_rescaled = g_cfg * std(g_cond) / std(g_cfg),     g = phi * g_rescaled + (1 - phi) * g_cfg

This is a per-sample scaling, not an affine rule, so its space matters. Like diffusers'
`rescale_noise_cfg` (the guiders' `guidance_rescale`) we apply it to the network's native output:
eps for epsilon models, v for v-prediction, the velocity for flow models, read from
`StepInfo.prediction_type`. When the engine does not give the output type we use eps for diffusion
and the velocity for flow. The rescaled output is converted back to a prediction consistent with x.
phi = 0 (the default, as in diffusers) is plain CFG; Lin et al. suggest phi = 0.7 for their
zero-terminal-SNR v-prediction models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..denoiser import Prediction, from_prediction, to_prediction
from .base import Guidance, StepInfo, check_range, register


def rescale(g_cfg: torch.Tensor, g_cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al.'s rescale of a guided output toward the conditional output's per-sample std."""
    dims = list(range(1, g_cfg.dim()))
    ratio = g_cond.std(dim=dims, keepdim=True) / g_cfg.std(dim=dims, keepdim=True)
    return phi * (g_cfg * ratio) + (1.0 - phi) * g_cfg


def native_space(step: StepInfo) -> str:
    """The network's output parameterization, or eps / the velocity when the engine does not say."""
    if step.prediction_type is not None:
        return step.prediction_type
    return "flow" if step.is_flow else "epsilon"


@register
@dataclass
class CFG(Guidance):
    guidance_rescale: float = 0.0  # phi in [0, 1]; 0 = plain CFG

    name = "cfg"
    space = "any"  # the rescale, when on, acts in the network's native output space

    def validate(self) -> None:
        super().validate()
        check_range(self.name, "guidance_rescale", self.guidance_rescale, 0.0, 1.0)

    def branches(self, step: StepInfo) -> tuple[str, ...]:
        if not self.active(step) or self.guidance_scale == 1.0:
            return ("cond",)
        return ("uncond", "cond")

    def combine(self, preds: dict[str, Prediction], step: StepInfo, x) -> Prediction:
        w, u, c = self.guidance_scale, preds["uncond"], preds["cond"]
        out = Prediction(u.x0 + w * (c.x0 - u.x0), u.eps + w * (c.eps - u.eps))
        if self.guidance_rescale > 0:
            space = native_space(step)
            g = rescale(from_prediction(out, step.alpha, step.sigma, space),
                        from_prediction(c, step.alpha, step.sigma, space), self.guidance_rescale)
            out = to_prediction(g, x, step.alpha, step.sigma, space)
        return out
