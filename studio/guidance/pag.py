"""PAG, Perturbed-Attention Guidance (survey §5.2.3, L794-818; Ahn et al., 2024), stacked on CFG.

The bad branch u^- runs the same network on the same input and conditioning with the self-attention
map of selected layers replaced by the identity (L796; the survey's definition of W~ was lost at
L807), so each token's attention output is its own value (studio/attention/pag.py). The survey's
internal-contrast rule (L757, L814):

    u_PAG = u_theta(x_t, t, c; W) + omega (u_theta(x_t, t, c; W) - u_theta(x_t, t, c; W~))

and, with CFG's guidance_scale w > 1 (L745), what we compute (diffusers' PAG pipelines and
`PerturbedAttentionGuidance` guider, diffusers-native formulation):

    u = u_uncond + w (u_cond - u_uncond) + omega (u_cond - u_cond_perturbed)

w = 1 drops the unconditional branch and gives the survey's u_PAG; omega = 0 (or a step outside the
[pag_start, pag_stop) window) drops the perturbed branch and gives CFG exactly. The rule is affine
and every branch shares the state x_t, so it applies to x0 and eps alike (any parameterization).

Cost: the perturbed branch "cond_perturbed" rides in the same batched forward as "uncond" and
"cond" (3 rows per image instead of 2: 3 NFE per step); the identity processor only replaces the
selected layers' rows of that branch.

Defaults and sources:
  pag_scale omega = 3.0   diffusers' PAG pipelines (`pag_scale=3.0`); the guider's signature has 2.8.
  layers = "mid"          diffusers' PAG pipelines (`pag_applied_layers="mid"`): the self-attention of
                          the UNet's middle block. Comma-separated regular expressions searched in the
                          module names ("mid", "down_blocks.1", "up_blocks.1.attentions.0"). Our
                          ShapesWorld UNet has a cross-attention middle block at 4x4 tokens, so
                          "mid" exists there as in SD 1.x/SDXL.
  pag_start, pag_stop = 0, 1   the whole run, as the PAG paper and diffusers' PAG pipelines apply it.
                          diffusers' guider defaults to 0.01-0.2, copied from skip-layer guidance
                          (an SD3 recipe); on a 25-step run that is 4 perturbed steps. Set them to
                          0.01/0.2 to reproduce the guider.
The [start, stop) window of the whole method (CFG included) is the base class's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from ..attention.base import RowSelection, attention_network, installed, latent_size, rows_of, self_attention_layers
from ..denoiser import Prediction
from .base import Guidance, StepInfo, check_range, check_window, in_window, is_perturbed, register
from .contrast import cfg_part, with_contrast


@register
@dataclass
class PAG(Guidance):
    """u_uncond + w (u_cond - u_uncond) + omega (u_cond - u_cond_perturbed), identity self-attention on the
    perturbed rows (survey §5.2.3, L796, L814; see the module docstring)."""

    pag_scale: float = 3.0  # omega
    layers: str = "mid"  # self-attention layers to perturb: comma-separated patterns of module names
    pag_start: float = 0.0  # window of the perturbed term, as fractions of the run
    pag_stop: float = 1.0

    name = "pag"
    space = "any"
    all_branches = ("uncond", "cond", "cond_perturbed")

    def __post_init__(self):
        self.selection = RowSelection()

    def validate(self) -> None:
        super().validate()
        check_range(self.name, "pag_scale", self.pag_scale, 0.0, 30.0)
        check_window(self.name, "pag_start", self.pag_start, "pag_stop", self.pag_stop)
        if not isinstance(self.layers, str) or not [p for p in self.layers.split(",") if p.strip()]:
            raise ValueError(f"{self.name}: layers={self.layers!r} must name at least one layer pattern")

    def perturbing(self, step: StepInfo) -> bool:
        return self.pag_scale != 0.0 and in_window(step, self.pag_start, self.pag_stop)

    def branches(self, step: StepInfo) -> tuple[str, ...]:
        if not self.active(step):
            return ("cond",)
        out = ("uncond", "cond") if self.guidance_scale != 1.0 else ("cond",)
        return (out + ("cond_perturbed",)) if self.perturbing(step) else out

    def combine(self, preds: dict[str, Prediction], step: StepInfo, x) -> Prediction:
        out = cfg_part(preds, self.guidance_scale)
        if "cond_perturbed" in preds:
            out = with_contrast(out, preds["cond"], preds["cond_perturbed"], self.pag_scale)
        return out

    def before_forward(self, branches, rows, x_in) -> None:
        self.selection.set(x_in.shape[0], rows_of(rows, [b for b in branches if is_perturbed(b)]), latent_size(x_in))

    def processor(self, inner):
        from ..attention.pag import IdentitySelfAttention

        return IdentitySelfAttention(inner, self.selection)

    @contextlib.contextmanager
    def patch(self, bundle):
        """Wrap the selected self-attention layers' processors; restored exactly afterwards."""
        if self.pag_scale == 0.0:
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
