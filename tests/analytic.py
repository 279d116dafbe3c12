"""Exact denoisers for Gaussian data: the closed-form posterior mean E[x0 | x_t]."""

from __future__ import annotations

import torch

from studio.denoiser import Prediction


class GaussianDenoiser:
    """Data x0 ~ N(mu, diag(var)). For x = a x0 + s eps: E[x0|x] = mu + a var / (a^2 var + s^2) (x - a mu)."""

    def __init__(self, schedule, mu, var):
        self.schedule = schedule
        self.mu = torch.as_tensor(mu, dtype=torch.float64)
        self.var = torch.as_tensor(var, dtype=torch.float64)
        self.calls = 0

    def x0(self, x, a, s):
        return self.mu + a * self.var / (a * a * self.var + s * s) * (x - a * self.mu)

    def __call__(self, x, i):
        self.calls += 1
        a, s = float(self.schedule.alpha[i]), float(self.schedule.sigma[i])
        x0 = self.x0(x, a, s)
        eps = (x - a * x0) / max(s, 1e-12)
        return Prediction(x0, eps)
