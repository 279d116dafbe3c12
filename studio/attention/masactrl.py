"""MasaCtrl's mutual self-attention controller (survey §7.2.2, L1145-1186; Cao et al., 2023).

From step S on, in the decoder's self-attention layers from layer L on, the edit branch's queries
attend to the source branch's keys and values (L1160-1162):

    Attention(Q_tgt, K_src, V_src) = softmax(Q_tgt K_src^T / sqrt(d)) V_src

Before step S ("Early steps: vanilla attention (to form new structure)", L1180) and in the other
layers the edit branch attends to itself. Each edit row reads the source row of its own CFG pair
(unconditional from unconditional, conditional from conditional), as MasaCtrl's code does. The
survey gives neither S nor L (methods.md defect 8); `studio.editing.masactrl` resolves the defaults.
"""

from __future__ import annotations

from .edit import AttentionController, LayerInfo


class MutualSelfAttention(AttentionController):
    def __init__(self, start_step: int, start_layer: int):
        super().__init__()
        self.start_step = int(start_step)
        self.start_layer = int(start_layer)

    def wants(self, layer: LayerInfo) -> bool:
        return (not layer.is_cross and layer.place == "up" and layer.decoder_index >= self.start_layer
                and self.step >= self.start_step and bool(self.pairs))

    def edit_qkv(self, layer, q, k, v):
        k, v = k.clone(), v.clone()
        for s, e in self.pairs:
            k[e], v[e] = k[s], v[s]
        return q, k, v, tuple(e for _, e in self.pairs)
