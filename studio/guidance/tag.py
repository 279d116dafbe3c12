"""TAG, Tangential Amplifying Guidance (survey §5.1.3 (2), L697-709; Cho et al.).

TAG reweights the solver step, not the predictions. With the base step D = x_next_base - x_t and the
unit direction of the current state,

    x^ = x_t / ||x_t||,     P_par = x^ x^T,     P_perp = I - P_par
    D_TAG = lambda_par P_par D + lambda_perp P_perp D,      x_next = x_t + D_TAG

keeping the radial part (the schedule's radius) and amplifying the tangential part (lambda_perp > 1).
Norms and projections are per sample over all other dimensions.

Base step: CFG with `guidance_scale` (w = 1: the conditional prediction alone, one branch), stepped
to the next noise level as DDIM (eta = 0) and Euler do, x_next_base = alpha' x0 + sigma' eps.

In the guidance contract the method returns the prediction that is consistent with the state
(alpha x0 + sigma eps = x) and whose first-order step is x_t + D_TAG, so DDIM (eta = 0), Euler and flow
Euler take exactly the TAG step. Other samplers (DDIM with eta > 0, Euler ancestral, DPM-Solver++(2M)'s
second-order correction, Heun's corrector) see the TAG prediction, not the TAG step. The method needs
the next noise level, StepInfo.alpha_next and sigma_next, which the engine fills.

Space: the state x (the solver increment), per the survey.

Defaults: radial_scale = 1 (the survey: "keeping the radial component nearly unchanged");
tangential_scale = 1.15 (ours: the survey only asks for lambda_perp > 1; public ports of the method
expose values between 1 and 1.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..denoiser import Prediction
from .base import Guidance, StepInfo, check_range, prediction_for_step, register


def amplify_tangential(delta: torch.Tensor, x: torch.Tensor, radial: float, tangential: float) -> torch.Tensor:
    """radial * P_par delta + tangential * P_perp delta, with P_par the projector on x / ||x||, per sample."""
    b = x.shape[0]
    xf, df = x.reshape(b, -1).double(), delta.reshape(b, -1).double()
    unit = xf / xf.norm(dim=1, keepdim=True).clamp_min(1e-12)
    par = (df * unit).sum(dim=1, keepdim=True) * unit
    return (radial * par + tangential * (df - par)).reshape(delta.shape).to(delta.dtype)


@register
@dataclass
class TAG(Guidance):
    tangential_scale: float = 1.15  # lambda_perp
    radial_scale: float = 1.0  # lambda_par

    name = "tag"
    space = "x (solver step)"

    def validate(self) -> None:
        super().validate()
        check_range(self.name, "tangential_scale", self.tangential_scale, 0.0, 5.0)
        check_range(self.name, "radial_scale", self.radial_scale, 0.0, 5.0)

    def branches(self, step: StepInfo) -> tuple[str, ...]:
        if not self.active(step) or self.guidance_scale == 1.0:
            return ("cond",)
        return ("uncond", "cond")

    def __call__(self, preds: dict[str, Prediction], step: StepInfo, x: torch.Tensor) -> Prediction:
        if not self.active(step):
            return preds["cond"]
        return self.combine(preds, step, x)

    def combine(self, preds: dict[str, Prediction], step: StepInfo, x) -> Prediction:
        if step.alpha_next is None or step.sigma_next is None:
            raise ValueError("tag: this method steps to the next noise level and needs StepInfo.alpha_next "
                             "and sigma_next, which the engine fills")
        c = preds["cond"]
        if "uncond" in preds:
            w, u = self.guidance_scale, preds["uncond"]
            base = Prediction(u.x0 + w * (c.x0 - u.x0), u.eps + w * (c.eps - u.eps))
        else:
            base = c
        delta = step.alpha_next * base.x0 + step.sigma_next * base.eps - x
        return prediction_for_step(x, x + amplify_tangential(delta, x, self.radial_scale, self.tangential_scale), step)
