"""SDEdit: noise the source, then denoise under the target prompt (survey §7.1, L1069-1095; Meng et al., 2022).

Pick t0 = strength * T and noise the source's clean latent to it (L1085),

    x_{t0} = sqrt(abar_{t0}) x_src + sqrt(1 - abar_{t0}) eps,      eps ~ N(0, I),

then run the reverse process from t0 to 0 under c_tgt (L1089) with the source's sampler, schedule,
guidance scale and unconditional branch. For flow models the same line reads x_{t0} = (1 - t0) x_src
+ t0 eps (ours; the schedule's alpha and sigma). t0 trades faithfulness (small) against realism and
edit strength (large) (L1077-1081). The level follows diffusers' img2img rule: the last
min(int(steps * strength), steps) steps of the source's schedule run, so strength 0 runs none and
returns the source, and strength 1 starts at the schedule's first level (pure noise on
zero-terminal-SNR and flow schedules, where it is plain generation from eps). eps is drawn from `seed`
as `engine.generate` draws its starting noise.
"""

from __future__ import annotations

import torch

from ..engine import initial_noise
from .base import EditResult, EditSource, check_fraction, decode_image, elapsed, run_single, start_index

DEFAULTS = {"strength": 0.5, "seed": 0}


def run(bundle, source: EditSource, target_prompt: str, params: dict, *, progress=None, t0=None):
    strength = check_fraction("sdedit", "strength", params["strength"])
    seed = int(params["seed"])
    start = start_index(source.steps, strength)
    x_src = source.source_latents
    nfe = 0
    with torch.no_grad():
        if start >= source.steps:
            x = x_src.clone()
        else:
            eps = initial_noise(bundle, tuple(x_src.shape), torch.Generator("cpu").manual_seed(seed))
            a, s = source.schedule.alpha[start], source.schedule.sigma[start]
            x = a.to(x_src.dtype) * x_src + s.to(x_src.dtype) * eps
            x, nfe = run_single(bundle, source, bundle.encode_prompt([target_prompt]), x, start,
                                progress=progress)
    return EditResult(method="sdedit", image=decode_image(bundle, x), params={"strength": strength, "seed": seed}, seconds=elapsed(t0), nfe=nfe, latents=x, source_latents=x_src)
