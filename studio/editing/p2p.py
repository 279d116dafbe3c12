"""Prompt-to-Prompt editing (survey §7.2.1, L1111-1143; Hertz et al., 2022): four entry points.

The source and edit runs share x_T and run side by side in one batched forward (`base.run_pair`); the
controller (`studio/attention/p2p.py`) rebuilds the edit's cross-attention maps from the source's for
the steps before `cross_replace_steps` and, with `self_replace_steps`, copies its self-attention maps.
With a null-text inverted source both branches use null_t* as their unconditional branch (§8.2).

* p2p_swap (token replacement, L1129): prompts of the same token count; columns of equal tokens come
  from the source map, the swapped word's column from the target run, "Ã[:, col(dog)] = A_t[:, col(cat)],
  other columns ... copy from A_s". `swapped_columns="source"` gives the paper's own replacement
  instead, where the new word reads the old word's map (its `AttentionReplace` mapper).
* p2p_refine (insertion / deletion / reordering, L1131-1137): target tokens are aligned with source
  tokens (`tokens.align`, P2P's `seq_aligner`); aligned columns come from the source map, inserted
  tokens from the target's, and rows are re-normalised ("Re-normalize after insertion").
* p2p_reweight (attribute strengthening / weakening, L1133-1137): Ã[:, w] = factor * A[:, w] for the
  target prompt's `word` (one or more words; the target prompt defaults to the source's; a different one
  is aligned as in refinement first, P2P's `prev_controller`, and `word` then defaults to the words it
  adds). factor = 1 is the replay.
* p2p_local_blend: refinement plus the paper's local blend (`attention/p2p.py`): outside the mask of the
  `blend_words`' cross-attention (default: the words the edit deletes and inserts, as the paper's
  examples pick them), the edit latent is set to the source latent after every step from `start_blend`
  on. Every P2P method takes `blend_words` as an option too.

Defaults from the P2P notebooks (the survey gives none, methods.md defect 8): cross_replace_steps 0.8,
self_replace_steps 0.4, local-blend threshold 0.3 from 20% of the steps.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from ..attention.edit import install
from ..attention.p2p import PromptToPrompt
from ..attention.tokens import align, column_mapper, prompt_ids, prompt_tokens, sequence_length, token_columns
from .base import EditResult, EditSource, check_fraction, decode_image, elapsed, run_pair

COMMON = {"cross_replace_steps": 0.8, "self_replace_steps": 0.4, "blend_words": "", "blend_threshold": 0.3,
          "start_blend": 0.2}
DEFAULTS = {
    "p2p_swap": {**COMMON, "swapped_columns": "target"},
    "p2p_refine": dict(COMMON),
    "p2p_reweight": {**COMMON, "word": "", "factor": 2.0},
    "p2p_local_blend": dict(COMMON),
}


def words(value) -> list[str]:
    """Words from a list or a comma/space separated string."""
    if value is None:
        return []
    if isinstance(value, str):
        return [w for w in re.split(r"[,\s]+", value) if w]
    if isinstance(value, (list, tuple)):
        return [str(w).strip() for w in value if str(w).strip()]
    raise ValueError(f"blend_words must be a list of words or a comma-separated string, not {value!r}")


def changed_tokens(bundle, source_prompt: str, target_prompt: str) -> tuple[list[str], list[str]]:
    """(deleted source tokens, inserted target tokens) of the token alignment (`tokens.align`)."""
    src, tgt = prompt_ids(bundle, source_prompt), prompt_ids(bundle, target_prompt)
    a = align(src, tgt)
    s_tokens, t_tokens = prompt_tokens(bundle, source_prompt), prompt_tokens(bundle, target_prompt)
    kept = {i for i in a if i >= 0}
    return [s_tokens[i] for i in range(len(src)) if i not in kept], [t_tokens[j] for j, i in enumerate(a) if i < 0]


def _columns_in(bundle, prompt: str, word: str) -> list[int]:
    try:
        return token_columns(bundle, prompt, word)
    except ValueError:
        return []


def blend_columns(bundle, method: str, source_prompt: str, target_prompt: str, blend_words):
    """(source columns, target columns) of the local-blend words; each word is looked up in both prompts."""
    ws = words(blend_words)
    if not ws:
        return None
    cols_s, cols_t = [], []
    for w in ws:
        cs, ct = _columns_in(bundle, source_prompt, w), _columns_in(bundle, target_prompt, w)
        if not cs and not ct:
            raise ValueError(f"{method}: blend word {w!r} is in neither prompt (source tokens: "
                             f"{' '.join(prompt_tokens(bundle, source_prompt))}; target tokens: "
                             f"{' '.join(prompt_tokens(bundle, target_prompt))})")
        cols_s += cs
        cols_t += ct
    return sorted(set(cols_s)), sorted(set(cols_t))


def controller_for(bundle, method: str, source_prompt: str, target_prompt: str, p: dict) -> PromptToPrompt:
    length = sequence_length(bundle)
    src, tgt = prompt_ids(bundle, source_prompt), prompt_ids(bundle, target_prompt)
    weights = None
    if method == "p2p_swap":
        if len(src) != len(tgt):
            raise ValueError(f"p2p_swap: the prompts must have the same number of tokens (source {len(src)}: "
                             f"{' '.join(prompt_tokens(bundle, source_prompt))}; target {len(tgt)}: "
                             f"{' '.join(prompt_tokens(bundle, target_prompt))}); use p2p_refine for insertions")
        if p["swapped_columns"] not in ("target", "source"):
            raise ValueError(f"p2p_swap: swapped_columns={p['swapped_columns']!r} must be 'target' or 'source'")
        mapper = np.arange(length)
        from_source = np.ones(length, dtype=bool)
        if p["swapped_columns"] == "target":
            for j, (a, b) in enumerate(zip(src, tgt)):
                from_source[j + 1] = a == b
    else:
        mapper, from_source = column_mapper(src, tgt, length)
    deleted, inserted = changed_tokens(bundle, source_prompt, target_prompt)
    if method == "p2p_reweight":
        factor = p["factor"]
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not -10.0 <= factor <= 10.0:
            raise ValueError(f"p2p_reweight: factor={factor!r} must be a number in [-10, 10]")
        if not words(p["word"]):  # by default the words the target prompt adds
            if not inserted:
                raise ValueError("p2p_reweight needs params['word']: the word of the prompt whose attention to scale "
                                 "(the target adds no word to default to)")
            p["word"] = " ".join(inserted)
        weights = np.ones(length, dtype=np.float32)
        for w in words(p["word"]):
            for c in token_columns(bundle, target_prompt, w):
                weights[c] = float(factor)
    if method == "p2p_local_blend" and not words(p["blend_words"]):  # by default the words the edit changes
        if not deleted and not inserted:
            raise ValueError("p2p_local_blend needs params['blend_words']: the words whose attention marks the region "
                             "to edit (the prompts do not differ, so there are none to default to)")
        p["blend_words"] = " ".join(dict.fromkeys(deleted + inserted))
    blend = blend_columns(bundle, method, source_prompt, target_prompt, p["blend_words"])
    return PromptToPrompt(mapper, from_source, weights, cross_replace_steps=p["cross_replace_steps"],
                          self_replace_steps=p["self_replace_steps"], blend_columns=blend)


def run(bundle, source: EditSource, target_prompt: str, method: str, p: dict, *, net, progress=None, t0=None):
    for name in ("cross_replace_steps", "self_replace_steps", "blend_threshold", "start_blend"):
        p[name] = check_fraction(method, name, p[name])
    if method == "p2p_reweight" and not (target_prompt or "").strip():
        target_prompt = source.prompt
    ctl = controller_for(bundle, method, source.prompt, target_prompt, p)
    threshold, start_blend = p["blend_threshold"], p["start_blend"]
    n = source.steps

    def local_blend(i, x):
        if i / n < start_blend:  # the step's start, as a fraction of the run
            return x
        m = ctl.blend_mask(threshold)
        if m is None:
            return x
        m = m.to(x.device)[None, None]
        return torch.cat([x[:1], torch.where(m, x[1:], x[:1])])

    with torch.no_grad(), install(net, ctl):
        xs, xe, nfe = run_pair(bundle, source, bundle.encode_prompt([target_prompt]), controller=ctl,
                               post_step=local_blend if ctl.blend_columns is not None else None,
                               progress=progress)
    if isinstance(p["blend_words"], (list, tuple)):
        p["blend_words"] = list(p["blend_words"])
    mask = None
    if ctl.blend_columns is not None and ctl.blend_mask(threshold) is not None:
        from .base import image_mask

        mask = image_mask(ctl.blend_mask(threshold), source.height, source.width)
    return EditResult(method=method, image=decode_image(bundle, xe), params=p, seconds=elapsed(t0), nfe=nfe, mask=mask,
                      latents=xe, source_latents=xs, source_image=decode_image(bundle, xs))
