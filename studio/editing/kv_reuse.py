"""KV reuse editing (survey §7.2.3, L1189-1200): background keys and values come from the source pass.

The source branch and the edit branch share x_T and run in one batched forward (`base.run_pair`). In
every self-attention layer and step, the edit branch's K and V are the source's for background tokens
(outside the user's mask) and its own for editable tokens (inside) (controller in
`studio/attention/kv_reuse.py`). "KV reuse can be more direct when the objective is perfect background
preservation" (L1199): with `keep_background` the edit latent outside the mask is also set to the
source branch's after every step, as KV-Edit denoises only the editable tokens (ours: the survey does
not detail KV-Edit's background reconstruction). The mask is the region to edit, at image resolution.
"""

from __future__ import annotations

import torch

from ..attention.edit import install
from ..attention.kv_reuse import KeyValueReuse
from .base import EditResult, EditSource, decode_image, elapsed, grid_mask, image_mask, run_pair

DEFAULTS = {"keep_background": False}


def run(bundle, source: EditSource, target_prompt: str, p: dict, mask, *, net, progress=None, t0=None):
    if not isinstance(p["keep_background"], bool):
        raise ValueError(f"kv_reuse: keep_background={p['keep_background']!r} must be true or false")
    ctl = KeyValueReuse(lambda h, w: grid_mask(mask, h, w))
    h, w = source.latents.shape[-2:]
    cells = grid_mask(mask, h, w).to(source.latents.device)[None, None]

    def keep(i, x):
        return torch.cat([x[:1], torch.where(cells, x[1:], x[:1])])

    with torch.no_grad(), install(net, ctl):
        xs, xe, nfe = run_pair(bundle, source, bundle.encode_prompt([target_prompt]), controller=ctl,
                               post_step=keep if p["keep_background"] else None,
                               progress=progress)
    return EditResult(method="kv_reuse", image=decode_image(bundle, xe), params=dict(p), seconds=elapsed(t0), nfe=nfe,
                      mask=image_mask(cells[0, 0], source.height, source.width) if p["keep_background"] else mask,
                      latents=xe, source_latents=xs, source_image=decode_image(bundle, xs))
