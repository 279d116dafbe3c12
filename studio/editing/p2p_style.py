"""Prompt-to-Prompt style injection, the layer blend (survey §7.2.1 table, L1139; methods.md row 31).

"a dog" -> "a dog in watercolor style" in the survey's example; here the target prompt must have the
same number of tokens as the source (as p2p_swap), so that the source's and the edit's cross-attention
maps have the same columns. The source and edit runs share x_T and run side by side (`base.run_pair`);
in every cross-attention layer l of the conditional edit row, for the steps before
`cross_replace_steps`, the controller (`studio/attention/p2p_style.py`) uses

    Ã^(l) = (1 - α) A_s^(l) + α A_t^(l)

with `alpha` = α ≈ 0.2 (the survey's value). α = 0 is p2p_swap's full replacement (every column from
the source, `swapped_columns="source"`, no self-attention replacement); α = 1 is no injection.
cross_replace_steps defaults to the P2P notebooks' 0.8 as for the other P2P methods (the survey gives
no window, methods.md defect 8). With a null-text inverted source both branches use null_t*.
"""

from __future__ import annotations

import torch

from ..attention.edit import install
from ..attention.p2p_style import StyleInjection
from ..attention.tokens import prompt_ids, prompt_tokens
from .base import EditResult, EditSource, check_fraction, decode_image, elapsed, run_pair

DEFAULTS = {"alpha": 0.2, "cross_replace_steps": 0.8}


def controller_for(bundle, source_prompt: str, target_prompt: str, p: dict) -> StyleInjection:
    src, tgt = prompt_ids(bundle, source_prompt), prompt_ids(bundle, target_prompt)
    if len(src) != len(tgt):
        raise ValueError(f"p2p_style: the prompts must have the same number of tokens (source {len(src)}: "
                         f"{' '.join(prompt_tokens(bundle, source_prompt))}; target {len(tgt)}: "
                         f"{' '.join(prompt_tokens(bundle, target_prompt))}): the blend mixes maps column by column")
    return StyleInjection(p["alpha"], cross_replace_steps=p["cross_replace_steps"], same_prompt=src == tgt)


def run(bundle, source: EditSource, target_prompt: str, p: dict, *, net, progress=None, t0=None):
    p["alpha"] = check_fraction("p2p_style", "alpha", p["alpha"])
    p["cross_replace_steps"] = check_fraction("p2p_style", "cross_replace_steps", p["cross_replace_steps"])
    ctl = controller_for(bundle, source.prompt, target_prompt, p)
    with torch.no_grad(), install(net, ctl):
        xs, xe, nfe = run_pair(bundle, source, bundle.encode_prompt([target_prompt]), controller=ctl,
                               progress=progress)
    return EditResult(method="p2p_style", image=decode_image(bundle, xe), params=p, seconds=elapsed(t0), nfe=nfe,
                      latents=xe, source_latents=xs, source_image=decode_image(bundle, xs))
