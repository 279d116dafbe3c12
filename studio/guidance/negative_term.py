"""Negative prompt as an explicit subtractive term: multi-prompt guidance (survey §4.2, L486-494).

    u_ctrl = u_uncond + w_+ (u_+ - u_uncond) - w_- (u_- - u_uncond)

with u_uncond = u_theta(x_t, t, empty prompt), u_+ = u_theta(x_t, t, c+) and u_- = u_theta(x_t, t, c-):
the score of log p(c+ | x_t) - alpha log p(c- | x_t), three network evaluations per step. Unlike
plain CFG with a negative prompt (cfg.py, where c- replaces the empty prompt as the baseline), the
baseline stays the empty prompt and the negative prompt is pushed away from with its own weight.

Branches: "uncond" is the empty prompt and "negative" the negative prompt (`all_branches` names
"negative", which tells the engine to encode them apart). With an empty negative prompt u_- = u_uncond
and the rule is plain CFG.

Space: any. The weights (1 - w_+ + w_-, w_+, -w_-) sum to one, so the rule is affine and is applied to
x0 and eps alike. Defaults: w_+ = `guidance_scale`; w_- = `negative_scale`, which the survey does not
fix; by default (None) it equals w_+ (ours), which makes the rule u_uncond + w (u_+ - u_-).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..denoiser import Prediction
from .base import Guidance, StepInfo, check_range, register


@register
@dataclass
class NegativeTerm(Guidance):
    negative_scale: Optional[float] = None  # w_-; None = the same as guidance_scale (w_+)

    name = "negative_term"
    space = "any"
    all_branches = ("uncond", "cond", "negative")

    def validate(self) -> None:
        super().validate()
        if self.negative_scale is not None:
            check_range(self.name, "negative_scale", self.negative_scale, *self.scale_range)

    @property
    def weights(self) -> tuple[float, float]:
        w_neg = self.guidance_scale if self.negative_scale is None else self.negative_scale
        return self.guidance_scale, w_neg

    def branches(self, step: StepInfo) -> tuple[str, ...]:
        return ("uncond", "cond", "negative") if self.active(step) else ("cond",)

    def combine(self, preds: dict[str, Prediction], step: StepInfo, x) -> Prediction:
        w_pos, w_neg = self.weights
        u, c, n = preds["uncond"], preds["cond"], preds["negative"]
        return Prediction(u.x0 + w_pos * (c.x0 - u.x0) - w_neg * (n.x0 - u.x0),
                          u.eps + w_pos * (c.eps - u.eps) - w_neg * (n.eps - u.eps))
