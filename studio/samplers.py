"""Samplers: small pure functions over a denoise callable (survey Part I, §2.1 item 5 and §4.1).

Each sampler integrates the reverse process on the schedule's state x_i = alpha_i x0 + sigma_i eps:

    x = sampler(denoise, x, schedule, generator=..., callback=...)

`denoise(x, i)` returns a `Prediction` (x0, eps) for the state x at step i, already guided:
guidance, energies and model deltas live inside it, so every sampler works unchanged with every
control. `callback(i, x, pred)` runs after each step (previews, progress); it may raise to stop the
run between steps (cooperative interrupt). No model loading, no globals.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .denoiser import Prediction
from .schedules import Schedule

Denoise = Callable[[torch.Tensor, int], Prediction]
Callback = Optional[Callable[[int, torch.Tensor, Prediction], None]]


def _noise_like(x: torch.Tensor, generator) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device) if generator is not None \
        else torch.randn_like(x)


def _c(v, x):
    return torch.as_tensor(float(v), dtype=x.dtype, device=x.device)


def ddim_step(pred: Prediction, x: torch.Tensor, schedule: Schedule, i: int, eta: float = 0.0, generator=None) -> torch.Tensor:
    """One DDIM step (Song et al.; survey §8.1 uses its deterministic eta = 0 form):
    x_{i+1} = alpha_{i+1} x0 + sqrt(sigma_{i+1}^2 - s^2) eps + s z,
    s = eta * sqrt(sigma_{i+1}^2 / sigma_i^2) * sqrt(1 - alpha_i^2 / alpha_{i+1}^2)  (VP schedules)."""
    a, s = schedule.alpha[i], schedule.sigma[i]
    a1, s1 = schedule.alpha[i + 1], schedule.sigma[i + 1]
    noise_std = 0.0
    if eta > 0 and s > 0 and a1 > 0:
        noise_std = eta * float(torch.sqrt((s1**2 / s**2) * (1 - a**2 / a1**2)).clamp_min(0))
    out = _c(a1, x) * pred.x0 + _c(float(torch.sqrt((s1**2 - noise_std**2).clamp_min(0))), x) * pred.eps
    if noise_std > 0:
        out = out + noise_std * _noise_like(x, generator)
    return out


def sample_ddim(denoise: Denoise, x: torch.Tensor, schedule: Schedule, *, eta: float = 0.0, generator=None,
                callback: Callback = None) -> torch.Tensor:
    """DDIM (eta = 0: deterministic probability-flow ODE step; eta = 1: DDPM-like ancestral noise)."""
    for i in range(len(schedule)):
        pred = denoise(x, i)
        x = ddim_step(pred, x, schedule, i, eta, generator)
        if callback is not None:
            callback(i, x, pred)
    return x


def sample_euler(denoise: Denoise, x: torch.Tensor, schedule: Schedule, *, generator=None,
                 callback: Callback = None) -> torch.Tensor:
    """Euler on the probability-flow ODE in the variance-exploding variable y = x / alpha,
    sigma_VE = sigma / alpha (Karras et al.): y' = y + (sigma'_VE - sigma_VE) * eps.
    Written in x, this is x' = alpha' * (x0 + sigma'_VE * eps) = alpha' x0 + sigma' eps, which stays
    finite at zero terminal SNR where sigma_VE is infinite."""
    for i in range(len(schedule)):
        pred = denoise(x, i)
        x = _c(schedule.alpha[i + 1], x) * pred.x0 + _c(schedule.sigma[i + 1], x) * pred.eps
        if callback is not None:
            callback(i, x, pred)
    return x


def sample_euler_ancestral(denoise: Denoise, x: torch.Tensor, schedule: Schedule, *, generator=None,
                           callback: Callback = None) -> torch.Tensor:
    """Euler ancestral (k-diffusion): step down to sigma_down with Euler, then add sigma_up noise, where
    sigma_up = sqrt(s'^2 (s^2 - s'^2) / s^2), sigma_down = sqrt(s'^2 - sigma_up^2) in VE sigmas."""
    for i in range(len(schedule)):
        pred = denoise(x, i)
        a1 = schedule.alpha[i + 1]
        ve = schedule.sigma[i] / schedule.alpha[i] if schedule.alpha[i] > 0 else torch.tensor(float("inf"), dtype=torch.float64)
        ve1 = schedule.sigma[i + 1] / a1
        ratio = 1.0 if torch.isinf(ve) else float((ve**2 - ve1**2) / ve**2)
        up = float(torch.sqrt((ve1**2 * ratio).clamp_min(0)))
        down = float(torch.sqrt((ve1**2 - up**2).clamp_min(0)))
        x = _c(a1, x) * (pred.x0 + down * pred.eps)
        if up > 0:
            x = x + float(a1) * up * _noise_like(x, generator)
        if callback is not None:
            callback(i, x, pred)
    return x


def sample_dpmpp_2m(denoise: Denoise, x: torch.Tensor, schedule: Schedule, *, generator=None,
                    callback: Callback = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al.), data prediction, midpoint form, first order on the first and
    last steps (as diffusers' DPMSolverMultistepScheduler with final sigma 0):
        x_{i+1} = (s_{i+1}/s_i) x_i - a_{i+1} (e^{-h} - 1) D,   h = lambda_{i+1} - lambda_i, lambda = log(a/s),
        D = x0_i + (x0_i - x0_{i-1}) / (2 r),  r = h_{i-1} / h_i."""
    prev_x0 = None
    prev_h = None
    n = len(schedule)
    for i in range(n):
        pred = denoise(x, i)
        a, s = schedule.alpha[i], schedule.sigma[i]
        a1, s1 = schedule.alpha[i + 1], schedule.sigma[i + 1]
        if s1 == 0:  # final step onto the data: first order gives x0
            x = pred.x0.clone()
            h = None
        else:
            # e^{-h} = (a s1) / (s a1): finite when a = 0 (zero terminal SNR), where h = inf.
            emh = float(a * s1 / (s * a1))
            h = float(torch.log(a1 / s1) - torch.log(a / s)) if a > 0 else float("inf")
            D = pred.x0
            if prev_x0 is not None and prev_h is not None and h != float("inf") and prev_h != float("inf") and i < n - 1:
                r = prev_h / h
                D = pred.x0 + (pred.x0 - prev_x0) / (2 * r)
            x = _c(s1 / s, x) * x - _c(a1 * (emh - 1.0), x) * D
        prev_x0, prev_h = pred.x0, h
        if callback is not None:
            callback(i, x, pred)
    return x


def sample_flow_euler(denoise: Denoise, x: torch.Tensor, schedule: Schedule, *, generator=None,
                      callback: Callback = None) -> torch.Tensor:
    """Euler on the flow ODE dx/dt = u(x, t) with u = eps - x0 (survey §4.1 flow form):
    x_{i+1} = x_i + (t_{i+1} - t_i) u_i."""
    for i in range(len(schedule)):
        pred = denoise(x, i)
        x = x + _c(schedule.sigma[i + 1] - schedule.sigma[i], x) * pred.velocity()
        if callback is not None:
            callback(i, x, pred)
    return x


def sample_flow_heun(denoise: Denoise, x: torch.Tensor, schedule: Schedule, *, generator=None,
                     callback: Callback = None) -> torch.Tensor:
    """Heun (trapezoidal predictor-corrector) on the flow ODE; the last step, onto t = 0, is Euler.
    Costs two network evaluations per step except the last: the corrector evaluates the Euler
    prediction at the next grid point, `denoise(x_euler, i + 1)`."""
    n = len(schedule)
    for i in range(n):
        pred = denoise(x, i)
        dt = schedule.sigma[i + 1] - schedule.sigma[i]
        u = pred.velocity()
        x_euler = x + _c(dt, x) * u
        if i + 1 < n:
            u2 = denoise(x_euler, i + 1).velocity()
            x = x + _c(dt, x) * 0.5 * (u + u2)
        else:
            x = x_euler
        if callback is not None:
            callback(i, x, pred)
    return x


SAMPLERS = {
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "dpmpp_2m": sample_dpmpp_2m,
    "flow_euler": sample_flow_euler,
    "flow_heun": sample_flow_heun,
}


def nfe_per_step(sampler: str) -> float:
    """Network evaluations per step per guidance branch (Heun evaluates twice except on its last step)."""
    return 2.0 if sampler == "flow_heun" else 1.0
