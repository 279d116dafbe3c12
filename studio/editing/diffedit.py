"""DiffEdit: a mask from the disagreement of two prompts, then blended denoising (Couairon et al., 2023).

The survey names DiffEdit's mask-guided generation (§12.4.7, L4710) but not how the mask is found
(methods.md row 38); we follow the paper and diffusers' `StableDiffusionDiffEditPipeline.generate_mask`:

1. noise the source's clean latent to t_m = mask_strength * T with K independent draws,
   x^(k) = alpha_m x_src + sigma_m eps^(k);
2. predict the noise under the source prompt and under the target prompt, eps_theta(x^(k), t_m, c);
3. M = mean over draws and channels of |eps(x^(k), c_tgt) - eps(x^(k), c_src)|: large where the
   prompts disagree about the image;
4. normalise: clamp M to [0, ratio * mean(M)], divide by that bound, threshold at `mask_threshold`.

(diffusers applies CFG to both predictions; with a shared unconditional branch the guided difference is
the conditional one times w, which the normalisation removes, so the conditional pair is enough.)
Then the edit is `blended.blended_denoise` from the inverted latents at t0 = strength * T: inside the
mask under the target prompt, outside reset to the source trajectory after every step. A mask passed
by the user replaces the computed one. The result's `mask` is the mask used, at image resolution.
"""

from __future__ import annotations

import torch

from ..engine import initial_noise
from .base import (EditResult, EditSource, _forward, check_fraction, decode_image, elapsed, grid_mask, image_mask,
                   start_index)
from .blended import blended_denoise

DEFAULTS = {"strength": 0.8, "mask_strength": 0.5, "num_noise_draws": 10, "mask_threshold": 0.5,
            "clamp_ratio": 3.0, "seed": 0}


def difference_map(bundle, source: EditSource, target_prompt: str, *, mask_strength: float, num_noise_draws: int,
                   seed: int, progress=None) -> tuple[torch.Tensor, int]:
    """M (h, w): |eps(c_tgt) - eps(c_src)| averaged over channels and `num_noise_draws` noise draws at
    t_m = mask_strength * T. Returns (M, nfe)."""
    i = min(start_index(source.steps, mask_strength), source.steps - 1)
    x_src = source.source_latents
    a, s = source.schedule.alpha[i].to(x_src.dtype), source.schedule.sigma[i].to(x_src.dtype)
    conds = bundle.encode_prompt([source.prompt, target_prompt])
    generator = torch.Generator("cpu").manual_seed(int(seed))
    total = torch.zeros(x_src.shape[-2:], dtype=torch.float32, device=x_src.device)
    with torch.no_grad():
        for k in range(num_noise_draws):
            x = a * x_src + s * initial_noise(bundle, tuple(x_src.shape), generator)
            (pred,) = _forward(bundle, source.schedule, i, [torch.cat([x, x])], conds)
            total += (pred.eps[1] - pred.eps[0]).abs().float().mean(0)
            if progress is not None:
                progress.step("mask")
    return total / num_noise_draws, 2 * num_noise_draws


def normalise(m: torch.Tensor, clamp_ratio: float, threshold: float) -> torch.Tensor:
    bound = (m.mean() * clamp_ratio).clamp_min(1e-12)
    return (m.clamp(0, float(bound)) / bound) > threshold


def run(bundle, source: EditSource, target_prompt: str, params: dict, mask=None, *, progress=None, t0=None):
    strength = check_fraction("diffedit", "strength", params["strength"])
    mask_strength = check_fraction("diffedit", "mask_strength", params["mask_strength"])
    threshold = check_fraction("diffedit", "mask_threshold", params["mask_threshold"])
    draws = params["num_noise_draws"]
    if isinstance(draws, bool) or not isinstance(draws, int) or not 1 <= draws <= 100:
        raise ValueError(f"diffedit: num_noise_draws={draws!r} must be an integer in [1, 100]")
    ratio = params["clamp_ratio"]
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0:
        raise ValueError(f"diffedit: clamp_ratio={ratio!r} must be positive")
    h, w = source.latents.shape[-2:]
    nfe = 0
    if progress is not None:  # the noise draws, then the denoising steps
        progress.expect((draws if mask is None else 0) + source.steps - start_index(source.steps, strength))
    if mask is None:
        diff, nfe = difference_map(bundle, source, target_prompt, mask_strength=mask_strength, num_noise_draws=draws,
                                   seed=int(params["seed"]), progress=progress)
        cells = normalise(diff, float(ratio), threshold).cpu()
        if not cells.any():
            raise ValueError(f"diffedit: no latent cell passes mask_threshold={threshold} (the noise predictions under "
                             "the two prompts differ too evenly, or not at all); lower mask_threshold or clamp_ratio")
    else:
        cells = grid_mask(mask, h, w)
        if not cells.any():
            raise ValueError("diffedit: the mask covers less than half of every latent cell; paint a larger region")
    x, n = blended_denoise(bundle, source, target_prompt, cells, strength, progress=progress)
    resolved = {"strength": strength, "mask_strength": mask_strength, "num_noise_draws": draws,
                "mask_threshold": threshold, "clamp_ratio": float(ratio), "seed": int(params["seed"])}
    return EditResult(method="diffedit", image=decode_image(bundle, x), params=resolved, seconds=elapsed(t0),
                      nfe=nfe + n, mask=image_mask(cells, source.height, source.width), latents=x,
                      source_latents=source.source_latents)
