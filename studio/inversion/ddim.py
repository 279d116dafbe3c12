"""DDIM inversion (survey §8.1, L1296-1342).

Runs the deterministic DDIM update backwards, from the clean latent x_N to x_0 (pure noise):

    x_{i} = alpha_i * x0_hat + sigma_i * eps_theta(x_{i+1}, t_i),   x0_hat = (x_{i+1} - sigma_{i+1} eps) / alpha_{i+1}

i.e. the survey's x_{t+1} = sqrt(abar_{t+1}) x0^(t) + sqrt(1 - abar_{t+1}) eps_theta(x_t, t), with the
approximation eps_theta(x_t, t) ~ eps_theta(x_{t+1}, t+1): the network is evaluated at the next
(noisier) timestep with the current, less noisy state.
"""

from __future__ import annotations

import torch

from ..schedules import Schedule


def invert_ddim(denoise, x: torch.Tensor, schedule: Schedule, *, callback=None, return_trajectory: bool = False):
    """`x` is the clean latent at level N; returns x at level 0 (and the trajectory x_N ... x_0)."""
    traj = [x]
    for i in reversed(range(len(schedule))):
        eps = denoise(x, i).eps
        a1, s1 = float(schedule.alpha[i + 1]), float(schedule.sigma[i + 1])
        a, s = float(schedule.alpha[i]), float(schedule.sigma[i])
        x0 = (x - s1 * eps) / a1
        x = a * x0 + s * eps
        traj.append(x)
        if callback is not None:
            callback(i, x)
    return (x, traj) if return_trajectory else x
