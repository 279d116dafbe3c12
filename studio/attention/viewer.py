"""The attention viewer: where a prompt word acts in the image (survey §7.2.1, L1113-1115, "cross-attention
maps are strongly correlated with where each word appears in the image").

`cross_attention_map` replays the source (x*_T sampled back under its own prompt, as
`studio.editing.reconstruct_source`) with a recorder on the chosen cross-attention layers, and returns
the conditional branch's attention probability to the chosen token, averaged over heads, layers (each
resized to the image) and the chosen steps, scaled by its maximum (as Prompt-to-Prompt's
`show_cross_attention` displays maps).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from .base import attention_network
from .edit import attention_layers, install, match_layers
from .store import CrossAttentionStore
from .tokens import prompt_tokens as _prompt_tokens, token_columns


def prompt_tokens(bundle, prompt: str) -> list[str]:
    """The tokens of `prompt` a user can pick for `cross_attention_map` (one per word for ShapesWorld)."""
    return _prompt_tokens(bundle, prompt)


def cross_attention_layers(bundle) -> list[str]:
    """Names of the UNet's cross-attention layers, in down, mid, up order (choices for `layers`)."""
    return [l.name for l in attention_layers(attention_network(bundle, "attention viewer")) if l.is_cross]


def cross_attention_map(bundle, source, token: Union[str, int], *, layers: Optional[Sequence[str]] = None,
                        steps: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
    """HxW float32 in [0, 1] at the source's image resolution: the cross-attention probability of `token`
    (a word of the source prompt, every occurrence, or an index into `prompt_tokens`), averaged over the
    `layers` (patterns of layer names, e.g. "up", "down_blocks.0"; None: all) and over the steps whose
    share of the run meets `steps` = (start, end) fractions, recorded while replaying the source, then
    divided by its maximum."""
    from ..editing.base import replay

    lo, hi = (float(s) for s in steps)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"steps={steps!r} must be fractions 0 <= start <= end <= 1")
    net = attention_network(bundle, "attention viewer")
    cross = [l for l in attention_layers(net) if l.is_cross]
    chosen = match_layers(cross, layers, "cross-attention")
    cols = token_columns(bundle, source.prompt, token)
    store = CrossAttentionStore(cols, [l.name for l in chosen], (lo, hi), (source.height, source.width))
    with torch.no_grad(), install(net, store):
        replay(bundle, source, controller=store)
    m = store.result()
    m = m / m.max().clamp_min(1e-12)
    return m.clamp(0, 1).cpu().numpy().astype(np.float32)
