"""Adaptive Projected Guidance, APG (survey §5.1.1, L582-621; Sadat et al.).

In denoised (x0) space, with D = x0_cond - x0_uncond (the survey's Delta_t):

    D_par  = (<D, x0_cond> / ||x0_cond||^2) x0_cond,      D_perp = D - D_par
    D~     = D_perp + eta D_par                          (eta < 1 damps the parallel, saturating part)
    x0_APG = x0_cond + (w - 1) D~

stabilised by a norm threshold r (the survey writes D~ <- D~ min(1, r / ||D~||)) and by reverse
momentum (beta < 0) over the updates. The survey gives neither the momentum recursion nor the order
of these steps; we take both from diffusers' `AdaptiveProjectedGuidance` (its `normalized_guidance`,
which we call): the running average m_i = D_i + beta m_{i-1} replaces D, is clipped to norm r, and only
then split into its parallel and orthogonal parts (for eta != 1 this differs from clipping D~ after the
split). All norms and inner products are per sample over every other dimension.

Space: x0, as the survey insists (L621: "the projection must be applied to the denoised prediction";
in eps or v space "the effect can be negligible"). The guided x0 is converted back with the step's
alpha and sigma: eps = (x - alpha x0) / sigma.

Defaults: r = 15 and no momentum (beta = 0, the same as `None`) are diffusers' `AdaptiveProjectedGuidance`
defaults (`adaptive_projected_guidance_rescale`, `adaptive_projected_guidance_momentum`). eta = 0 is
not: diffusers defaults to eta = 1, which keeps the parallel component and, with the other two
defaults, makes APG plain CFG until the norm threshold is reached. The survey's method damps the
parallel component (eta < 1, L604); eta = 0 removes it. Reverse momentum is opt-in (beta < 0, for
example -0.5). Diffusers' default formula, x0_uncond + w D~, differs from the survey's
x0_cond + (w - 1) D~ whenever D~ != D; we follow the survey, which is diffusers'
`use_original_formulation=True` with its scale set to w - 1.

State: the momentum buffer lives across the steps of a run; `reset()` clears it. A two-evaluation
step (flow Heun's corrector) updates it twice.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..denoiser import Prediction, to_prediction
from .base import Guidance, StepInfo, check_range, register


@register
@dataclass
class APG(Guidance):
    eta: float = 0.0  # weight of the parallel component (1 = CFG's)
    norm_threshold: float = 15.0  # r; 0 turns the threshold off
    momentum: float = 0.0  # beta; negative = reverse momentum, 0 = none

    name = "apg"
    space = "x0"

    def __post_init__(self):
        self._buffer = None

    def reset(self) -> None:
        self._buffer = None

    def validate(self) -> None:
        super().validate()
        check_range(self.name, "eta", self.eta, 0.0, 1.0)
        check_range(self.name, "norm_threshold", self.norm_threshold, 0.0, 1e6)
        check_range(self.name, "momentum", self.momentum, -0.99, 0.99)

    def branches(self, step: StepInfo) -> tuple[str, ...]:
        if not self.active(step) or self.guidance_scale == 1.0:
            return ("cond",)
        return ("uncond", "cond")

    def combine(self, preds: dict[str, Prediction], step: StepInfo, x) -> Prediction:
        from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance

        if self.momentum != 0.0 and self._buffer is None:
            self._buffer = MomentumBuffer(self.momentum)
        c, u = preds["cond"], preds["uncond"]
        x0 = normalized_guidance(c.x0, u.x0, self.guidance_scale - 1.0, self._buffer, self.eta,
                                 self.norm_threshold, use_original_formulation=True)
        return to_prediction(x0, x, step.alpha, step.sigma, "sample")
