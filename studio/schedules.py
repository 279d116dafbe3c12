"""Sampling schedules read from diffusers schedulers' tables (survey Part I, §2).

Every sampler here works on the state x_i = alpha_i * x0 + sigma_i * eps (variance preserving
diffusion: alpha = sqrt(abar), sigma = sqrt(1 - abar); rectified flow: alpha = 1 - t, sigma = t)
and steps from (alpha_i, sigma_i) to (alpha_{i+1}, sigma_{i+1}) after evaluating the model at
`timesteps[i]`. The tables come from the diffusers scheduler that matches the sampler, built from
the model's own scheduler config, so our timesteps and noise levels equal diffusers' own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Which diffusers scheduler class provides the timestep/noise table of each sampler.
SAMPLER_SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "flow_euler": "FlowMatchEulerDiscreteScheduler",
    "flow_heun": "FlowMatchEulerDiscreteScheduler",
}
FLOW_SAMPLERS = ("flow_euler", "flow_heun")
DIFFUSION_SAMPLERS = ("ddim", "euler", "euler_a", "dpmpp_2m")


@dataclass(frozen=True)
class Schedule:
    kind: str  # "vp" (diffusion) or "flow"
    timesteps: torch.Tensor  # (N,) the time input of the network at each step
    alpha: torch.Tensor  # (N + 1,) signal coefficient, float64
    sigma: torch.Tensor  # (N + 1,) noise coefficient, float64
    num_train_timesteps: int = 1000

    def __len__(self) -> int:
        return len(self.timesteps)

    def t(self, i: int) -> float:
        """Normalised time in [0, 1] of step i (1 = pure noise); used by time-scheduled guidance."""
        return float(self.timesteps[i]) / self.num_train_timesteps


def _class(name: str):
    import diffusers

    return getattr(diffusers, name)


def make_schedule(scheduler_config: dict, sampler: str, num_steps: int, *, sigmas=None, mu: float | None = None) -> Schedule:
    """The schedule of `sampler` for a model whose scheduler config is `scheduler_config`.

    Diffusion models accept the diffusion samplers and flow models the flow samplers; anything
    else raises ValueError with the list of valid samplers.

    Flow models may pass the scheduler's own optional inputs (a family supplies them through
    `Bundle.schedule_kwargs`): `sigmas`, a custom decreasing noise-level table of length
    `num_steps` that the scheduler then shifts (FLUX uses linspace(1, 1/N, N)), and `mu`, the
    resolution-dependent shift that configs with `use_dynamic_shifting` require.
    """
    if num_steps < 1:
        raise ValueError(f"steps must be at least 1 (got {num_steps})")
    is_flow = scheduler_config.get("_class_name", "").startswith("FlowMatch") or "shift" in scheduler_config and "beta_start" not in scheduler_config
    valid = FLOW_SAMPLERS if is_flow else DIFFUSION_SAMPLERS
    if sampler not in valid:
        kind = "flow-matching" if is_flow else "diffusion"
        raise ValueError(f"sampler {sampler!r} does not apply to this {kind} model; choose one of {', '.join(valid)}")
    extra = {k: v for k, v in (("sigmas", sigmas), ("mu", mu)) if v is not None}
    if extra and not is_flow:
        raise ValueError(f"{', '.join(extra)} apply to flow-matching schedules only")
    if is_flow and scheduler_config.get("use_dynamic_shifting") and mu is None:
        raise ValueError("this flow model's scheduler shifts its noise levels by image size (use_dynamic_shifting); "
                         "the schedule needs mu, which the model family supplies")
    cls = _class(SAMPLER_SCHEDULERS[sampler])
    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    sched = cls.from_config(config)
    if extra:
        if sigmas is not None:
            extra["sigmas"] = [float(v) for v in sigmas]
        sched.set_timesteps(num_steps, **extra)
    else:
        sched.set_timesteps(num_steps)
    T = int(sched.config.num_train_timesteps)
    if is_flow:
        s = sched.sigmas.to(torch.float64)
        return Schedule("flow", sched.timesteps.clone(), 1.0 - s, s.clone(), T)
    if sampler == "ddim":
        ac = sched.alphas_cumprod.to(torch.float64)
        ts = sched.timesteps.clone()
        # DDIM lands on the next evaluated timestep, and after the last one on the final alpha.
        abar = torch.cat([ac[ts.long()], torch.tensor([float(sched.final_alpha_cumprod)], dtype=torch.float64)])
        return Schedule("vp", ts, abar.sqrt(), (1 - abar).sqrt(), T)
    # Karras-style schedulers store sigma_VE = sqrt((1 - abar) / abar); the last entry is 0.
    ve = sched.sigmas.to(torch.float64)
    alpha = 1.0 / torch.sqrt(1.0 + ve**2)
    return Schedule("vp", sched.timesteps.clone(), alpha, ve * alpha, T)
