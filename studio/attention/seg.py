"""Blurred-query self-attention for Smoothed Energy Guidance (survey §5.2.4, L820-839; Hong, 2024).

SEG smooths the energy landscape of self-attention with a Gaussian kernel of width sigma, implemented
as a blur of the queries over the 2-D token grid (L828: query blurring stands in for blurring the
attention weights, without quadratic cost). The queries (the output of `to_q`, per channel) are
convolved with a separable Gaussian, kernel size ceil(6 sigma) + 1 rounded up to odd and clipped to
the grid, with reflect padding, as the official SEG code and diffusers' SEG hook do. A sigma above
`INFINITE_BLUR` (9999, the official threshold) is infinite blur: every query becomes the grid mean
(uniform queries). (diffusers 0.42's `_gaussian_blur_2d` has the two cases the other way round; we
follow the official code, where a finite sigma blurs and an infinite one averages.)

The grid of a layer's N tokens comes from the latent size (halved down the UNet until it has N cells),
so non-square images work; keys, values and the rest of the layer are unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import RowSelection, RowSplitProcessor, attention_input, attention_output, token_grid

INFINITE_BLUR = 9999.0


def gaussian_kernel(size: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    half = (size - 1) / 2
    x = torch.linspace(-half, half, steps=size, dtype=torch.float64)
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    return (pdf / pdf.sum()).to(like)


def blur_tokens(tokens: torch.Tensor, grid: tuple[int, int], sigma: float) -> torch.Tensor:
    """Gaussian blur of (B, N, C) tokens laid out on the (h, w) grid, per channel; sigma > INFINITE_BLUR
    gives every token the grid mean."""
    b, n, c = tokens.shape
    h, w = grid
    img = tokens.transpose(1, 2).reshape(b, c, h, w)
    if sigma > INFINITE_BLUR:
        img = img.mean(dim=(-2, -1), keepdim=True).expand(b, c, h, w)
    else:
        size = math.ceil(6 * sigma) + 1
        size += 1 - size % 2  # odd
        kh, kw = min(size, h + 1 - h % 2), min(size, w + 1 - w % 2)  # reflect padding needs pad < side
        kernel = gaussian_kernel(kh, sigma, img)[:, None] * gaussian_kernel(kw, sigma, img)[None, :]
        img = F.pad(img, [kw // 2, kw // 2, kh // 2, kh // 2], mode="reflect")
        img = F.conv2d(img, kernel.expand(c, 1, kh, kw), groups=c)
    return img.reshape(b, c, n).transpose(1, 2)


class BlurredQuerySelfAttention(RowSplitProcessor):
    """Selected rows: scaled dot-product self-attention with the queries blurred over the token grid."""

    def __init__(self, inner, selection: RowSelection, sigma: float):
        super().__init__(inner, selection)
        self.sigma = sigma

    def perturbed(self, attn, hidden_states, attention_mask, temb):
        tokens, residual, shape4 = attention_input(attn, hidden_states, temb)
        b, n, _ = tokens.shape
        query = blur_tokens(attn.to_q(tokens), token_grid(n, self.selection.latent_size), self.sigma)
        key, value = attn.to_k(tokens), attn.to_v(tokens)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(b, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, n, b)
            attention_mask = attention_mask.view(b, attn.heads, -1, attention_mask.shape[-1])
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).to(query.dtype)
        return attention_output(attn, out, residual, shape4)
