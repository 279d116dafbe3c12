"""Prompt-to-Prompt's style injection, the "layer blend" (survey §7.2.1 table, L1139; methods.md row 31).

The source run (prompt c_src) and the edit run (prompt c_tgt, the same number of tokens) share x_T and
run in one batch. In the conditional edit row of every cross-attention layer l, for the steps before
`cross_replace_steps` (a fraction of the run), the edit's map is the blend

    Ã^(l) = (1 - α) A_s^(l) + α A_t^(l)        (α ≈ 0.2, "High-level blending")

of the source's map A_s and the edit run's own map A_t, and the output is W_O(Ã V_edit): the layout
comes mostly from the source, the values from the target prompt. After the window the edit row keeps
its own maps. Two ends are done without an explicit map so that nothing is rounded differently: α = 1
is no injection (the layer is left alone), and α = 0 (or identical prompts, where A_t = A_s) is
Ã = A_s = softmax(Q_src K_src^T), computed as the layer's own attention with the source row's queries
and keys and the edit row's values, exactly as p2p_swap's full replacement (`PromptToPrompt.copy_map`).
"""

from __future__ import annotations

from .edit import AttentionController, LayerInfo
from .p2p import source_qk


class StyleInjection(AttentionController):
    def __init__(self, alpha: float = 0.2, *, cross_replace_steps: float = 0.8, same_prompt: bool = False):
        super().__init__()
        self.alpha = float(alpha)
        self.cross_replace_steps = float(cross_replace_steps)
        self.copy_map = self.alpha == 0.0 or bool(same_prompt)  # Ã = A_s exactly

    def wants(self, layer: LayerInfo) -> bool:
        return (layer.is_cross and self.cond_pair is not None and self.alpha != 1.0
                and self.fraction < self.cross_replace_steps)

    def needs_probs(self, layer: LayerInfo) -> bool:
        return not self.copy_map

    def edit_qkv(self, layer, q, k, v):
        if not self.copy_map:
            return q, k, v, ()
        return source_qk(q, k, v, self.cond_pair)

    def forward(self, probs, layer):
        if self.copy_map:
            return probs, ()
        s, e = self.cond_pair
        probs = probs.clone()
        probs[e] = (1.0 - self.alpha) * probs[s] + self.alpha * probs[e]
        return probs, (e,)
