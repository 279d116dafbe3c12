"""The internal-contrast self-guidance template (survey §5.2.1, L740-762), shared by PAG, SEG, SAG and
AutoGuidance (§5.2.2-§5.2.5):

    u = u_cfg + omega * (u_theta(x_t, c) - u_minus),   u_cfg = u_theta(∅) + w (u_theta(c) - u_theta(∅))

where u_minus is the prediction of a deliberately degraded model or input (identity attention, blurred
queries, a blurred input, a weaker network). Affine in the predictions, so it applies to x0 and eps alike.
"""

from __future__ import annotations

from ..denoiser import Prediction


def cfg_part(preds: dict[str, Prediction], guidance_scale: float) -> Prediction:
    """u_cfg: classifier-free guidance when the unconditional branch ran, else the conditional prediction."""
    c = preds["cond"]
    if "uncond" not in preds:
        return c
    w, u = guidance_scale, preds["uncond"]
    return Prediction(u.x0 + w * (c.x0 - u.x0), u.eps + w * (c.eps - u.eps))


def with_contrast(out: Prediction, positive: Prediction, negative: Prediction, omega: float) -> Prediction:
    """out + omega * (positive - negative)."""
    return Prediction(out.x0 + omega * (positive.x0 - negative.x0), out.eps + omega * (positive.eps - negative.eps))
