"""A self-attention map recorder for Self-Attention Guidance (survey §5.2.2, L766-792; Hong et al., 2023).

SAG reads the self-attention maps A_t of one layer to build its mask (the middle block's first
self-attention layer, as diffusers' SAG pipeline does). This processor leaves the layer's output
untouched (the layer's own processor runs on the whole batch) and, for the selected rows, also
computes the attention probabilities softmax(Q K^T * scale), per head, and keeps them with the layer's
token grid for the guidance to read after the forward.
"""

from __future__ import annotations

from typing import Optional

import torch

from .base import RowSelection, inner_call_kwargs, attention_input, token_grid


class AttentionMapRecorder:
    """Runs the layer's own processor; keeps `maps` (rows, heads, N, N) of the selected rows and `grid`."""

    def __init__(self, inner, selection: RowSelection):
        self.inner = inner
        self.selection = selection
        self.maps: Optional[torch.Tensor] = None
        self.grid: Optional[tuple[int, int]] = None

    def reset(self) -> None:
        self.maps, self.grid = None, None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        out = self.inner(attn, hidden_states, **inner_call_kwargs(encoder_hidden_states, attention_mask, temb, kwargs))
        selected = self.selection.for_batch(hidden_states.shape[0])
        if selected:
            pick = torch.tensor(selected, device=hidden_states.device)
            tokens, _, _ = attention_input(attn, hidden_states.index_select(0, pick),
                                           None if temb is None else temb.index_select(0, pick))
            b, n, _ = tokens.shape
            query, key = attn.to_q(tokens), attn.to_k(tokens)
            head_dim = key.shape[-1] // attn.heads
            query, key = (t.view(b, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key))
            if attn.norm_q is not None:
                query = attn.norm_q(query)
            if attn.norm_k is not None:
                key = attn.norm_k(key)
            scores = query.float() @ key.float().transpose(-1, -2) * (head_dim ** -0.5)
            self.maps = scores.softmax(dim=-1)
            self.grid = token_grid(n, self.selection.latent_size)
        return out
