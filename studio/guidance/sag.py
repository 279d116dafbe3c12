"""SAG, Self-Attention Guidance (survey §5.2.2, L766-792; Hong et al., 2023), optionally stacked on CFG.

SAG's bad branch is the same network and conditioning on a degraded INPUT: the regions the model
attends to are blurred. Per step (L778-781):

  1. the step's batched forward; a recorder on one self-attention layer (the middle block's first,
     as diffusers' SAG pipeline) keeps the attention maps A_t of the source branch b;
  2. mask: M_t = [mean over heads of A_t, summed over the queries > mask_threshold], i.e. the tokens
     that receive more than the average attention (a column of A_t sums to 1 on average), on the
     layer's token grid, upsampled (nearest) to the latent;
  3. degraded input: the source branch's prediction (x0^, eps^) of x_t, its x0^ blurred inside the mask
     (Gaussian, blur_kernel x blur_kernel, blur_sigma, reflect padding) and noised back with eps^:

        x~_t = alpha ((1 - M) . x0^ + M . Blur(x0^)) + sigma eps^ = (1 - M) . x_t + M . (alpha Blur(x0^) + sigma eps^)

     since alpha x0^ + sigma eps^ = x_t; this is the survey's second form (L781) with the blur acting on
     the signal part, as the paper and diffusers' pipeline do;
  4. a second forward on x~_t with b's conditioning: u_theta(x~_t, t, c_b).

The mask needs the first forward's attention, so the degraded forward cannot join it: SAG costs two
sequential forwards per step, NFE = 3 per step with CFG (uncond + cond, then degraded), 2 without.

Combination (survey L785-789, with c_b = c):

    u_SAG = u_theta(x_t, t, c) + omega (u_theta(x_t, t, c) - u_theta(x~_t, t, c))

With CFG (w > 1) we follow the paper's CFG form and diffusers' pipeline (`degraded_branch="uncond"`):
the map and the degraded input come from the unconditional branch,

    u = u_uncond + w (u_cond - u_uncond) + omega (u_uncond - u_theta(x~_t, t, c_uncond));

`degraded_branch="cond"` keeps the survey's conditional contrast on top of CFG,
u = u_uncond + w (u_cond - u_uncond) + omega (u_cond - u_theta(x~_t, t, c)). Without CFG the source is
always "cond".

Space: the degraded prediction belongs to another state (x~_t, not x_t), so the rule is applied to the
network's native output (eps for epsilon models, as the paper and diffusers do; v, x0 or the flow
velocity otherwise), then converted to the prediction consistent with x_t.

Defaults (the survey gives none; the paper's and diffusers' SAG pipeline): sag_scale omega = 0.75,
blur_sigma = 1, blur_kernel = 9, mask_threshold = 1.0, layer = the middle block's first
self-attention ("mid_block.attentions.0.transformer_blocks.0.attn1").
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attention.base import RowSelection, attention_network, installed, latent_size, rows_of, self_attention_layers
from ..denoiser import Prediction, from_prediction, to_prediction
from .base import ExtraForward, Guidance, StepInfo, check_range, register
from .cfg import native_space
from .contrast import cfg_part


def gaussian_blur(img: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Per-channel Gaussian blur of (B, C, H, W) with reflect padding (the kernel clipped to the image)."""
    _, c, h, w = img.shape
    kh, kw = (min(kernel_size, side + 1 - side % 2) for side in (h, w))

    def kernel1d(k):
        x = torch.linspace(-(k - 1) / 2, (k - 1) / 2, steps=k, dtype=torch.float64)
        pdf = torch.exp(-0.5 * (x / sigma) ** 2)
        return (pdf / pdf.sum()).to(img)

    kernel = kernel1d(kh)[:, None] * kernel1d(kw)[None, :]
    img = F.pad(img, [kw // 2, kw // 2, kh // 2, kh // 2], mode="reflect")
    return F.conv2d(img, kernel.expand(c, 1, kh, kw), groups=c)


def attention_mask(maps: torch.Tensor, grid: tuple[int, int], size: tuple[int, int], threshold: float) -> torch.Tensor:
    """SAG's mask from self-attention maps (B, heads, N, N): 1 where a token receives more than
    `threshold` attention (averaged over heads, summed over queries), upsampled (nearest) to `size`; (B, 1, H, W)."""
    received = maps.mean(dim=1).sum(dim=1)  # (B, N): the column sums
    mask = (received > threshold).to(maps.dtype).reshape(-1, 1, *grid)
    return F.interpolate(mask, size=size, mode="nearest")


@register
@dataclass
class SAG(Guidance):
    """u_uncond + w (u_cond - u_uncond) + omega (u_b - u(x~_t, c_b)) on the network output, x~_t blurred
    where the attention map of branch b is high (survey §5.2.2, L781, L785-789; see the module docstring)."""

    sag_scale: float = 0.75  # omega
    blur_sigma: float = 1.0
    blur_kernel: int = 9
    mask_threshold: float = 1.0
    degraded_branch: str = "uncond"  # with CFG: "uncond" (paper, diffusers) or "cond" (survey's contrast)
    layer: str = "mid_block.attentions.0.transformer_blocks.0.attn1"  # the self-attention layer whose map is read

    name = "sag"
    space = "network output (eps for epsilon models)"

    def __post_init__(self):
        self.selection = RowSelection()
        self.recorder = None

    def validate(self) -> None:
        super().validate()
        check_range(self.name, "sag_scale", self.sag_scale, 0.0, 30.0)
        check_range(self.name, "blur_sigma", self.blur_sigma, 0.0, 100.0, open_lo=True)
        if not isinstance(self.blur_kernel, int) or self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise ValueError(f"{self.name}: blur_kernel={self.blur_kernel!r} must be an odd positive integer")
        check_range(self.name, "mask_threshold", self.mask_threshold, 0.0, 1e6)
        if self.degraded_branch not in ("uncond", "cond"):
            raise ValueError(f"{self.name}: degraded_branch={self.degraded_branch!r} must be 'uncond' or 'cond'")

    def branches(self, step: StepInfo) -> tuple[str, ...]:
        return ("uncond", "cond") if self.active(step) and self.guidance_scale != 1.0 else ("cond",)

    def source(self, branches) -> str:
        """The branch whose attention map and prediction build the degraded input."""
        return "uncond" if self.degraded_branch == "uncond" and "uncond" in branches else "cond"

    def before_forward(self, branches, rows, x_in) -> None:
        src = self.source(branches)
        recording = self.sag_scale != 0.0 and src in rows
        self.selection.set(x_in.shape[0], rows_of(rows, [src]) if recording else (), latent_size(x_in))
        if recording and self.recorder is not None:
            self.recorder.reset()

    def degraded_input(self, pred: Prediction, maps: torch.Tensor, grid, step: StepInfo) -> torch.Tensor:
        """x~_t = alpha ((1 - M) x0^ + M Blur(x0^)) + sigma eps^ (step 3 of the docstring)."""
        x0 = pred.x0
        mask = attention_mask(maps, grid, tuple(x0.shape[-2:]), self.mask_threshold).to(x0.dtype)
        blurred = gaussian_blur(x0, self.blur_kernel, self.blur_sigma)
        return step.alpha * (blurred * mask + x0 * (1 - mask)) + step.sigma * pred.eps

    def extra_forwards(self, preds, step: StepInfo, x) -> tuple[ExtraForward, ...]:
        if not self.active(step) or self.sag_scale == 0.0:
            return ()
        src = self.source(tuple(preds))
        if self.recorder is None or self.recorder.maps is None:
            raise RuntimeError("sag: no self-attention map was recorded in this step; the map recorder is "
                               "installed by patch(bundle) around the run")
        maps, grid = self.recorder.maps, self.recorder.grid
        self.recorder.reset()
        return (ExtraForward(f"{src}_degraded", src, x=self.degraded_input(preds[src], maps, grid, step)),)

    def combine(self, preds: dict[str, Prediction], step: StepInfo, x) -> Prediction:
        out = cfg_part(preds, self.guidance_scale)
        degraded = [b for b in preds if b.endswith("_degraded")]
        if not degraded:
            return out
        src = degraded[0][: -len("_degraded")]
        space = native_space(step)
        a, s = step.alpha, step.sigma

        def g(p):
            return from_prediction(p, a, s, space)

        guided = g(out) + self.sag_scale * (g(preds[src]) - g(preds[degraded[0]]))
        return to_prediction(guided, x, a, s, space)

    @contextlib.contextmanager
    def patch(self, bundle):
        """Install the attention-map recorder on `layer`; restored exactly afterwards."""
        if self.sag_scale == 0.0:
            yield
            return
        from ..attention.sag import AttentionMapRecorder

        net = attention_network(bundle, self.name)
        names = self_attention_layers(net, [self.layer], self.name)
        if len(names) != 1:
            raise ValueError(f"{self.name}: layer={self.layer!r} matches {len(names)} self-attention layers "
                             f"({', '.join(n[: -len('.processor')] for n in names)}); name exactly one")
        self.recorder = AttentionMapRecorder(net.attn_processors[names[0]], self.selection)
        try:
            with installed(net, {names[0]: self.recorder}):
                yield
        finally:
            self.selection.clear()
            self.recorder = None
