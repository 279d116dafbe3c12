"""Time-scheduled CFG: limited-interval guidance and the weak-strong-weak schedule (survey §4.3, §5.3 intro).

    u = u_uncond + w(t) (u_cond - u_uncond)

with a guidance scale that depends on the normalised time t of the step (StepInfo.t, 1 = pure noise).

* schedule="interval" (limited-interval guidance; survey ref 9, L4763, which the survey cites without
  a formula): w(t) = `guidance_scale` inside the interval t_lo < t <= t_hi and w = 1, the plain
  conditional prediction, outside it. Outside the interval only the conditional branch is evaluated,
  so a run costs fewer network evaluations than CFG.
* schedule="weak_strong_weak" (the three-phase table of §4.3, L537-547): early (t > t_hi) w = `early_scale`,
  middle (t_lo < t <= t_hi) w = `guidance_scale`, late (t <= t_lo) w = `late_scale`. A phase whose
  scale is 1 also needs only the conditional branch.

Defaults come from the §4.3 table: the phase boundaries t_hi = 0.7 and t_lo = 0.3, early_scale = 1.5
(the table's "w ~ 1-2") and late_scale = 2.0 ("w ~ 1-3"); the middle phase (w ~ 5-10) uses
`guidance_scale`. The limited-interval form takes the same middle interval (ours: the survey gives no
interval for it). The early and late scales apply to the weak-strong-weak schedule only.

Space: any (the rule is CFG, affine; applied to x0 and eps alike).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..denoiser import Prediction
from .base import Guidance, StepInfo, check_range, register

SCHEDULES = ("interval", "weak_strong_weak")


@register
@dataclass
class IntervalCFG(Guidance):
    schedule: str = "interval"
    t_lo: float = 0.3
    t_hi: float = 0.7
    early_scale: float = 1.5  # weak_strong_weak only
    late_scale: float = 2.0  # weak_strong_weak only

    name = "interval"
    space = "any"

    def validate(self) -> None:
        super().validate()
        if self.schedule not in SCHEDULES:
            raise ValueError(f"{self.name}: schedule={self.schedule!r} is not one of {', '.join(SCHEDULES)}")
        check_range(self.name, "t_lo", self.t_lo, 0.0, 1.0)
        check_range(self.name, "t_hi", self.t_hi, 0.0, 1.0)
        if not self.t_lo < self.t_hi:
            raise ValueError(f"{self.name}: t_lo={self.t_lo} must be below t_hi={self.t_hi}")
        check_range(self.name, "early_scale", self.early_scale, *self.scale_range)
        check_range(self.name, "late_scale", self.late_scale, *self.scale_range)

    def scale_at(self, step: StepInfo) -> float:
        """w(t) of the schedule at this step."""
        if self.t_lo < step.t <= self.t_hi:
            return self.guidance_scale
        if self.schedule == "interval":
            return 1.0
        return self.early_scale if step.t > self.t_hi else self.late_scale

    def branches(self, step: StepInfo) -> tuple[str, ...]:
        if not self.active(step) or self.scale_at(step) == 1.0:
            return ("cond",)
        return ("uncond", "cond")

    def combine(self, preds: dict[str, Prediction], step: StepInfo, x) -> Prediction:
        w, u, c = self.scale_at(step), preds["uncond"], preds["cond"]
        return Prediction(u.x0 + w * (c.x0 - u.x0), u.eps + w * (c.eps - u.eps))
