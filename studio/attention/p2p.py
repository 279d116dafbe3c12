"""Prompt-to-Prompt's attention controller (survey §7.2.1, L1111-1143; Hertz et al., 2022).

The source run (prompt c_src) and the edit run (prompt c_tgt) share x_T and run in one batch. In the
conditional rows of every cross-attention layer, for the steps before `cross_replace_steps` (a fraction
of the run), the edit's map is rebuilt column by column from the source's (L1127-1139):

    A_edit[:, j] = A_src[:, mapper[j]]   where target column j is aligned with a source column,
    A_edit[:, j] = A_tgt[:, j]           where it is new (a swapped or inserted word),

the survey's masked merge A_edit = M * A_src + (1 - M) * A_tgt (L1123) with M selecting the preserved
columns; the rows are re-normalised when some columns come from the target (the table's "re-normalize
after insertion"). Reweighting scales columns, A_edit[:, j] *= factor_j (L1131-1137), without
re-normalising. After the window the edit run keeps its own maps. When every column comes from the
same source column (identical prompts, or the paper's replacement of one word by another), A_edit =
softmax(Q_src K_src^T) is computed as the layer's own attention with the source row's queries and keys
(and the edit row's values), so that no explicit map is rounded differently. `self_replace_steps` (the paper's
second knob; the survey gives none of these fractions, methods.md defect 8) replaces the edit's
self-attention maps by the source's for the early steps in layers of at most 16x16 tokens (the P2P
code's rule), done as Q and K taken from the source row: softmax(Q_src K_src^T) V_edit.

Local blend (the paper's §3.3 "LocalBlend"; the survey's table has no row for it): the cross-attention
maps of chosen words, summed over those words, averaged over heads and layers (each resized to the
latent grid) and accumulated over the steps so far, are max-pooled (3x3), scaled by their maximum and
thresholded; the source's and the edit's masks are united, and after each step from `start_blend` on
the edit latent outside the mask is set to the source latent: x_edit <- x_src + m (x_edit - x_src).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .edit import AttentionController, LayerInfo

SELF_REPLACE_MAX_TOKENS = 16 * 16



def source_qk(q, k, v, pair):
    """The edit row takes the source row's queries and keys, so its attention map is the source's
    (P2P's map copy, §7.2.1); returns (q, k, v, edited rows) as a controller's `edit_qkv` does."""
    s, e = pair
    q, k = q.clone(), k.clone()
    q[e], k[e] = q[s], k[s]
    return q, k, v, (e,)

class PromptToPrompt(AttentionController):
    """Cross-attention column mapping, reweighting and self-attention replacement on the conditional pair.

    mapper, from_source: per target column, its source column and whether it takes it (`tokens.column_mapper`);
    weights: per target column, the reweighting factor (1 = unchanged);
    blend_columns: (source columns, target columns) of the local-blend words, or None for no local blend.
    """

    def __init__(self, mapper: np.ndarray, from_source: np.ndarray, weights: Optional[np.ndarray] = None, *,
                 cross_replace_steps: float = 0.8, self_replace_steps: float = 0.4,
                 blend_columns: Optional[tuple[Sequence[int], Sequence[int]]] = None):
        super().__init__()
        self.mapper = torch.as_tensor(np.asarray(mapper), dtype=torch.long)
        self.from_source = torch.as_tensor(np.asarray(from_source), dtype=torch.bool)
        if weights is not None and np.all(np.asarray(weights) == 1.0):
            weights = None
        self.weights = None if weights is None else torch.as_tensor(np.asarray(weights), dtype=torch.float32)
        self.renormalize = not bool(self.from_source.all())
        # every column from the same source column: A_edit = A_src = softmax(Q_src K_src^T), done as Q and K
        # taken from the source row (exactly the layer's own attention computation, no explicit map)
        self.copy_map = (not self.renormalize and self.weights is None
                         and bool((self.mapper == torch.arange(len(self.mapper))).all()))
        self.cross_replace_steps = float(cross_replace_steps)
        self.self_replace_steps = float(self_replace_steps)
        self.blend_columns = blend_columns
        self.blend_sum: Optional[torch.Tensor] = None  # (2, h, w): source and edit word maps, summed over steps
        self._step_maps: list[torch.Tensor] = []

    def reset(self) -> None:
        super().reset()
        self.blend_sum, self._step_maps = None, []

    def replacing_cross(self) -> bool:
        return self.fraction < self.cross_replace_steps

    def replacing_self(self, layer: LayerInfo, n_tokens: Optional[int] = None) -> bool:
        return self.fraction < self.self_replace_steps and (n_tokens is None or n_tokens <= SELF_REPLACE_MAX_TOKENS)

    def wants(self, layer: LayerInfo) -> bool:
        if self.cond_pair is None:
            return False
        if layer.is_cross:
            return self.replacing_cross() or self.blend_columns is not None
        return self.replacing_self(layer)

    def needs_probs(self, layer: LayerInfo) -> bool:
        return layer.is_cross and (self.blend_columns is not None or not self.copy_map)

    def edit_qkv(self, layer, q, k, v):
        if layer.is_cross:
            if not (self.copy_map and self.replacing_cross()):
                return q, k, v, ()
        elif not self.replacing_self(layer, q.shape[2]):
            return q, k, v, ()
        return source_qk(q, k, v, self.cond_pair)

    def forward(self, probs, layer):
        s, e = self.cond_pair
        if self.blend_columns is not None:
            self._record(probs, s, e)
        if self.copy_map or not self.replacing_cross():
            return probs, ()
        src, tgt = probs[s], probs[e]  # (heads, N, L)
        mapper, keep = self.mapper.to(probs.device), self.from_source.to(probs.device)
        new = torch.where(keep, src.index_select(-1, mapper), tgt)
        if self.renormalize:
            new = new / new.sum(-1, keepdim=True).clamp_min(1e-12)
        if self.weights is not None:
            new = new * self.weights.to(new.device, new.dtype)
        probs = probs.clone()
        probs[e] = new
        return probs, (e,)

    # --- local blend
    def _record(self, probs: torch.Tensor, s: int, e: int) -> None:
        cols_s, cols_t = self.blend_columns
        maps = []
        for row, cols in ((s, cols_s), (e, cols_t)):
            if cols:
                m = probs[row].mean(0)[:, list(cols)].sum(-1)
            else:
                m = probs.new_zeros(probs.shape[2])
            maps.append(m)
        h, w = self.grid(probs.shape[2])
        lat = self.latent_size or (h, w)
        m = torch.stack(maps).view(2, 1, h, w)
        if (h, w) != tuple(lat):
            m = F.interpolate(m, size=tuple(lat), mode="bilinear", align_corners=False)
        self._step_maps.append(m[:, 0])

    def between_steps(self) -> None:
        if self._step_maps:
            step = torch.stack(self._step_maps).mean(0)
            self.blend_sum = step if self.blend_sum is None else self.blend_sum + step
            self._step_maps = []
        super().between_steps()

    def blend_mask(self, threshold: float) -> Optional[torch.Tensor]:
        """The local-blend mask (h, w) on the latent grid from the maps recorded so far (union of the
        source's and the edit's), or None before any recording."""
        if self.blend_sum is None:
            return None
        m = F.max_pool2d(self.blend_sum[:, None], kernel_size=3, stride=1, padding=1)[:, 0]
        peak = m.flatten(1).max(1).values.clamp_min(1e-12).view(2, 1, 1)
        masks = (m / peak) > threshold
        if not self.blend_columns[0]:
            masks[0] = False
        if not self.blend_columns[1]:
            masks[1] = False
        return masks[0] | masks[1]
