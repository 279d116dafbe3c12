"""SEG, Smoothed Energy Guidance (survey §5.2.4, L820-839; Hong, 2024), stacked on CFG.

The bad branch u^- runs the same network on the same input and conditioning with the self-attention
energy of selected layers smoothed by a Gaussian of width sigma, implemented as a blur of the queries
over the 2-D token grid (L828; studio/attention/seg.py). The survey's rule (L833-835):

    u_SEG = u_theta^+ + omega (u_theta^+ - u_theta^-_smoothed)

and, with CFG's guidance_scale w > 1 (L745), what we compute (diffusers' `SmoothedEnergyGuidance`
guider, diffusers-native formulation, and the official SEG pipeline):

    u = u_uncond + w (u_cond - u_uncond) + omega (u_cond - u_cond_perturbed)

w = 1 drops the unconditional branch (the survey's u_SEG); omega = 0 or a step outside
[seg_start, seg_stop) gives CFG. Affine, one shared state: applied to x0 and eps alike (any space).

Cost: "cond_perturbed" rides in the same batched forward as "uncond" and "cond" (3 NFE per step).

Defaults and sources (the survey gives no sigma):
  seg_scale omega = 3.0   the official SEG code ("we generally fix this parameter to 3.0") and the
                          docstring of diffusers' guider (its signature has 2.8).
  blur_sigma = 9999999.0  diffusers' guider default: above 9999 the blur is infinite, every query
                          becomes the mean query (uniform queries). The official code suggests
                          controlling sigma exponentially (1, 4, 16, ...) for partial smoothing.
  layers = "mid"          the official SEG code's `seg_applied_layers=['mid']` (diffusers' guider
                          takes layer indices of a transformer stack instead); same patterns as PAG.
  seg_start, seg_stop = 0, 1   diffusers' guider (the whole run).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from ..attention.base import RowSelection, attention_network, installed, latent_size, rows_of, self_attention_layers
from ..denoiser import Prediction
from .base import Guidance, StepInfo, check_range, is_perturbed, register
from .contrast import cfg_part, with_contrast


@register
@dataclass
class SEG(Guidance):
    """u_uncond + w (u_cond - u_uncond) + omega (u_cond - u_cond_perturbed), queries blurred on the
    perturbed rows (survey §5.2.4, L828, L835; see the module docstring)."""

    seg_scale: float = 3.0  # omega
    blur_sigma: float = 9999999.0  # sigma of the query blur; above 9999: infinite (uniform queries)
    layers: str = "mid"  # self-attention layers to smooth: comma-separated patterns of module names
    seg_start: float = 0.0  # window of the smoothed-energy term, as fractions of the run
    seg_stop: float = 1.0

    name = "seg"
    space = "any"
    all_branches = ("uncond", "cond", "cond_perturbed")

    def __post_init__(self):
        self.selection = RowSelection()

    def validate(self) -> None:
        super().validate()
        check_range(self.name, "seg_scale", self.seg_scale, 0.0, 30.0)
        check_range(self.name, "blur_sigma", self.blur_sigma, 0.0, 1e12, open_lo=True)
        if not (0.0 <= self.seg_start <= self.seg_stop <= 1.0):
            raise ValueError(f"{self.name}: seg_start={self.seg_start}, seg_stop={self.seg_stop} must satisfy "
                             "0 <= seg_start <= seg_stop <= 1")
        if not isinstance(self.layers, str) or not [p for p in self.layers.split(",") if p.strip()]:
            raise ValueError(f"{self.name}: layers={self.layers!r} must name at least one layer pattern")

    def perturbing(self, step: StepInfo) -> bool:
        return self.seg_scale != 0.0 and self.seg_start <= step.fraction < self.seg_stop

    def branches(self, step: StepInfo) -> tuple[str, ...]:
        if not self.active(step):
            return ("cond",)
        out = ("uncond", "cond") if self.guidance_scale != 1.0 else ("cond",)
        return (out + ("cond_perturbed",)) if self.perturbing(step) else out

    def combine(self, preds: dict[str, Prediction], step: StepInfo, x) -> Prediction:
        out = cfg_part(preds, self.guidance_scale)
        if "cond_perturbed" in preds:
            out = with_contrast(out, preds["cond"], preds["cond_perturbed"], self.seg_scale)
        return out

    def before_forward(self, branches, rows, x_in) -> None:
        self.selection.set(x_in.shape[0], rows_of(rows, [b for b in branches if is_perturbed(b)]), latent_size(x_in))

    def processor(self, inner):
        from ..attention.seg import BlurredQuerySelfAttention

        return BlurredQuerySelfAttention(inner, self.selection, self.blur_sigma)

    @contextlib.contextmanager
    def patch(self, bundle):
        """Wrap the selected self-attention layers' processors; restored exactly afterwards."""
        if self.seg_scale == 0.0:
            yield
            return
        net = attention_network(bundle, self.name)
        names = self_attention_layers(net, [p.strip() for p in self.layers.split(",") if p.strip()], self.name)
        procs = net.attn_processors
        try:
            with installed(net, {n: self.processor(procs[n]) for n in names}):
                yield
        finally:
            self.selection.clear()
