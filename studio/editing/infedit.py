"""infEdit's Unified Attention Control (survey §7.2.4, L1202-1227; methods.md row 34).

Attention modulation P_mod = η P + (1 - η) P' in the cross-attention layers and attention merging
A_merge = γ (P V) + (1 - γ) (P' V') in the self-attention layers, (P, V) the edit branch's own and
(P', V') the source branch's (controller and details in `studio/attention/infedit.py`), for the steps
before `control_steps`.

The survey does not describe infEdit's inversion-free sampler (its denoising diffusion consistent
model; methods.md: "NOT described in the survey"), so this runs UAC on the usual `EditSource` (a
generated image or an inverted one) with the source and edit branches side by side from the shared x_T
(`base.run_pair`), as Prompt-to-Prompt does; it is not inversion-free.

Defaults: the survey gives η, γ ∈ [0, 1] and no values (nor does methods.md), so eta = 0.5
(cross-attention modulation) and gamma = 0.5 (self-attention merging), half way between the source and
the edit; control_steps = 1.0 (the whole run; the survey's per-layer/timestep schedule of (η, γ) is
not given). η = γ = 1 is the unconstrained target-prompt run.
"""

from __future__ import annotations

import torch

from ..attention.edit import install
from ..attention.infedit import UnifiedAttentionControl
from ..attention.tokens import column_mapper, prompt_ids, sequence_length
from .base import EditResult, EditSource, check_fraction, decode_image, elapsed, run_pair

DEFAULTS = {"eta": 0.5, "gamma": 0.5, "control_steps": 1.0}


def controller_for(bundle, source_prompt: str, target_prompt: str, p: dict) -> UnifiedAttentionControl:
    src, tgt = prompt_ids(bundle, source_prompt), prompt_ids(bundle, target_prompt)
    mapper, from_source = column_mapper(src, tgt, sequence_length(bundle))
    return UnifiedAttentionControl(mapper, from_source, eta=p["eta"], gamma=p["gamma"],
                                   control_steps=p["control_steps"], same_prompt=src == tgt)


def run(bundle, source: EditSource, target_prompt: str, p: dict, *, net, progress=None, t0=None):
    for name in ("eta", "gamma", "control_steps"):
        p[name] = check_fraction("infedit_uac", name, p[name])
    ctl = controller_for(bundle, source.prompt, target_prompt, p)
    with torch.no_grad(), install(net, ctl):
        xs, xe, nfe = run_pair(bundle, source, bundle.encode_prompt([target_prompt]), controller=ctl,
                               progress=progress)
    return EditResult(method="infedit_uac", image=decode_image(bundle, xe), params=p, seconds=elapsed(t0), nfe=nfe,
                      latents=xe, source_latents=xs, source_image=decode_image(bundle, xs))
