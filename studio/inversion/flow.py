"""Flow inversion: the flow ODE integrated backwards with Euler, from the image (t = 0) to noise (t = 1).

The survey gives inversion for eps-diffusion only (§8.1, L1296-1342); the flow analogue is ours.
Sampling integrates dx/dt = u_theta(x, t), u = eps - x0 (§4.1, L455-467), from t = 1 to 0 with
Euler (`samplers.sample_flow_euler`): x_{i+1} = x_i + (t_{i+1} - t_i) u_theta(x_i, t_i). Inversion runs
the same Euler rule on the reversed noise levels, t_N = 0 -> t_0 = 1:

    x_i = x_{i+1} + (t_i - t_{i+1}) u_theta(x_{i+1}, t_{i+1}),

the velocity evaluated at the current state and its own time, as in the forward sampler. Each step
differs from the exact inverse of the sampling step by u(x_{i+1}, t_{i+1}) - u(x_i, t_i), so the
round-trip error is first order in the step size and shrinks with more steps.

`reverse_schedule` builds the reversed levels as a `Schedule`, so the same denoise callable
(`engine.GuidedDenoiser`) and sampler (`sample_flow_euler`) run the inversion unchanged.
"""

from __future__ import annotations

import torch

from ..samplers import sample_flow_euler
from ..schedules import Schedule


def reverse_schedule(schedule: Schedule) -> Schedule:
    """The levels of a flow schedule in reverse order, N -> 0, each with its own network time.

    Level k < N keeps the scheduler's timestep; the clean level N (t = sigma_N, 0 for the usual tables)
    gets sigma_N * num_train_timesteps, the time the flow schedulers assign to a noise level."""
    if schedule.kind != "flow":
        raise ValueError("reverse_schedule applies to flow-matching schedules (use DDIM inversion for diffusion)")
    n = len(schedule)
    clean_t = schedule.sigma[n] * schedule.num_train_timesteps
    timesteps = torch.cat([clean_t.reshape(1).to(schedule.timesteps.dtype), schedule.timesteps[1:].flip(0)])
    return Schedule("flow", timesteps, schedule.alpha.flip(0).clone(), schedule.sigma.flip(0).clone(),
                    schedule.num_train_timesteps)


def invert_flow(denoise, x: torch.Tensor, schedule: Schedule, *, callback=None, return_trajectory: bool = False):
    """`x` is the clean latent (level N of `schedule`); returns the latent at level 0 (t = 1) and, when
    asked, the trajectory x_N ... x_0. `denoise(x, k)` must be bound to `reverse_schedule(schedule)`
    (step k of the reversed schedule evaluates the network at level N - k)."""
    rev = reverse_schedule(schedule)
    traj = [x]

    def record(k, x_k, pred):
        traj.append(x_k)
        if callback is not None:
            callback(len(rev) - 1 - k, x_k)

    out = sample_flow_euler(denoise, x, rev, callback=record)
    return (out, traj) if return_trajectory else out
