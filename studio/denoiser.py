"""The denoiser: one place where network outputs turn into every parameterization (survey §4.1, L455-467).

A network predicts one of
  - "epsilon": the noise eps,
  - "v_prediction": v = alpha * eps - sigma * x0 (variance-preserving schedules),
  - "sample": the clean x0,
  - "flow": the rectified-flow velocity u = eps - x0 (state x = (1 - t) x0 + t eps),
for the state x = alpha * x0 + sigma * eps. `Prediction` holds x0 and eps, from which every other
quantity follows; the conversions are affine in the network output for a fixed x, which is why
classifier-free guidance combines identically in every space.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


@dataclass
class Prediction:
    x0: torch.Tensor
    eps: torch.Tensor

    def velocity(self) -> torch.Tensor:
        """Rectified-flow velocity eps - x0."""
        return self.eps - self.x0

    def v(self, alpha, sigma) -> torch.Tensor:
        """Variance-preserving v = alpha * eps - sigma * x0."""
        return alpha * self.eps - sigma * self.x0

    def as_(self, target: str, alpha=None, sigma=None) -> torch.Tensor:
        if target == "x0" or target == "sample":
            return self.x0
        if target in ("eps", "epsilon"):
            return self.eps
        if target == "flow":
            return self.velocity()
        if target == "v_prediction":
            return self.v(alpha, sigma)
        raise ValueError(f"unknown parameterization {target!r}")

    @staticmethod
    def combine(preds: list["Prediction"], weights: list[float]) -> "Prediction":
        """Affine combination sum_k w_k * pred_k of several predictions (weights should sum to 1)."""
        x0 = sum(w * p.x0 for p, w in zip(preds, weights))
        eps = sum(w * p.eps for p, w in zip(preds, weights))
        return Prediction(x0, eps)


def to_prediction(out: torch.Tensor, x: torch.Tensor, alpha, sigma, prediction_type: str) -> Prediction:
    """Network output `out` at state x = alpha * x0 + sigma * eps -> Prediction(x0, eps)."""
    alpha = torch.as_tensor(alpha, dtype=x.dtype)
    sigma = torch.as_tensor(sigma, dtype=x.dtype)
    if prediction_type == "epsilon":
        return Prediction((x - sigma * out) / alpha.clamp_min(1e-12), out)
    if prediction_type == "v_prediction":
        return Prediction(alpha * x - sigma * out, sigma * x + alpha * out)
    if prediction_type == "sample":
        return Prediction(out, (x - alpha * out) / sigma.clamp_min(1e-12))
    if prediction_type == "flow":
        return Prediction(x - sigma * out, x + alpha * out)
    raise ValueError(f"unknown prediction type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def from_prediction(pred: Prediction, alpha, sigma, prediction_type: str) -> torch.Tensor:
    """Inverse of `to_prediction`: the network output that would give `pred`."""
    return pred.as_({"epsilon": "eps", "sample": "x0"}.get(prediction_type, prediction_type), alpha, sigma)
