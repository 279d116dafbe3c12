"""Plug-and-Play feature and self-attention injection (survey §7.3.1, L1240-1262; Tumanyan et al., 2023).

The source branch's decoder features are written into the edit branch during the early steps
(L1251-1256):

    f_target <- f_source   (spatial features: the output of one decoder resnet block),
    A_target <- A_source   (self-attention maps of decoder layers),

the maps injected as the source's queries and keys, softmax(Q_src K_src^T) V_edit, as the PnP code
does (it replaces q and k). Injection stops after `feature_steps` / `attention_steps` (fractions of
the run: "early-to-mid stages ... stopped in the final steps", L1259-1260). Each edit row reads the
source row of its own CFG pair. `studio.editing.pnp` chooses the layers and runs the feature hook.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .edit import AttentionController, LayerInfo


class PlugAndPlay(AttentionController):
    def __init__(self, attention_layers: Sequence[str], feature_steps: float, attention_steps: float):
        super().__init__()
        self.attention_layers = set(attention_layers)
        self.feature_steps = float(feature_steps)
        self.attention_steps = float(attention_steps)

    def wants(self, layer: LayerInfo) -> bool:
        return (not layer.is_cross and layer.name in self.attention_layers
                and self.fraction < self.attention_steps and bool(self.pairs))

    def edit_qkv(self, layer, q, k, v):
        q, k = q.clone(), k.clone()
        for s, e in self.pairs:
            q[e], k[e] = q[s], k[s]
        return q, k, v, tuple(e for _, e in self.pairs)

    def feature_hook(self, module, inputs, output):
        """Forward hook on the chosen resnet: the edit rows' output becomes the source rows' (f_t <- f_s)."""
        if not self.pairs or self.fraction >= self.feature_steps or not isinstance(output, torch.Tensor):
            return None
        self.check_batch(output.shape[0])
        out = output.clone()
        for s, e in self.pairs:
            out[e] = output[s]
        return out
