"""Null-text inversion (survey §8.2, L1344-1419): per-step unconditional embeddings fitted to a pivot.

Stage I (L1350-1358), the pivot: DDIM inversion (§8.1) of x*_0 = E(I) with the source prompt c_src at
guidance scale w = 1 (the survey does not state w; the null-text paper inverts with w = 1), giving
x*_0, x*_1, ..., x*_T.

Stage II (L1362-1396): for every sampling step, from the noisiest, optimise the unconditional
embedding of classifier-free guidance at the editing scale w, keeping the model, the codec and c_src
frozen:

    eps_NTI(x_t, t, c, null_t) = eps_theta(x_t, t, null_t) + w [eps_theta(x_t, t, c) - eps_theta(x_t, t, null_t)]
    min_{null_t} || DDIMStep(x_t, t, c_src, null_t) - x*_{t-1} ||_2^2                       (L1390)

The recipe of the null-text paper (its public notebook, and diffusers' community pipeline
`pipeline_null_text_inversion.py`), followed here:

* x_t is the reconstruction's own state: x_T = x*_T, and after step t the state moves on with the
  optimised null_t (so each step corrects the error the previous ones left), while the target is the
  pivot x*_{t-1};
* null_t starts from the previous step's optimum (the empty-prompt embedding at the first step);
* Adam, at most `num_inner_steps` = 10 updates per step, learning rate 1e-2 (1 - i / 100) at step i
  of 50; the loss is the mean squared error over the latent;
* early stop: the updates of step i end once the loss (measured before the update) falls below
  epsilon + i * 2e-5 over 50 steps. The paper's notebook uses epsilon = 1e-5, the community pipeline
  1e-6; our default is 1e-5.

For other step counts N we scale both schedules to the run (ours): learning rate
1e-2 (1 - i / (2N)) and threshold epsilon + 1e-3 i / N, which equal the recipe's at N = 50.

Reconstruction (L1400-1406) starts from x*_T and samples with (c_src, null_t*, w); editing replaces
c_src by the target prompt and keeps null_t*. Flow models (ours, not in the survey) run the same
optimisation with the flow Euler step in place of DDIMStep and the flow inversion as the pivot.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..denoiser import Prediction, to_prediction
from ..families.base import Bundle, Conditioning
from ..samplers import ddim_step
from ..schedules import Schedule

NUM_INNER_STEPS = 10
EARLY_STOP_EPSILON = 1e-5
LEARNING_RATE = 1e-2


@dataclass
class NullTextFit:
    """{null_T*, ..., null_1*} of §8.2 (L1394): the optimised unconditional conditionings, one per
    sampling step (index 0 = the noisiest), with the record of their optimisation."""

    embeddings: list[Conditioning]
    inner_steps: list[int]  # Adam updates used at each step
    losses: list[list[float]]  # the loss before each update, per step
    step_errors: list[float]  # || DDIMStep(x_t, t, c_src, null_t*) - x*_{t-1} ||^2 (mean) after the updates
    nfe: int  # network forward passes (each inner update is one forward and one backward)
    seconds: float = 0.0
    final_latents: Optional[torch.Tensor] = field(default=None, repr=False)  # the reconstruction it ends on


def sampler_step(pred: Prediction, x: torch.Tensor, schedule: Schedule, i: int, sampler: str) -> torch.Tensor:
    """DDIMStep of §8.2 (L1382): sqrt(abar_{t-1}) x0_hat + sqrt(1 - abar_{t-1}) eps, from level i to i + 1;
    for flow models the flow Euler step x + (t_{i+1} - t_i)(eps - x0) (ours)."""
    if sampler == "flow_euler":
        return x + float(schedule.sigma[i + 1] - schedule.sigma[i]) * pred.velocity()
    if sampler == "ddim":
        return ddim_step(pred, x, schedule, i)
    raise ValueError(f"null-text inversion steps with ddim or flow_euler, not {sampler!r}")


def cfg(uncond: Prediction, cond: Prediction, w: float) -> Prediction:
    """eps_uncond + w (eps_cond - eps_uncond), applied to x0 and eps alike (affine, §4.1 L455)."""
    return Prediction(uncond.x0 + w * (cond.x0 - uncond.x0), uncond.eps + w * (cond.eps - uncond.eps))


def _detached(c: Conditioning) -> Conditioning:
    # conditionings come out of inference mode; clones are ordinary tensors that autograd may save
    return Conditioning({k: v.detach().clone() for k, v in c.tensors.items()})


def fit_null_text(bundle: Bundle, schedule: Schedule, pivot: Sequence[torch.Tensor], cond: Conditioning,
                  uncond: Conditioning, guidance_scale: float, *, sampler: str = "ddim",
                  num_inner_steps: int = NUM_INNER_STEPS, early_stop: bool = True,
                  early_stop_epsilon: float = EARLY_STOP_EPSILON, learning_rate: float = LEARNING_RATE,
                  optimize: Sequence[str] = ("encoder_hidden_states",),
                  callback: Optional[Callable[[int, int], None]] = None) -> NullTextFit:
    """Stage II of null-text inversion (§8.2 L1362-1396, the module docstring) over the pivot x*_0 ... x*_T
    (`pivot[k]` = x*_k: pivot[0] the clean latent, pivot[-1] the inverted noise), with the source
    conditioning `cond` and the starting unconditional conditioning `uncond` (the empty prompt). Only the
    tensors named in `optimize` change. `callback(i, n)` runs after each step and may raise to stop."""
    if num_inner_steps < 0:
        raise ValueError(f"num_inner_steps must be >= 0 (got {num_inner_steps})")
    t0 = time.perf_counter()
    n = len(schedule)
    if len(pivot) != n + 1:
        raise ValueError(f"the pivot has {len(pivot)} latents for {n} steps (expected {n + 1})")
    missing = [k for k in optimize if k not in uncond.tensors]
    if missing:
        raise ValueError(f"the unconditional conditioning has no {', '.join(missing)} to optimise "
                         f"(it has {', '.join(uncond.tensors)})")
    cond = _detached(cond)
    current = _detached(uncond)
    x = pivot[-1].detach().clone()
    w = float(guidance_scale)
    ptype = bundle.prediction_type
    nfe = 0
    out = NullTextFit([], [], [], [], 0)
    for i in range(n):
        target = pivot[n - 1 - i].detach()
        t = schedule.timesteps[i]
        a, s = schedule.alpha[i], schedule.sigma[i]
        with torch.no_grad():
            pred_c = to_prediction(bundle.model(x, t, cond), x, a, s, ptype)
        nfe += 1
        params = {k: v.detach().clone().requires_grad_(True) for k, v in current.tensors.items() if k in optimize}
        fixed = {k: v for k, v in current.tensors.items() if k not in optimize}
        lr = learning_rate * (1.0 - i / (2.0 * n))
        threshold = early_stop_epsilon + 1e-3 * i / n
        opt = torch.optim.Adam(list(params.values()), lr=lr)
        losses: list[float] = []
        with torch.enable_grad():
            for _ in range(num_inner_steps):
                c_u = Conditioning({**fixed, **params})
                pred_u = to_prediction(bundle.model(x, t, c_u), x, a, s, ptype)
                nfe += 1
                loss = F.mse_loss(sampler_step(cfg(pred_u, pred_c, w), x, schedule, i, sampler), target)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                if early_stop and losses[-1] < threshold:
                    break
        current = Conditioning({**fixed, **{k: v.detach() for k, v in params.items()}})
        with torch.no_grad():  # move on with the optimised embedding; its landing error is the step's result
            pred_u = to_prediction(bundle.model(x, t, current), x, a, s, ptype)
            x = sampler_step(cfg(pred_u, pred_c, w), x, schedule, i, sampler)
        nfe += 1
        out.embeddings.append(current)
        out.inner_steps.append(len(losses))
        out.losses.append(losses)
        out.step_errors.append(float(F.mse_loss(x, target)))
        if callback is not None:
            callback(i, n)
    out.nfe = nfe
    out.seconds = time.perf_counter() - t0
    out.final_latents = x
    return out
