"""DDIM inversion (survey §8.1, L1296-1342).

Runs the deterministic DDIM update backwards, from the clean latent x_N to x_0 (pure noise):

    x_{i} = alpha_i * x0_hat + sigma_i * eps_theta(x_{i+1}, t_i),   x0_hat = (x_{i+1} - sigma_{i+1} eps) / alpha_{i+1}

i.e. the survey's x_{t+1} = sqrt(abar_{t+1}) x0^(t) + sqrt(1 - abar_{t+1}) eps_theta(x_t, t), with the
approximation eps_theta(x_t, t) ~ eps_theta(x_{t+1}, t+1): the network is evaluated at the next
(noisier) timestep with the current, less noisy state.

Which quantity is held fixed over the step matters for networks that do not predict eps. With
`prediction_type` given, the network's own output `out` (eps, v, x0 or the flow velocity) is held
fixed instead, and the step is the exact inverse of the DDIM sampling step under that approximation
(ours; for eps networks it is the formula above). The DDIM step (eta = 0) with a fixed output is
affine in the state, x_{i+1} = A_i x_i + B_i out (the prediction (x0, eps) is affine in x_i for a
fixed out, §4.1 L455-467), so

    x_i = (x_{i+1} - B_i out(x_{i+1}, t_i)) / A_i.

For v-prediction at zero terminal SNR (alpha_0 = 0) this keeps the network's last output, where
holding eps fixed gives eps = x and copies x_1 to x_0 unchanged.
"""

from __future__ import annotations

import torch

from ..denoiser import from_prediction, to_prediction
from ..schedules import Schedule


def step_coefficients(schedule: Schedule, i: int, prediction_type: str) -> tuple[float, float]:
    """(A, B) of the DDIM step i (eta = 0) for a network output held fixed: x_{i+1} = A x_i + B out."""
    a, s = schedule.alpha[i], schedule.sigma[i]
    a1, s1 = float(schedule.alpha[i + 1]), float(schedule.sigma[i + 1])
    one, zero = torch.ones((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    per_x = to_prediction(zero, one, a, s, prediction_type)  # d(x0, eps) / dx
    per_out = to_prediction(one, zero, a, s, prediction_type)  # d(x0, eps) / d out
    return float(a1 * per_x.x0 + s1 * per_x.eps), float(a1 * per_out.x0 + s1 * per_out.eps)


def invert_ddim(denoise, x: torch.Tensor, schedule: Schedule, *, callback=None, return_trajectory: bool = False,
                prediction_type: str | None = None):
    """`x` is the clean latent at level N; returns x at level 0 (and the trajectory x_N ... x_0).

    `denoise(x, i)` is bound to `schedule` (a `GuidedDenoiser` or an analytic denoiser). Without
    `prediction_type`, eps is held fixed over each step (the survey's form); with it, the network
    output of that type is (the module docstring)."""
    traj = [x]
    for i in reversed(range(len(schedule))):
        pred = denoise(x, i)
        a1, s1 = float(schedule.alpha[i + 1]), float(schedule.sigma[i + 1])
        a, s = float(schedule.alpha[i]), float(schedule.sigma[i])
        A = B = None
        if prediction_type is not None and prediction_type != "epsilon":
            A, B = step_coefficients(schedule, i, prediction_type)
        if A is not None and abs(A) > 1e-8:
            out = from_prediction(pred, a, s, prediction_type)
            x = (x - B * out) / A
        else:
            eps = pred.eps
            x0 = (x - s1 * eps) / a1
            x = a * x0 + s * eps
        traj.append(x)
        if callback is not None:
            callback(i, x)
    return (x, traj) if return_trajectory else x
