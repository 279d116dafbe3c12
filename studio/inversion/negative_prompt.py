"""Negative-prompt inversion (survey §8.3, L1421-1487): the source prompt stands in for null-text's optimum.

NPI replaces the per-step embeddings that null-text inversion optimises (§8.2) by the source prompt's
embedding, with no optimisation (L1427):

    null_t* ~ c_src.

Inversion is the DDIM inversion of §8.1 with c_src (the same pivot as null-text inversion). For
reconstruction, both CFG branches get c_src, and the guidance collapses (L1437-1443):

    eps_NPI-rec(x_t, t, c_src) = eps_theta(x_t, t, c_src) + w [eps_theta(x_t, t, c_src) - eps_theta(x_t, t, c_src)]
                               = eps_theta(x_t, t, c_src)    for every w,

so reconstructing at any w is the w = 1 conditional reconstruction. Editing swaps the conditional
prompt for the target and keeps c_src in the negative branch (L1451-1457):

    eps_NPI-edit = eps_theta(x_t, t, c_src) + w [eps_theta(x_t, t, c_tgt) - eps_theta(x_t, t, c_src)].

`reconstruct` in this package runs both branches through the usual CFG path, so the collapse is a
property of the run, not a shortcut in the code.
"""

from __future__ import annotations

from ..families.base import Bundle, Conditioning


def negative_prompt_conditioning(bundle: Bundle, source_prompts: list[str]) -> Conditioning:
    """The unconditional branch of NPI: the source prompt's own embedding (`encode_prompt`, not the
    family's empty-negative special case), null_t* = c_src for every step."""
    return bundle.encode_prompt(list(source_prompts))
