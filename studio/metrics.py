"""Image similarity measures shown under every reconstruction and edit.

PSNR (dB) over uint8 RGB images with peak 255, optionally inside a mask; SSIM as Wang et al. (2004):
luminance, contrast and structure with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03,
computed per channel on [0, 255] values and averaged over the valid (unpadded) window positions.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np


def _f64(a) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 2:
        a = a[..., None]
    return a.astype(np.float64)


def psnr(a, b, mask: Optional[np.ndarray] = None, peak: float = 255.0) -> float:
    """PSNR of two HxWx3 images; with `mask` (HxW, nonzero = counted) only over those pixels."""
    x, y = _f64(a), _f64(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in size: {x.shape} vs {y.shape}")
    d = (x - y) ** 2
    if mask is not None:
        m = np.asarray(mask).astype(bool)
        if m.shape != x.shape[:2]:
            raise ValueError(f"mask {m.shape} does not match the image {x.shape[:2]}")
        if not m.any():
            return float("nan")
        d = d[m]
    mse = float(d.mean())
    return float("inf") if mse == 0 else 10 * math.log10(peak * peak / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    r = np.arange(size) - (size - 1) / 2
    g = np.exp(-(r ** 2) / (2 * sigma * sigma))
    return g / g.sum()


def _filter_valid(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of a 2-D array with the 1-D window g along both axes."""
    k = len(g)
    rows = sum(g[i] * img[i:img.shape[0] - k + 1 + i, :] for i in range(k))
    return sum(g[j] * rows[:, j:rows.shape[1] - k + 1 + j] for j in range(k))


def ssim(a, b, peak: float = 255.0, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM of two images (HxW or HxWx3, same size, at least `window` pixels on each side)."""
    x, y = _f64(a), _f64(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in size: {x.shape} vs {y.shape}")
    if min(x.shape[:2]) < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window} pixels")
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    g = _gaussian_window(window, sigma)
    vals = []
    for ch in range(x.shape[2]):
        p, q = x[..., ch], y[..., ch]
        mp, mq = _filter_valid(p, g), _filter_valid(q, g)
        spp = _filter_valid(p * p, g) - mp * mp
        sqq = _filter_valid(q * q, g) - mq * mq
        spq = _filter_valid(p * q, g) - mp * mq
        s = ((2 * mp * mq + c1) * (2 * spq + c2)) / ((mp * mp + mq * mq + c1) * (spp + sqq + c2))
        vals.append(s.mean())
    return float(np.mean(vals))
