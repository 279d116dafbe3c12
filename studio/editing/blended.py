"""Blended latent denoising with a user mask (blended latent diffusion, Avrahami et al., 2023; the
survey's route 7.4 "mask region control" is announced at L1067 without a section, and its one rule is
DiffEdit-style blending, §12.4.7 L4710: "inside-mask pixels follow the edited caption while
outside-mask pixels are mapped back to the original content").

The mask m (HxW at image resolution, white = edit) goes to the latent grid (a cell is inside when at
least half of its pixels are). Sampling starts from the source's trajectory at t0 = strength * T
(x*_T at strength 1) and runs under the target prompt; after every step i, outside the mask the latent
is replaced by the source trajectory's latent at the level the step reached (methods.md row 38):

    x_{t-1} <- m * x_{t-1}^edit + (1 - m) * x*_{t-1}

so the last step leaves x*_0 outside the mask exactly. Diffusion and flow models alike.
"""

from __future__ import annotations

import torch

from .base import (EditResult, EditSource, check_fraction, decode_image, elapsed, grid_mask, image_mask, run_single,
                   start_index)

DEFAULTS = {"strength": 1.0}


def blended_denoise(bundle, source: EditSource, target_prompt: str, cells: torch.Tensor, strength: float, *,
                    progress=None) -> tuple[torch.Tensor, int]:
    """Denoise from x*_{t0} under the target prompt, the latent outside `cells` (bool (h, w)) reset to the
    source trajectory after every step. Returns (x0, nfe)."""
    start = start_index(source.steps, strength)
    m = cells.to(source.latents.device)[None, None].to(source.latents.dtype)

    def blend(i, x):
        return torch.where(m.bool(), x, source.level(i + 1))

    x = source.level(start).clone()
    if start >= source.steps:
        return x, 0
    with torch.no_grad():
        return run_single(bundle, source, bundle.encode_prompt([target_prompt]), x, start, post_step=blend,
                          progress=progress)


def run(bundle, source: EditSource, target_prompt: str, params: dict, mask, *, progress=None, t0=None):
    strength = check_fraction("blended", "strength", params["strength"])
    h, w = source.latents.shape[-2:]
    cells = grid_mask(mask, h, w)
    if not cells.any():
        raise ValueError(f"blended: the mask covers less than half of every latent cell "
                         f"({source.height // h}x{source.width // w} pixels); paint a larger region")
    x, nfe = blended_denoise(bundle, source, target_prompt, cells, strength, progress=progress)
    return EditResult(method="blended", image=decode_image(bundle, x), params={"strength": strength}, seconds=elapsed(t0),
                      nfe=nfe, mask=image_mask(cells, source.height, source.width), latents=x,
                      source_latents=source.source_latents)
