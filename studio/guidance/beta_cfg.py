"""beta-CFG: a Beta-density schedule and a normalised guidance term (survey §5.3.2, L922-946; Malarz et al.).

    g = g_uncond + beta(s) * w (g_cond - g_uncond) / ||g_cond - g_uncond||^gamma
    beta(s) = s^(a-1) (1 - s)^(b-1) / B(a, b),     a, b > 1

beta is the Beta(a, b) density, normalised as the survey writes it (by the Beta function, so it
integrates to one); it is zero at both ends, so the first and the last step are purely unconditional
(weak-strong-weak). The norm is per sample over all other dimensions.

Time: s = i / (N - 1), the run's progress (0 at the first, noisiest step, 1 at the last), as in the
authors' reference implementation (`get_from_beta(step / total_steps, a, b)`). In the survey's t
(1 = noise) this is s ~ 1 - t on a uniform grid; for a != b the direction matters.

Space: eps, as in the reference implementation (its `noise_c - noise_uc`). The survey writes g for
the score; with s = -eps / sigma the normalised term would carry an extra factor sigma^gamma, so
because of the exponent gamma the two spaces give different guidance (they agree only for gamma = 0).
For a fixed step the rule is affine with one per-sample weight k = beta w / ||eps_cond - eps_uncond||^gamma,
and we apply that weight to x0 too, which keeps the prediction consistent with x.

Defaults a = 2, b = 2, gamma = 1: the reference implementation's command-line defaults (its README
example uses b = 3). Steps where beta = 0 (the first and the last) evaluate the unconditional branch
only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..denoiser import Prediction
from .base import Guidance, StepInfo, check_range, register


def beta_density(s: float, a: float, b: float) -> float:
    """The Beta(a, b) density at s in [0, 1] (a, b > 1, so it is 0 at both ends)."""
    if s <= 0.0 or s >= 1.0:
        return 0.0
    log_b = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    return math.exp((a - 1) * math.log(s) + (b - 1) * math.log1p(-s) - log_b)


@register
@dataclass
class BetaCFG(Guidance):
    a: float = 2.0
    b: float = 2.0
    gamma: float = 1.0  # normalisation exponent

    name = "beta_cfg"
    space = "eps"

    def validate(self) -> None:
        super().validate()
        check_range(self.name, "a", self.a, 1.0, 100.0, open_lo=True)
        check_range(self.name, "b", self.b, 1.0, 100.0, open_lo=True)
        check_range(self.name, "gamma", self.gamma, 0.0, 2.0)

    def schedule(self, step: StepInfo) -> float:
        """beta(s) at this step's progress s = i / (N - 1)."""
        return beta_density(step.index / max(1, step.num_steps - 1), self.a, self.b)

    def branches(self, step: StepInfo) -> tuple[str, ...]:
        if not self.active(step):
            return ("cond",)
        return ("uncond",) if self.schedule(step) == 0.0 else ("uncond", "cond")

    def __call__(self, preds: dict[str, Prediction], step: StepInfo, x: torch.Tensor) -> Prediction:
        if self.active(step) and "cond" not in preds:
            return preds["uncond"]
        return super().__call__(preds, step, x)

    def combine(self, preds: dict[str, Prediction], step: StepInfo, x) -> Prediction:
        u, c = preds["uncond"], preds["cond"]
        diff = c.eps - u.eps
        norm = diff.reshape(diff.shape[0], -1).norm(dim=1).clamp_min(1e-12)
        k = (self.schedule(step) * self.guidance_scale / norm**self.gamma).to(diff.dtype)
        k = k.reshape(-1, *([1] * (diff.dim() - 1)))
        return Prediction(u.x0 + k * (c.x0 - u.x0), u.eps + k * diff)
