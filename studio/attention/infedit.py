"""infEdit's Unified Attention Control, UAC (survey §7.2.4, L1202-1227; methods.md row 34).

The survey writes attention as two operations between a branch's own attention (P, V) and an
"alternative" one (P', V') "from the reference/source context" (L1212-1220):

    attention modulation:  P_mod   = η P + (1 - η) P',             η ∈ [0, 1]
    attention merging:     A_merge = γ (P V) + (1 - γ) (P' V'),     γ ∈ [0, 1]

Here (P, V) are the edit branch's own map and values and (P', V') the source branch's, so η = γ = 1
is the unconstrained edit run and smaller values preserve more of the source. As the survey pairs them
with the two kinds of attention ("unify cross- and self-attention control"), this controller applies

* modulation in the cross-attention layers, conditional edit row only (as Prompt-to-Prompt): P' is the
  source's map with its columns aligned to the target prompt's tokens (`tokens.column_mapper`,
  P2P's refinement alignment; a target token with no source token takes the edit's own column, and
  the rows of P' are re-normalised then), and the output is W_O(P_mod V_edit);
* merging in the self-attention layers, every source/edit pair (unconditional and conditional, as
  MasaCtrl): the edit row's attention output, before W_O, is γ (P_e V_e) + (1 - γ) (P_s V_s) with
  P_s V_s the source row's own self-attention output (W_O is affine, so this is also the merge after it).

Both act for the steps before `control_steps` (a fraction of the run); the survey's schedule of (η, γ)
over layers and timesteps is reduced to that window (it gives no schedule). η = 1 leaves the
cross-attention layers alone and γ = 1 the self-attention layers, without any explicit computation, so
η = γ = 1 is the unconstrained target run exactly. With identical prompts the branches coincide
(P' = P, P'V' = PV) and the controller leaves every layer alone, so the edit is the source replay.
"""

from __future__ import annotations

import numpy as np
import torch

from .edit import AttentionController, LayerInfo


class UnifiedAttentionControl(AttentionController):
    def __init__(self, mapper: np.ndarray, from_source: np.ndarray, *, eta: float = 0.5, gamma: float = 0.5,
                 control_steps: float = 1.0, same_prompt: bool = False):
        super().__init__()
        self.mapper = torch.as_tensor(np.asarray(mapper), dtype=torch.long)
        self.from_source = torch.as_tensor(np.asarray(from_source), dtype=torch.bool)
        self.renormalize = not bool(self.from_source.all())
        self.eta, self.gamma = float(eta), float(gamma)
        self.control_steps = float(control_steps)
        self.same_prompt = bool(same_prompt)

    def wants(self, layer: LayerInfo) -> bool:
        if self.same_prompt or self.fraction >= self.control_steps or not self.pairs:
            return False
        if layer.is_cross:
            return self.eta != 1.0 and self.cond_pair is not None
        return self.gamma != 1.0

    def needs_probs(self, layer: LayerInfo) -> bool:
        return layer.is_cross

    def edit_qkv(self, layer, q, k, v):
        if layer.is_cross:
            return q, k, v, ()
        return q, k, v, tuple(e for _, e in self.pairs)  # own projections; the output is merged below

    def forward(self, probs, layer):
        s, e = self.cond_pair
        src, own = probs[s], probs[e]  # (heads, N, L)
        mapper, keep = self.mapper.to(probs.device), self.from_source.to(probs.device)
        alt = torch.where(keep, src.index_select(-1, mapper), own)
        if self.renormalize:
            alt = alt / alt.sum(-1, keepdim=True).clamp_min(1e-12)
        probs = probs.clone()
        probs[e] = self.eta * own + (1.0 - self.eta) * alt
        return probs, (e,)

    def merge_rows(self, layer: LayerInfo) -> dict:
        if layer.is_cross:
            return {}
        return {e: (s, self.gamma) for s, e in self.pairs}
