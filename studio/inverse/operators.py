"""Forward operators A of the inverse problems of survey §6.1 (y = A(x) + eta), on images in [-1, 1],
shape (B, 3, H, W), with their projections onto {x : A x = y} for hard data consistency (§6.4).

- `inpaint`: A x = m * x, m = 1 on the known pixels (a mask); projection: x <- m y + (1 - m) x.
- `super_resolution`: A = average pooling by `factor` (4 by default); projection: x <- x + U(y - A x),
  with U nearest-neighbour upsampling, for which A U = I, so A (projection) = y exactly.
- `deblur`: A = Gaussian blur (sigma, periodic boundary, applied in the Fourier domain); projection:
  x <- x + A^+(y - A x), with the pseudo-inverse A^+ = H* / (|H|^2 + eps) (eps regularises the
  frequencies the blur nearly removes, so the projection is exact up to eps there).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

OPERATORS = ("inpaint", "super_resolution", "deblur")
MASKS = ("center", "left_half", "right_half", "top_half", "bottom_half", "random")


def make_mask(kind: str, height: int, width: int, *, seed: int = 0, known_fraction: float = 0.3) -> torch.Tensor:
    """(1, 1, H, W) mask of KNOWN pixels (1) for inpainting; the named region is the one to fill in."""
    m = torch.ones(1, 1, height, width)
    h2, w2 = height // 2, width // 2
    if kind == "center":
        m[..., height // 4: height // 4 + h2, width // 4: width // 4 + w2] = 0
    elif kind == "left_half":
        m[..., :, :w2] = 0
    elif kind == "right_half":
        m[..., :, w2:] = 0
    elif kind == "top_half":
        m[..., :h2, :] = 0
    elif kind == "bottom_half":
        m[..., h2:, :] = 0
    elif kind == "random":
        g = torch.Generator().manual_seed(seed)
        m = (torch.rand(1, 1, height, width, generator=g) < known_fraction).float()
    else:
        raise ValueError(f"unknown mask {kind!r}; choose one of {', '.join(MASKS)}")
    return m


def gaussian_otf(sigma: float, height: int, width: int) -> torch.Tensor:
    """Fourier transform (H, W) of a periodic, normalised Gaussian kernel of std `sigma` pixels."""
    ys = torch.fft.fftfreq(height) * height
    xs = torch.fft.fftfreq(width) * width
    k = torch.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * sigma**2))
    return torch.fft.fft2(k / k.sum())


@dataclass
class Operator:
    kind: str
    height: int
    width: int
    mask: torch.Tensor | None = None  # inpaint: known pixels
    factor: int = 4  # super_resolution
    sigma: float = 2.0  # deblur
    eps: float = 1e-3  # deblur pseudo-inverse regulariser

    @staticmethod
    def build(kind: str, height: int, width: int, *, mask: str = "center", factor: int = 4, sigma: float = 2.0,
              seed: int = 0) -> "Operator":
        if kind not in OPERATORS:
            raise ValueError(f"unknown operator {kind!r}; choose one of {', '.join(OPERATORS)}")
        if kind == "super_resolution" and (factor < 2 or height % factor or width % factor):
            raise ValueError(f"super-resolution factor {factor} must be >= 2 and divide the size {width}x{height}")
        if kind == "deblur" and not 0.1 <= sigma <= 10:
            raise ValueError(f"blur sigma {sigma} is outside [0.1, 10]")
        return Operator(kind, height, width, make_mask(mask, height, width, seed=seed) if kind == "inpaint" else None,
                        factor, sigma)

    def _otf(self, x):
        return gaussian_otf(self.sigma, self.height, self.width).to(x.device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """A(x), differentiable."""
        if self.kind == "inpaint":
            return x * self.mask.to(x)
        if self.kind == "super_resolution":
            return F.avg_pool2d(x, self.factor)
        return torch.fft.ifft2(torch.fft.fft2(x.float()) * self._otf(x)).real.to(x.dtype)

    def project(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Pi_S(x): the nearest point (in the operator's own sense above) with A x = y."""
        if self.kind == "inpaint":
            m = self.mask.to(x)
            return m * y + (1 - m) * x
        if self.kind == "super_resolution":
            return x + F.interpolate(y - self(x), scale_factor=self.factor, mode="nearest")
        H = self._otf(x)
        r = torch.fft.fft2((y - self(x)).float())
        return x + torch.fft.ifft2(r * H.conj() / (H.abs() ** 2 + self.eps)).real.to(x.dtype)

    def degrade(self, x: torch.Tensor, noise: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """The measurement y = A(x) + eta, eta ~ N(0, noise^2) (noise in the [-1, 1] image scale)."""
        y = self(x)
        if noise > 0:
            y = y + noise * torch.randn(y.shape, generator=generator).to(y)
        return y

    def visualize(self, y: torch.Tensor) -> torch.Tensor:
        """The measurement shown as a full-size image (upsampled, unknown pixels gray)."""
        if self.kind == "super_resolution":
            return F.interpolate(y, scale_factor=self.factor, mode="nearest")
        return y
