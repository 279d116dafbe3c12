"""Plug-and-Play editing (survey §7.3.1, L1240-1262; Tumanyan et al., 2023).

The source branch reads the source's trajectory x*_t at every step (PnP's source pass denoises the
inverted latents; `inject_from="replay"` lets it evolve as a replay instead), the edit branch runs
under the target prompt from the shared x_T, both in one batched forward (`base.run_pair`). During
the early steps the edit branch's decoder features are overwritten with the source's (L1251-1256):

    f_target <- f_source   for the first `feature_steps` of the run, at `feature_layer` (the output of
                           one decoder resnet; PnP: the second resnet of the second up block),
    A_target <- A_source   for the first `attention_steps` of the run, in the decoder self-attention
                           layers from `start_layer` on (PnP: all decoder layers but the first).

Injection is confined to the decoder and to the early-to-mid steps (L1258-1260). The survey gives no
fractions (methods.md defect 8): PnP's defaults are 0.8 for features and 0.5 for attention.
"""

from __future__ import annotations

import torch

from ..attention.edit import attention_layers, forward_hook, install
from ..attention.pnp import PlugAndPlay
from .base import EditResult, EditSource, check_fraction, decode_image, elapsed, run_pair

DEFAULTS = {"feature_steps": 0.8, "attention_steps": 0.5, "feature_layer": "up_blocks.1.resnets.1", "start_layer": 1,
            "inject_from": "trajectory"}


def run(bundle, source: EditSource, target_prompt: str, p: dict, *, net, progress=None, t0=None):
    p["feature_steps"] = check_fraction("pnp", "feature_steps", p["feature_steps"])
    p["attention_steps"] = check_fraction("pnp", "attention_steps", p["attention_steps"])
    if p["inject_from"] not in ("trajectory", "replay"):
        raise ValueError(f"pnp: inject_from={p['inject_from']!r} must be 'trajectory' or 'replay'")
    modules = dict(net.named_modules())
    resnets = [n for n, m in modules.items() if n.startswith("up_blocks") and n.split(".")[-2:-1] == ["resnets"]]
    if p["feature_layer"] not in modules or p["feature_layer"] not in resnets:
        raise ValueError(f"pnp: feature_layer={p['feature_layer']!r} is not a decoder resnet of this UNet; "
                         f"choose one of {', '.join(resnets)}")
    decoder = [l for l in attention_layers(net) if not l.is_cross and l.place == "up"]
    start = p["start_layer"]
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < max(1, len(decoder)):
        raise ValueError(f"pnp: start_layer={start!r} must be an integer in [0, {len(decoder) - 1}]")
    ctl = PlugAndPlay([l.name for l in decoder[start:]], p["feature_steps"], p["attention_steps"])
    with torch.no_grad(), install(net, ctl), forward_hook(modules[p["feature_layer"]], ctl.feature_hook):
        xs, xe, nfe = run_pair(bundle, source, bundle.encode_prompt([target_prompt]), controller=ctl,
                               source_states=p["inject_from"], progress=progress)
    return EditResult(method="pnp", image=decode_image(bundle, xe), params=p, seconds=elapsed(t0), nfe=nfe,
                      latents=xe, source_latents=xs,
                      source_image=decode_image(bundle, xs) if p["inject_from"] == "replay" else None)
