"""CFG++: interpolate the denoised estimate, renoise with the unconditional noise.

Survey §5.1.2, L624-645 (Chung et al.):

    x0_lambda = (1 - lambda) x0_uncond + lambda x0_cond,      lambda in [0, 1] (no extrapolation)
    x_next    = alpha' x0_lambda + sigma' eps_uncond          (DDIM step, L642)

"conditional in the denoise term, unconditional in the renoise term". `guidance_scale` is lambda,
so its range is [0, 1].

Space: x0 for the interpolation and eps for the renoising (L642). Prediction(x0_lambda, eps_uncond)
is not consistent with the state (alpha x0_lambda + sigma eps_uncond = x + alpha lambda (x0_cond - x0_uncond)),
so a sampler that reads the velocity eps - x0 (flow Euler) would not take the CFG++ step. When the
engine gives the next noise level (StepInfo.alpha_next, sigma_next) we therefore return the prediction
that is consistent with x and whose first-order step lands exactly on the CFG++ point
alpha' x0_lambda + sigma' eps_uncond: exact for DDIM (eta = 0), Euler and flow Euler. Without the next
level we return Prediction(x0_lambda, eps_uncond), which DDIM and Euler (x' = alpha' x0 + sigma' eps)
still step exactly. Higher-order and ancestral samplers see a CFG++-like prediction, not the paper's
update.

Default lambda = 0.6: the CFG++ authors' text-to-image example (their README runs `--cfg_guidance 0.6`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..denoiser import Prediction
from .base import Guidance, StepInfo, prediction_for_step, register


@register
@dataclass
class CFGPlusPlus(Guidance):
    guidance_scale: float = 0.6  # lambda

    name = "cfg_pp"
    space = "x0 + eps"
    scale_range = (0.0, 1.0)

    def branches(self, step: StepInfo) -> tuple[str, ...]:
        return ("uncond", "cond") if self.active(step) else ("cond",)

    def combine(self, preds: dict[str, Prediction], step: StepInfo, x) -> Prediction:
        lam, u, c = self.guidance_scale, preds["uncond"], preds["cond"]
        x0 = u.x0 + lam * (c.x0 - u.x0)
        if step.alpha_next is None or step.sigma_next is None:
            return Prediction(x0, u.eps)
        return prediction_for_step(x, step.alpha_next * x0 + step.sigma_next * u.eps, step)
