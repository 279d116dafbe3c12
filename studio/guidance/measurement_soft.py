"""Measurement guidance, soft data consistency (survey §6.2-§6.4, L997-1035; the gradient template).

    E_meas(x_t, t; y) = ||A x0_hat(x_t, t) - y||^2                          (§6.2, L1020; §6.3)
    u_ctrl = u_base - lambda(t) grad_{x_t} E_meas,   grad = J_x0hat^T A^T (A x0_hat - y)   (via autodiff)

x0_hat is the base prediction (CFG when guidance_scale > 1, the conditional model at 1), decoded to
pixels where A acts (the exact codec for ShapesWorld; backprop through the VAE decoder for SD).
The correction is applied to the sampler's next state, as diffusion posterior sampling does, with
the step normalised by the residual norm (our choice, after DPS, which uses grad ||y - A x0_hat||):

    x_{i+1} = step(x_i) - zeta / ||A x0_hat - y|| * grad_{x_i} ||A x0_hat - y||^2

implemented by returning x0' = x0_hat - (zeta_i / alpha_{i+1}) grad with the same eps, which is exact
for the first-order samplers (DDIM, Euler, flow Euler: x_{i+1} = alpha_{i+1} x0 + sigma_{i+1} eps).
Space: x0 (pixels through the codec). Default step_size zeta = 1.0 (ours: DPS reports 0.1-1.0).

Parameters: operator (inpaint | super_resolution | deblur), image (the ground-truth image file the
measurement is taken from), mask (inpainting), factor (super-resolution), sigma (blur), noise (std of
the measurement noise, [-1, 1] scale), step_size. The run's result reports the PSNR of the output
against the ground truth and of the measurement against A(output).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..denoiser import Prediction
from .base import Guidance, StepInfo, check_range, register
from .measurement_hard import MeasurementBase


@register
@dataclass
class MeasurementSoft(MeasurementBase):
    step_size: float = 1.0

    name = "measurement_soft"
    space = "x0 (pixels)"
    needs_grad = True

    def validate(self) -> None:
        super().validate()
        check_range(self.name, "step_size", self.step_size, 0.0, 100.0)

    def combine(self, preds: dict[str, Prediction], step: StepInfo, x: torch.Tensor) -> Prediction:
        base = self.base_prediction(preds)
        with torch.enable_grad():
            img = self._bundle.decode(base.x0)
            r = self.operator(img.float()) - self._y.to(img)
            sq = r.pow(2).flatten(1).sum(1)
            (grad,) = torch.autograd.grad(sq.sum(), x)
        norm = sq.detach().sqrt().clamp_min(1e-8).view(-1, *([1] * (x.dim() - 1)))
        a_next = step.alpha_next if step.alpha_next else 1.0
        x0 = base.x0.detach() - (self.step_size / norm / a_next) * grad
        return Prediction(x0, base.eps.detach())
