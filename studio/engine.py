"""The one sampling loop (survey Part I): request -> conditioning -> guided denoise -> sampler -> images.

    u_ctrl(x_t, t) = u_base(x_t, t) - sum_k lambda_k(t) grad E_k(x_t, t; c_k)

Every control plugs in at a socket of this loop: prediction combination (guidance objects),
energies and projections, attention hooks, model deltas and the start point / trajectory. All
guidance branches of a step run in one batched forward pass.

Plug-in adapters (studio/adapters) enter as `AdapterInputs`: ControlNet residuals are computed
inside each batched model call and added to the UNet's skips; an IP-Adapter's image embeddings
ride along as a conditioning tensor of each branch (the reference image for the prompt branch,
the "no image" embedding for the negative branch).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .adapters import AdapterInputs
from .adapters.controlnet import ControlUnit, residuals as control_residuals
from .denoiser import Prediction, to_prediction
from .families.base import Bundle, Conditioning
from .guidance import StepInfo, get_guidance
from .guidance.base import Guidance
from .requests import GenerateRequest
from .samplers import SAMPLERS
from .schedules import Schedule, make_schedule


class Interrupted(Exception):
    """Raised between steps when the user stops a run."""


@dataclass
class RunResult:
    images: list[np.ndarray]  # uint8 HxWx3
    latents: torch.Tensor
    seconds: float
    nfe: int  # network evaluations per image (a batched forward of k branches counts k)
    request: GenerateRequest
    metadata: dict = field(default_factory=dict)
    unit: Optional[np.ndarray] = None  # float images in [0, 1], (B, H, W, 3), before quantization


def to_uint8(images: torch.Tensor) -> list[np.ndarray]:
    """Images in [-1, 1], (B, 3, H, W) -> list of uint8 HxWx3 (as diffusers' image processor does)."""
    x = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [np.round(i * 255).astype(np.uint8) for i in x]


def to_unit(images: torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] -> float array in [0, 1], (B, H, W, 3): diffusers' output_type="np"."""
    return (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


class GuidedDenoiser:
    """Builds the denoise callable of the samplers: batches the guidance branches in one forward."""

    def __init__(self, bundle: Bundle, schedule: Schedule, guidance: Guidance, conds: dict[str, Conditioning],
                 model: Optional[Callable] = None, controls: Sequence[ControlUnit] = ()):
        self.bundle = bundle
        self.schedule = schedule
        self.guidance = guidance
        self.conds = conds
        self.model = model or bundle.model
        self.controls = list(controls)  # prepared ControlNet units: residuals added inside every model call
        self.nfe = 0
        self._cat_cache: dict[tuple[str, ...], Conditioning] = {}

    def step_info(self, i: int) -> StepInfo:
        i_c = min(i, len(self.schedule) - 1)
        return StepInfo(index=i_c, num_steps=len(self.schedule), t=self.schedule.t(i_c),
                        alpha=float(self.schedule.alpha[i]), sigma=float(self.schedule.sigma[i]),
                        alpha_next=float(self.schedule.alpha[i_c + 1]), sigma_next=float(self.schedule.sigma[i_c + 1]),
                        prediction_type=self.bundle.prediction_type)

    def _cond_for(self, branches: tuple[str, ...]) -> Conditioning:
        if branches not in self._cat_cache:
            self._cat_cache[branches] = Conditioning.cat([self.conds[b] for b in branches])
        return self._cat_cache[branches]

    def predict(self, x: torch.Tensor, i: int, branches: tuple[str, ...]) -> dict[str, Prediction]:
        """Raw per-branch predictions at step i (one batched forward)."""
        n = len(branches)
        t = self.schedule.timesteps[min(i, len(self.schedule) - 1)]
        x_in = torch.cat([x] * n) if n > 1 else x
        cond = self._cond_for(branches)
        kwargs = {}
        if self.controls:
            res = control_residuals(self.controls, x_in, t, cond.tensors["encoder_hidden_states"], i, len(self.schedule))
            if res is not None:
                kwargs["residuals"] = res
        out = self.model(x_in, t, cond, **kwargs)
        self.nfe += n
        a, s = self.schedule.alpha[i], self.schedule.sigma[i]
        chunks = out.chunk(n) if n > 1 else (out,)
        return {b: to_prediction(o, x, a, s, self.bundle.prediction_type) for b, o in zip(branches, chunks)}

    def __call__(self, x: torch.Tensor, i: int) -> Prediction:
        step = self.step_info(i)
        branches = self.guidance.branches(step)
        preds = self.predict(x, i, branches)
        return self.guidance(preds, step, x)


def initial_noise(bundle: Bundle, shape, generator: torch.Generator) -> torch.Tensor:
    """x_T ~ N(0, I), drawn on the CPU from the seeded generator (same pixels on every device)."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(bundle.device, bundle.dtype)


def generate(bundle: Bundle, req: GenerateRequest, *, callback=None, should_stop: Optional[Callable[[], bool]] = None,
             guidance: Optional[Guidance] = None, prompts: Optional[Sequence[str]] = None,
             seeds: Optional[Sequence[int]] = None, adapters: Optional[AdapterInputs] = None) -> RunResult:
    """Text-to-image with any sampler and guidance method; same request, same pixels.

    By default the batch repeats `req.prompt` and draws all `req.num_images` starting noises from one
    generator seeded with `req.seed`. For evaluation over many prompts in one batched run:

    * `prompts` (length `num_images`) gives every image its own prompt (the negative prompt is shared);
    * `seeds` (length `num_images`) draws every image's starting noise from its own generator, so image k
      starts where a single-image run with seed `seeds[k]` starts. With a deterministic sampler (ddim at
      eta 0, euler, dpmpp_2m, flow samplers) it then ends there too, up to float rounding of the batched
      forward; stochastic samplers draw their per-step noise from the generator of `seeds[0]`.

    `adapters` (from the session, which loads them) adds ControlNets and an IP-Adapter's image
    embeddings to the run; the control images are resized to the output size here.
    """
    req.validate()
    n = req.num_images
    for label, values in (("prompts", prompts), ("seeds", seeds)):
        if values is not None and len(values) != n:
            raise ValueError(f"{label} has {len(values)} entries for num_images={n}")
    t0 = time.perf_counter()
    height = req.height or bundle.default_size[0]
    width = req.width or bundle.default_size[1]
    bundle.check_size(height, width)
    sampler = req.sampler or bundle.default_sampler
    schedule = make_schedule(bundle.scheduler_config, sampler, int(req.steps),
                             **bundle.schedule_kwargs(height, width, int(req.steps)))
    guidance = guidance or get_guidance(req.guidance, guidance_scale=req.guidance_scale, **req.guidance_params)
    guidance.reset()
    conds = {"cond": bundle.encode_prompt(list(prompts) if prompts is not None else [req.prompt] * n)}
    if "negative" in getattr(guidance, "all_branches", ()):
        # the negative prompt is its own term (survey §4.2, second form); the unconditional branch is empty
        conds["uncond"] = bundle.encode_negative_prompt([""] * n)
        conds["negative"] = bundle.encode_prompt([req.negative_prompt or ""] * n)
    else:
        conds["uncond"] = bundle.encode_negative_prompt([req.negative_prompt or ""] * n)
    controls = []
    if adapters is not None:
        controls = [u.prepared(height, width) for u in adapters.controls]
        if adapters.image_embeds is not None:  # the prompt branch sees the reference image, every other branch none
            pos, neg = adapters.image_embeds
            for name, c in conds.items():
                c.tensors["ip_image_embeds"] = torch.cat([pos if name == "cond" else neg] * n).to(bundle.device, bundle.dtype)
    if seeds is None:
        generator = torch.Generator("cpu").manual_seed(int(req.seed))
        x = initial_noise(bundle, bundle.latent_shape(n, height, width), generator)
    else:
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        x = torch.cat([initial_noise(bundle, bundle.latent_shape(1, height, width), g) for g in generators])
        generator = generators[0]
    den = GuidedDenoiser(bundle, schedule, guidance, conds, controls=controls)

    def step_cb(i, x_i, pred):
        if should_stop is not None and should_stop():
            raise Interrupted(f"stopped after step {i + 1} of {len(schedule)}")
        if callback is not None:
            callback(i, len(schedule), x_i, pred)

    kwargs = {"generator": generator, "callback": step_cb}
    if sampler == "ddim":
        kwargs["eta"] = req.eta
    with torch.inference_mode(), guidance.patch(bundle):
        x = SAMPLERS[sampler](den, x, schedule, **kwargs)
        images = bundle.decode(x)
    seconds = time.perf_counter() - t0
    meta = {"model": bundle.name, "sampler": sampler, "seconds": round(seconds, 4), "nfe": den.nfe,
            "height": height, "width": width}
    return RunResult(images=to_uint8(images), latents=x, seconds=seconds, nfe=den.nfe, request=req,
                     metadata=meta, unit=to_unit(images))
