"""Measurement guidance, hard data consistency (survey §6.4, L1037-1044; projection / prox template).

    x <- x + dt u_base(x, t),   x <- Pi_S(x),   S = {x : A x = y}                  (§6.4)

applied to the clean estimate of each step (operator splitting on x0_hat, as DDNM-style solvers do):
x0' = Pi_S(x0_hat) in pixel space, then the sampler steps with (x0', eps). The last step lands on
x0' itself, so the output satisfies A x = y exactly when the codec is exact (ShapesWorld; up to the
VAE for SD) and, for deblurring, up to the pseudo-inverse's regulariser. Space: x0 (pixels).

Parameters as the soft template (`measurement_soft.py`) without a step size. `MeasurementBase`, shared
by both, loads the ground-truth image, checks its size against the run, takes the measurement and
reports PSNR.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..denoiser import Prediction
from ..inverse.operators import MASKS, OPERATORS, Operator
from .base import Guidance, StepInfo, check_range, register


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = float((a.float() - b.float()).pow(2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(4.0 / mse)


def load_image(path: str, height: int, width: int) -> torch.Tensor:
    """An RGB image file as (1, 3, H, W) in [-1, 1]; it must have the run's size (one clear line if not)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            arr = np.asarray(im)
    except FileNotFoundError:
        raise FileNotFoundError(f"measurement image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"measurement image {path}: cannot read it as an image ({type(e).__name__})") from None
    if arr.shape[:2] != (height, width):
        raise ValueError(f"the measurement image is {arr.shape[1]}x{arr.shape[0]}, but this run makes {width}x{height} "
                         f"images: use an image of the output size")
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1.0


@dataclass
class MeasurementBase(Guidance):
    guidance_scale: float = 1.0
    operator_name: str = "inpaint"
    image: str = ""
    mask: str = "center"
    factor: int = 4
    sigma: float = 2.0
    noise: float = 0.0
    seed: int = 0  # measurement noise and random masks

    needs_grad = False

    def validate(self) -> None:
        super().validate()
        if self.operator_name not in OPERATORS:
            raise ValueError(f"{self.name}: operator_name={self.operator_name!r}; choose one of {', '.join(OPERATORS)}")
        if self.mask not in MASKS:
            raise ValueError(f"{self.name}: mask={self.mask!r}; choose one of {', '.join(MASKS)}")
        if not self.image:
            raise ValueError(f"{self.name}: give the ground-truth image the measurement is taken from (image=...)")
        check_range(self.name, "noise", self.noise, 0.0, 1.0)

    def branches(self, step: StepInfo) -> tuple[str, ...]:
        return ("cond",) if self.guidance_scale == 1.0 else ("uncond", "cond")

    def base_prediction(self, preds: dict[str, Prediction]) -> Prediction:
        c = preds["cond"]
        if "uncond" not in preds:
            return c
        u, w = preds["uncond"], self.guidance_scale
        return Prediction(u.x0 + w * (c.x0 - u.x0), u.eps + w * (c.eps - u.eps))

    def __call__(self, preds, step, x):
        return self.combine(preds, step, x)  # data consistency acts on every step

    @contextlib.contextmanager
    def patch(self, bundle):
        self._bundle = bundle
        yield

    def prepare(self, bundle, height: int, width: int) -> None:
        """Load the ground truth and take the measurement for a run of this size (called by the engine)."""
        self._bundle = bundle
        self._truth = load_image(self.image, height, width).to(bundle.device)
        self.operator = Operator.build(self.operator_name, height, width, mask=self.mask, factor=self.factor,
                                       sigma=self.sigma, seed=self.seed)
        g = torch.Generator().manual_seed(self.seed)
        self._y = self.operator.degrade(self._truth, self.noise, g)

    def metrics(self, images: torch.Tensor) -> dict:
        """PSNR of the output against the ground truth, and of A(output) against the measurement."""
        out = images.float().clamp(-1, 1)
        truth = self._truth.to(out)
        return {"psnr": round(psnr(out, truth.expand_as(out)), 2),
                "measurement_psnr": round(psnr(self.operator(out), self._y.to(out).expand_as(self.operator(out))), 2)}

    def measurement_image(self) -> torch.Tensor:
        return self.operator.visualize(self._y)


@register
@dataclass
class MeasurementHard(MeasurementBase):
    name = "measurement_hard"
    space = "x0 (pixels)"

    def combine(self, preds: dict[str, Prediction], step: StepInfo, x: torch.Tensor) -> Prediction:
        base = self.base_prediction(preds)
        img = self._bundle.decode(base.x0)
        projected = self.operator.project(img.float(), self._y.to(img.device)).to(img.dtype)
        return Prediction(self._bundle.encode(projected), base.eps)
