"""AutoGuidance (survey §5.2.5, L841-853; Karras et al., 2024), optionally stacked on CFG.

The bad branch is an inferior version of the model itself (smaller and/or less trained) with the same
conditioning, so there is no task discrepancy between the two branches (L843). The survey's rule (L851):

    u_AG(x_t, t, c) = u_theta(x_t, t, c) + omega (u_theta(x_t, t, c) - u_phi(x_t, t, c))

With CFG's guidance_scale w > 1 (L745) we add it to CFG:

    u = u_uncond + w (u_cond - u_uncond) + omega (u_cond - u_phi(x_t, t, c))

w = 1 (the default, as in the paper, which guides with the weak model instead of an unconditional one)
is the survey's u_AG; omega = 0 is the plain model (or CFG). Affine, one shared state: applied to x0
and eps alike. In the paper's form D_0 + w' (D_1 - D_0), omega = w' - 1; diffusers' `AutoGuidance` guider
computes u_phi + w' (u_theta - u_phi) (its `use_original_formulation=True` is ours with omega = w').

The weak model u_phi is the bundle's `modules["unet_weak"]` (ShapesWorld ships a UNet of the same
architecture trained for 1,500 steps against the model's own text encoder there); a model without one,
or whose weak UNet was trained against another text encoder, is refused with a clear error when the run starts. It is another
network, so it cannot share the main UNet's batched forward: it runs as a second forward per step
("cond_weak", batch 1 per image, with the prompt's conditioning and the run's ControlNet residuals).
NFE per step inside the weak window: 2 without CFG, 3 with CFG (uncond + cond, then weak); outside it 1 or 2.

Default omega = 1.0 (ours: the survey gives none; the paper reports its best weights for its ImageNet
models at w' of about 2 to 2.5, i.e. omega of about 1 to 1.5).

The weak term acts over a window of the run, [weak_start, weak_stop) as fractions of the steps (the
CFG part keeps the guidance's own start/stop). Default [0, 0.6) (ours; the paper guides every step):
the weak model only needs to be worse where the main model's errors are, and a weak model trained on
~1% of the main model's images (ShapesWorld's: 1,500 steps of 64) cannot denoise fine detail, so at
low noise u_theta - u_phi is mostly that detail and the term grains the whole image. Measured on the
shipped ShapesWorld model (32 prompts, seed 0, omega 1, no CFG): all correct 0.00 over the whole run,
0.91 over the first 60% of the steps; omega 0.3 over the whole run: 0.56 (CFG 5 on 128 prompts: 0.91). The window of
limited-interval guidance (survey §4.3) applied to the weak branch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from ..denoiser import Prediction
from .base import ExtraForward, Guidance, StepInfo, check_range, check_window, in_window, register
from .contrast import cfg_part, with_contrast

WEAK_MODULE = "unet_weak"


@register
@dataclass
class AutoGuidance(Guidance):
    """u_uncond + w (u_cond - u_uncond) + omega (u_cond - u_weak), the weak model with the prompt's
    conditioning (survey §5.2.5, L851; w = 1: u_theta + omega (u_theta - u_phi))."""

    guidance_scale: float = 1.0  # CFG's w on top; 1 = AutoGuidance alone
    autoguidance_scale: float = 1.0  # omega
    weak_start: float = 0.0  # window of the weak term, as fractions of the run (see the module docstring)
    weak_stop: float = 0.6

    name = "autoguidance"
    space = "any"

    def validate(self) -> None:
        super().validate()
        check_range(self.name, "autoguidance_scale", self.autoguidance_scale, 0.0, 30.0)
        check_window(self.name, "weak_start", self.weak_start, "weak_stop", self.weak_stop)

    def branches(self, step: StepInfo) -> tuple[str, ...]:
        return ("uncond", "cond") if self.active(step) and self.guidance_scale != 1.0 else ("cond",)

    def extra_forwards(self, preds, step: StepInfo, x) -> tuple[ExtraForward, ...]:
        if not self.active(step) or self.autoguidance_scale == 0.0 or not in_window(step, self.weak_start, self.weak_stop):
            return ()
        return (ExtraForward("cond_weak", "cond", module=WEAK_MODULE),)

    def combine(self, preds: dict[str, Prediction], step: StepInfo, x) -> Prediction:
        out = cfg_part(preds, self.guidance_scale)
        if "cond_weak" in preds:
            out = with_contrast(out, preds["cond"], preds["cond_weak"], self.autoguidance_scale)
        return out

    @contextlib.contextmanager
    def patch(self, bundle):
        """Nothing to install; refuses a model without a weak checkpoint before the run starts."""
        if self.autoguidance_scale != 0.0 and bundle.modules.get(WEAK_MODULE) is None:
            raise ValueError(f"autoguidance: the model {bundle.name or bundle.family!r} has no weak checkpoint "
                             f"(bundle.modules['{WEAK_MODULE}']); AutoGuidance (survey §5.2.5) guides with a weaker "
                             "version of the same model. Use a model that ships one (a ShapesWorld folder with "
                             "unet_weak/) or set autoguidance_scale=0"
                             + (f". This model's weak checkpoint was not loaded: {bundle.extra['weak_unet_refused']}"
                                if bundle.extra.get("weak_unet_refused") else ""))
        yield
