"""Key/value reuse for background preservation (survey §7.2.3, L1189-1200; KV-Edit is the example).

In every self-attention layer the edit branch's keys and values are those of the source branch for
background tokens and its own for editable tokens (L1193-1195):

    (K, V) <- (K_reuse, V_reuse)   for background tokens,
    (K, V) <- (K_new, V_new)       for editable tokens.

The editable tokens are the user's mask on each layer's token grid (a token is editable when at least
half of its pixels are). Each edit row reads the source row of its own CFG pair.
"""

from __future__ import annotations

from typing import Callable

import torch

from .edit import AttentionController, LayerInfo


class KeyValueReuse(AttentionController):
    """`editable(h, w)` gives the bool (h, w) grid of editable tokens for a layer's token grid."""

    def __init__(self, editable: Callable[[int, int], torch.Tensor]):
        super().__init__()
        self.editable = editable
        self._cache: dict[tuple[int, int], torch.Tensor] = {}

    def wants(self, layer: LayerInfo) -> bool:
        return not layer.is_cross and bool(self.pairs)

    def background(self, n_tokens: int, device) -> torch.Tensor:
        hw = self.grid(n_tokens)
        if hw not in self._cache:
            self._cache[hw] = ~self.editable(*hw).reshape(-1)
        return self._cache[hw].to(device)

    def edit_qkv(self, layer, q, k, v):
        bg = self.background(k.shape[2], k.device).view(1, -1, 1)
        k, v = k.clone(), v.clone()
        for s, e in self.pairs:
            k[e] = torch.where(bg, k[s], k[e])
            v[e] = torch.where(bg, v[s], v[e])
        return q, k, v, tuple(e for _, e in self.pairs)
