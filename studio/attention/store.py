"""A recorder of cross-attention maps (survey §7.2.1, L1113-1115: "cross-attention maps are strongly
correlated with where each word appears"), for the attention viewer.

During a run it keeps, for the chosen layers and steps, the conditional row's probability of attending
to chosen text columns, averaged over heads and summed over the columns, resized to the output size
and accumulated; the output of every layer is left untouched (the processor's explicit path writes no row).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .edit import AttentionController, LayerInfo


class CrossAttentionStore(AttentionController):
    def __init__(self, columns: Sequence[int], layers: Sequence[str], steps: tuple[float, float],
                 size: tuple[int, int]):
        super().__init__()
        self.columns = list(columns)
        self.layers = set(layers)
        self.steps = (float(steps[0]), float(steps[1]))
        self.size = tuple(size)
        self.total = None
        self.count = 0

    def reset(self) -> None:
        super().reset()
        self.total, self.count = None, 0

    def recording(self) -> bool:
        """Step i covers [i / n, (i + 1) / n) of the run; it is recorded when that meets [lo, hi] (lo = hi:
        the one step containing lo)."""
        lo, hi = self.steps
        i, n = self.step, max(1, self.num_steps)
        if lo == hi:
            return i == min(int(lo * n), n - 1)
        return i / n < hi and (i + 1) / n > lo

    def wants(self, layer: LayerInfo) -> bool:
        return layer.is_cross and layer.name in self.layers and self.cond_pair is not None and self.recording()

    def needs_probs(self, layer: LayerInfo) -> bool:
        return True

    def forward(self, probs, layer):
        row = self.cond_pair[0]
        m = probs[row].mean(0)[:, self.columns].sum(-1)
        h, w = self.grid(probs.shape[2])
        m = F.interpolate(m.view(1, 1, h, w).float(), size=self.size, mode="bilinear", align_corners=False)[0, 0]
        self.total = m if self.total is None else self.total + m
        self.count += 1
        return probs, ()

    def result(self) -> torch.Tensor:
        if self.total is None:
            raise ValueError("no cross-attention map was recorded: no chosen layer ran in the chosen steps")
        return self.total / self.count
