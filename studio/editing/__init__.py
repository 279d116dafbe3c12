"""Inference-time image editing (survey §7, L1048-1265) on a frozen model, as a library.

    source = source_from_generation(bundle, "a red circle on the left on a gray background", seed=3)
    # or: source = EditSource.from_inversion(invert(bundle, image, prompt, "null_text"), image)
    result = edit(bundle, source, "p2p_swap", "a blue circle on the left on a gray background")
    result.image, result.nfe, result.seconds, result.params

Methods (`METHODS`), one file each:

* "sdedit" (§7.1, `sdedit.py`): noise x*_0 to t0 = strength * T, denoise under the target prompt.
* "p2p_swap", "p2p_refine", "p2p_reweight", "p2p_local_blend" (§7.2.1, `p2p.py`): Prompt-to-Prompt's
  cross-attention injection, the source and edit runs side by side; local blend is also an option
  (`blend_words`) of the other three.
* "p2p_style" (§7.2.1 table, L1139, `p2p_style.py`): style injection, the cross-attention layer blend
  Ã = (1 - α) A_s + α A_t (α ≈ 0.2), prompts of the same token count.
* "masactrl" (§7.2.2, `masactrl.py`): mutual self-attention, Q_edit with the source's K, V.
* "kv_reuse" (§7.2.3, `kv_reuse.py`): background K, V from the source pass (needs a mask).
* "infedit_uac" (§7.2.4, `infedit.py`): infEdit's unified attention control, cross-attention modulation
  P_mod = η P + (1 - η) P' and self-attention merging γ (P V) + (1 - γ) (P' V') with the source branch
  (on the usual paired source/edit runs: the survey does not describe infEdit's inversion-free sampler).
* "pnp" (§7.3.1, `pnp.py`): decoder feature and self-attention injection in the early steps.
* "diffedit" (`diffedit.py`): a mask from the noise predictions under the two prompts, then blended
  denoising from the inverted latents; the computed mask comes back in `EditResult.mask`.
* "blended" (route 7.4 / §12.4.7, `blended.py`): a user mask; outside it the latent is reset to the
  source trajectory after every step.

Flow-matching models take sdedit, blended and diffedit. The attention methods install processors on
the UNet for the run only and restore the same processor objects afterwards, also when the run fails
or is stopped. `callback(i, n)` reports progress after network step i (0-based) of the n the edit runs
(DiffEdit's noise draws, then the denoising steps); `should_stop()` stops between steps (raising
`studio.engine.Interrupted`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..attention.base import attention_network
from . import blended, diffedit, infedit, kv_reuse, masactrl, p2p, p2p_style, pnp, sdedit
from .base import EditResult, EditSource, Progress, check_mask, decode_image, replay, source_from_generation


@dataclass
class MethodInfo:
    name: str
    section: str
    label: str
    defaults: dict
    needs_mask: bool
    needs_target_prompt: bool
    help: str


_P2P_HELP = ("cross_replace_steps / self_replace_steps: fractions of the run during which the source's cross- / "
             "self-attention maps are injected; blend_words: words whose attention marks the region to edit "
             "(local blend; blend_threshold, start_blend)")

METHODS: dict[str, MethodInfo] = {
    "sdedit": MethodInfo(
        "sdedit", "§7.1", "SDEdit", dict(sdedit.DEFAULTS), False, True,
        "Noise the source to t0 = strength * T, then denoise under the target prompt. strength 0 keeps the source, "
        "1 generates anew; seed draws the noise."),
    "p2p_swap": MethodInfo(
        "p2p_swap", "§7.2.1", "Prompt-to-Prompt: word swap", dict(p2p.DEFAULTS["p2p_swap"]), False, True,
        "Swap words keeping the token count ('red circle' -> 'blue circle'): the edit reuses the source's "
        "cross-attention maps; the swapped word's map comes from the target run (swapped_columns='target', the "
        "survey's table) or from the old word (swapped_columns='source', the paper's replacement). " + _P2P_HELP),
    "p2p_refine": MethodInfo(
        "p2p_refine", "§7.2.1", "Prompt-to-Prompt: refinement", dict(p2p.DEFAULTS["p2p_refine"]), False, True,
        "Insert, delete or reorder words ('a circle' -> 'a large circle'): aligned tokens keep the source's maps, "
        "new tokens take the target's. " + _P2P_HELP),
    "p2p_reweight": MethodInfo(
        "p2p_reweight", "§7.2.1", "Prompt-to-Prompt: reweighting", dict(p2p.DEFAULTS["p2p_reweight"]), False, False,
        "Scale the attention to a word (word, factor; factor > 1 strengthens, < 1 weakens). The target prompt "
        "defaults to the source prompt; with another one, word defaults to the words it adds. " + _P2P_HELP),
    "p2p_local_blend": MethodInfo(
        "p2p_local_blend", "§7.2.1", "Prompt-to-Prompt: local blend", dict(p2p.DEFAULTS["p2p_local_blend"]), False,
        True,
        "Refinement plus a local blend: outside the cross-attention mask of blend_words (looked up in both "
        "prompts; default: the words the edit changes) the edit keeps the source latent. " + _P2P_HELP),
    "p2p_style": MethodInfo(
        "p2p_style", "§7.2.1", "Prompt-to-Prompt: style injection", dict(p2p_style.DEFAULTS), False, True,
        "Layer blend of the cross-attention maps, Ã = (1 - alpha) A_source + alpha A_target (the survey's alpha "
        "0.2), during the first cross_replace_steps of the run; the prompts must have the same number of tokens. "
        "alpha 0 copies the source's maps (p2p_swap's full replacement), 1 is no injection."),
    "masactrl": MethodInfo(
        "masactrl", "§7.2.2", "MasaCtrl (mutual self-attention)", dict(masactrl.DEFAULTS), False, True,
        "From step start_step on, decoder self-attention layers from start_layer on read the source's keys and "
        "values: new layout from the prompt, appearance from the source. None picks MasaCtrl's proportions "
        "(4 of 50 steps; the 4th of 9 decoder layers)."),
    "kv_reuse": MethodInfo(
        "kv_reuse", "§7.2.3", "KV reuse (background preservation)", dict(kv_reuse.DEFAULTS), True, True,
        "Self-attention keys and values outside the mask come from the source pass, inside from the edit. "
        "keep_background also resets the latent outside the mask to the source's after every step."),
    "infedit_uac": MethodInfo(
        "infedit_uac", "§7.2.4", "infEdit: unified attention control", dict(infedit.DEFAULTS), False, True,
        "Cross-attention modulation P_mod = eta P_edit + (1 - eta) P_source (source columns aligned to the target "
        "tokens) and self-attention merging gamma (P V)_edit + (1 - gamma) (P V)_source, during the first "
        "control_steps of the run; eta = gamma = 1 is the plain target run. Runs beside the source replay "
        "(infEdit's inversion-free sampler is not in the survey)."),
    "pnp": MethodInfo(
        "pnp", "§7.3.1", "Plug-and-Play features", dict(pnp.DEFAULTS), False, True,
        "Inject the source's decoder resnet features (feature_layer, first feature_steps of the run) and "
        "self-attention maps (decoder layers from start_layer, first attention_steps) into the edit."),
    "diffedit": MethodInfo(
        "diffedit", "§12.4.7 (route 7.4)", "DiffEdit (automatic mask)", dict(diffedit.DEFAULTS), False, True,
        "The mask is where the noise predictions under the source and target prompts differ (num_noise_draws "
        "draws at mask_strength, clamped at clamp_ratio x mean, thresholded); then masked denoising from the "
        "inverted latents at strength. A user mask, if given, replaces the computed one."),
    "blended": MethodInfo(
        "blended", "route 7.4 (§12.4.7)", "Blended latent denoising (mask)", dict(blended.DEFAULTS), True, True,
        "Inside the mask the target prompt repaints; outside, the latent is reset to the source trajectory after "
        "every step, so the background is the source's exactly."),
}

FLOW_METHODS = ("sdedit", "blended", "diffedit")
MASK_OPTIONAL = ("diffedit",)  # a painted mask replaces the computed one; an empty one is no mask
ATTENTION_METHODS = ("p2p_swap", "p2p_refine", "p2p_reweight", "p2p_local_blend", "p2p_style", "masactrl", "kv_reuse",
                     "infedit_uac", "pnp")


def _check(bundle, source: EditSource, method: str, target_prompt, mask):
    if method not in METHODS:
        raise ValueError(f"unknown editing method {method!r}; choose one of {', '.join(METHODS)}")
    if not isinstance(source, EditSource):
        raise ValueError(f"the source must be an EditSource (got {type(source).__name__})")
    source.check()
    if bundle.kind == "flow" and method not in FLOW_METHODS:
        raise ValueError(f"{method} is not available for flow-matching models; use {', '.join(FLOW_METHODS)}")
    if (bundle.kind == "flow") != (source.sampler == "flow_euler"):
        raise ValueError(f"the source was sampled with {source.sampler}, which does not fit this "
                         f"{'flow-matching' if bundle.kind == 'flow' else 'diffusion'} model")
    info = METHODS[method]
    if target_prompt is not None and not isinstance(target_prompt, str):
        raise ValueError(f"the target prompt must be text (got {type(target_prompt).__name__})")
    if info.needs_target_prompt and not (target_prompt or "").strip():
        raise ValueError(f"{method} needs a target prompt")
    if info.needs_mask:
        return check_mask(method, mask, source.height, source.width)
    if method in MASK_OPTIONAL and mask is not None and np.asarray(mask).any():
        return check_mask(method, mask, source.height, source.width)
    return None  # the other methods take no mask: one painted for another method in the same request is ignored


def edit(bundle, source: EditSource, method: str, target_prompt: str, *, params: Optional[dict] = None,
         mask: Optional[np.ndarray] = None, callback=None, should_stop=None) -> EditResult:
    """Edit `source` toward `target_prompt` with `method` (see `METHODS[method].help` and the method's file).

    `params` overrides `METHODS[method].defaults` (unknown names raise ValueError); `mask` (HxW at the
    source's image resolution, white = edit) is required by kv_reuse and blended and optional for
    diffedit (an empty one computes the mask); the other methods ignore it. The result's `params` are the settings used, with defaults resolved, and can be passed back.
    """
    t0 = time.perf_counter()
    mask = _check(bundle, source, method, target_prompt, mask)
    from .base import resolve_params

    p = resolve_params(method, METHODS[method].defaults, params)
    kw = {"progress": Progress(callback, should_stop), "t0": t0}
    if method == "sdedit":
        return sdedit.run(bundle, source, target_prompt, p, **kw)
    if method == "blended":
        return blended.run(bundle, source, target_prompt, p, mask, **kw)
    if method == "diffedit":
        return diffedit.run(bundle, source, target_prompt, p, mask, **kw)
    net = attention_network(bundle, method)
    if method == "p2p_style":
        return p2p_style.run(bundle, source, target_prompt, p, net=net, **kw)
    if method == "infedit_uac":
        return infedit.run(bundle, source, target_prompt, p, net=net, **kw)
    if method.startswith("p2p_"):
        return p2p.run(bundle, source, target_prompt, method, p, net=net, **kw)
    if method == "masactrl":
        return masactrl.run(bundle, source, target_prompt, p, net=net, **kw)
    if method == "kv_reuse":
        return kv_reuse.run(bundle, source, target_prompt, p, mask, net=net, **kw)
    return pnp.run(bundle, source, target_prompt, p, net=net, **kw)


def reconstruct_source(bundle, source: EditSource) -> np.ndarray:
    """The unedited replay of the source (x*_T sampled back under its own prompt, scale and unconditional
    branch): what the attention methods run beside the edit and compare against."""
    x, _ = replay(bundle, source)
    return decode_image(bundle, x)


__all__ = ["METHODS", "MethodInfo", "EditSource", "EditResult", "edit", "source_from_generation", "reconstruct_source",
           "FLOW_METHODS", "ATTENTION_METHODS"]
