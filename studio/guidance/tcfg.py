"""TCFG, tangential damping CFG (survey §5.1.3 (1), L661-695; Kwon et al.).

Per sample, stack the unconditional and conditional scores as the columns of a d x 2 matrix and keep
only the leading singular direction of the unconditional score:

    S = [s_uncond  s_cond] = U Sigma V^T,      s~_uncond = U[:, :1] U[:, :1]^T s_uncond
    s_TCFG = s~_uncond + w (s_cond - s~_uncond)

r = 1 of the 2 columns (the survey's r, which it leaves open, has no other non-trivial value).

Space: the score, computed on eps. For x = alpha x0 + sigma eps the score is s = -eps / sigma, the same
scalar for both branches, so S in eps has the same singular vectors and the rule gives the same
result: we compute s_TCFG as eps_TCFG = e~_uncond + w (e_cond - e~_uncond) and take x0 from the state,
x0 = (x - sigma eps_TCFG) / alpha. (In x0, v or velocity space the rule would differ: those are affine
in the score with an offset in x.) Diffusers' `TangentialClassifierFreeGuidance` applies the same SVD
filter to the network's native output: the same result for epsilon models.

At alpha = 0 (pure noise, the first step of flow and zero-terminal-SNR schedules) no eps other than
x is consistent with the state and x0 is undetermined; there the ideal scores of both branches are
equal, where the rule reduces to CFG, so we apply CFG to (x0, eps).

No hyper-parameters beyond w (diffusers' guider has none either).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..denoiser import Prediction, to_prediction
from .base import Guidance, StepInfo, register

ALPHA_MIN = 1e-6  # below this the step is treated as pure noise (see the module docstring)


def damp_tangential(e_uncond: torch.Tensor, e_cond: torch.Tensor) -> torch.Tensor:
    """e_uncond projected on the leading left singular vector of [e_uncond e_cond], per sample."""
    b = e_uncond.shape[0]
    stacked = torch.stack([e_uncond.reshape(b, -1), e_cond.reshape(b, -1)], dim=1).double()  # (B, 2, d)
    _, _, vh = torch.linalg.svd(stacked, full_matrices=False)  # rows of vh: singular directions in R^d
    v1 = vh[:, :1, :]  # (B, 1, d)
    kept = (stacked[:, :1, :] @ v1.transpose(1, 2)) @ v1  # (B, 1, d)
    return kept.reshape(e_uncond.shape).to(e_uncond.dtype)


@register
@dataclass
class TCFG(Guidance):
    name = "tcfg"
    space = "score (eps)"

    def branches(self, step: StepInfo) -> tuple[str, ...]:
        if not self.active(step) or self.guidance_scale == 1.0:
            return ("cond",)
        return ("uncond", "cond")

    def combine(self, preds: dict[str, Prediction], step: StepInfo, x) -> Prediction:
        w, u, c = self.guidance_scale, preds["uncond"], preds["cond"]
        if step.alpha < ALPHA_MIN:
            return Prediction(u.x0 + w * (c.x0 - u.x0), u.eps + w * (c.eps - u.eps))
        e_u = damp_tangential(u.eps, c.eps)
        eps = e_u + w * (c.eps - e_u)
        return to_prediction(eps, x, step.alpha, step.sigma, "epsilon")
