"""MasaCtrl editing (survey §7.2.2, L1145-1186; Cao et al., 2023): the edit's decoder self-attention
reads the source's keys and values after step S.

The source branch (source prompt; the inverted or generated image) and the edit branch (target
prompt) share x_T and run in one batched forward (`base.run_pair`). Steps before S use vanilla
self-attention so the target prompt forms its own layout ("The broad layout and pose ... are
determined in the early stages", L1167-1170); from step S on, in the decoder's self-attention layers
from layer L on, Attention(Q_tgt, K_src, V_src) (L1160-1162, L1173-1176; controller in
`studio/attention/masactrl.py`).

The survey gives neither S nor L (methods.md defect 8). MasaCtrl's defaults for SD 1.x are S = 4 of
50 steps and layer 10 of 16 self-attention layers, the 4th of the 9 decoder layers. Left at None they
resolve to the same proportions of this run and this UNet: S = round(4 / 50 * steps), at least 1 so that
one step forms the layout freely, and L = round(decoder layers / 3) (SD 1.x: 3; ShapesWorld's 4 decoder
layers: 1).
"""

from __future__ import annotations

import torch

from ..attention.edit import attention_layers, install
from ..attention.masactrl import MutualSelfAttention
from .base import EditResult, EditSource, decode_image, elapsed, run_pair

DEFAULTS = {"start_step": None, "start_layer": None}


def _int_in(name, value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"masactrl: {name}={value!r} must be an integer in [{lo}, {hi}]")
    return value


def run(bundle, source: EditSource, target_prompt: str, p: dict, *, net, progress=None, t0=None):
    decoder = [l for l in attention_layers(net) if not l.is_cross and l.place == "up"]
    if not decoder:
        raise ValueError("masactrl: this UNet has no decoder self-attention layers")
    start_step = min(max(1, round(4 / 50 * source.steps)), source.steps - 1) if p["start_step"] is None else p["start_step"]
    start_layer = round(len(decoder) / 3) if p["start_layer"] is None else p["start_layer"]
    p = {"start_step": _int_in("start_step", start_step, 0, source.steps - 1),
         "start_layer": _int_in("start_layer", start_layer, 0, len(decoder) - 1)}
    ctl = MutualSelfAttention(p["start_step"], p["start_layer"])
    with torch.no_grad(), install(net, ctl):
        xs, xe, nfe = run_pair(bundle, source, bundle.encode_prompt([target_prompt]), controller=ctl,
                               progress=progress)
    return EditResult(method="masactrl", image=decode_image(bundle, xe), params=p, seconds=elapsed(t0), nfe=nfe,
                      latents=xe, source_latents=xs, source_image=decode_image(bundle, xs))
