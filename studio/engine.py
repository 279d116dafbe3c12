"""The one sampling loop (survey Part I): request -> conditioning -> guided denoise -> sampler -> images.

    u_ctrl(x_t, t) = u_base(x_t, t) - sum_k lambda_k(t) grad E_k(x_t, t; c_k)

Every control plugs in at a socket of this loop: prediction combination (guidance objects),
energies and projections, attention hooks, model deltas and the start point / trajectory. All
guidance branches of a step run in one batched forward pass.

Internal-contrast guidance (survey §5.2) plugs in at two more places of the denoise callable:
branches named "<name>_perturbed" run in the same batched forward with the conditioning of "<name>",
the method's attention processors perturbing only their rows (the engine tells the method the rows
of every branch before each forward); and a method may ask for extra forward passes after the
step's batched forward (`ExtraForward`: its own input state, conditioning and network), which the
engine batches per network and counts in the NFE.

Plug-in adapters (studio/adapters) enter as `AdapterInputs`: ControlNet residuals are computed
inside each batched model call and added to the UNet's skips; an IP-Adapter's image embeddings
ride along as a conditioning tensor of each branch (the reference image for the prompt branch,
the "no image" embedding for the negative branch).
"""

from __future__ import annotations

import contextlib
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
from .guidance.base import ExtraForward, Guidance, conditioning_branch
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
    """Builds the denoise callable of the samplers: batches the guidance branches in one forward.

    Before every network call the guidance hears which batch rows belong to which branch
    (`before_forward`); after the step's batched forward it may ask for extra forwards
    (`extra_forwards`), run here batched per network, before it combines all predictions.
    """

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

    def _cond_for(self, names: tuple[str, ...]) -> Conditioning:
        """The conditionings of `names` (branch or conditioning names) concatenated in order; a perturbed
        branch "<name>_perturbed" runs with the conditioning of "<name>"."""
        if names not in self._cat_cache:
            self._cat_cache[names] = Conditioning.cat([self.conds[conditioning_branch(b)] for b in names])
        return self._cat_cache[names]

    @contextlib.contextmanager
    def _network(self, module: str):
        """Run the bundle with `module` standing in for its UNet for the block (AutoGuidance's weak model)."""
        if module == "unet":
            yield
            return
        modules = self.bundle.modules
        if module not in modules:
            raise ValueError(f"{self.bundle.name or self.bundle.family}: the guidance needs the module {module!r}, "
                             f"which this model does not have (it has {', '.join(sorted(modules))})")
        main = modules["unet"]
        modules["unet"] = modules[module]
        try:
            yield
        finally:
            modules["unet"] = main

    def _forward(self, x_in: torch.Tensor, i: int, branches: tuple[str, ...], cond: Conditioning,
                 module: str = "unet") -> torch.Tensor:
        """One network call on a batch of len(branches) equal chunks; the guidance hears the rows first."""
        per = x_in.shape[0] // len(branches)
        self.guidance.before_forward(branches, {b: slice(k * per, (k + 1) * per) for k, b in enumerate(branches)}, x_in)
        t = self.schedule.timesteps[min(i, len(self.schedule) - 1)]
        kwargs = {}
        if self.controls:
            res = control_residuals(self.controls, x_in, t, cond.tensors["encoder_hidden_states"], i, len(self.schedule))
            if res is not None:
                kwargs["residuals"] = res
        with self._network(module):
            out = self.model(x_in, t, cond, **kwargs)
        self.nfe += len(branches)
        return out

    def predict(self, x: torch.Tensor, i: int, branches: tuple[str, ...]) -> dict[str, Prediction]:
        """Raw per-branch predictions at step i (one batched forward)."""
        n = len(branches)
        x_in = torch.cat([x] * n) if n > 1 else x
        out = self._forward(x_in, i, branches, self._cond_for(branches))
        a, s = self.schedule.alpha[i], self.schedule.sigma[i]
        chunks = out.chunk(n) if n > 1 else (out,)
        return {b: to_prediction(o, x, a, s, self.bundle.prediction_type) for b, o in zip(branches, chunks)}

    def predict_extra(self, x: torch.Tensor, i: int, extra: tuple[ExtraForward, ...]) -> dict[str, Prediction]:
        """Predictions of the extra forwards of step i: one batched call per network, each prediction
        consistent with its own input state."""
        a, s = self.schedule.alpha[i], self.schedule.sigma[i]
        preds = {}
        for module in dict.fromkeys(e.module for e in extra):
            group = [e for e in extra if e.module == module]
            states = [x if e.x is None else e.x for e in group]
            names = tuple(e.branch for e in group)
            cond = self._cond_for(tuple(e.conditioning for e in group))
            out = self._forward(torch.cat(states) if len(states) > 1 else states[0], i, names, cond, module)
            chunks = out.chunk(len(group)) if len(group) > 1 else (out,)
            for e, state, o in zip(group, states, chunks):
                preds[e.branch] = to_prediction(o, state, a, s, self.bundle.prediction_type)
        return preds

    def __call__(self, x: torch.Tensor, i: int) -> Prediction:
        if self.guidance.needs_grad:  # energy guidance: differentiate the predictions with respect to x
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                out = self._guided(x, i)
            return Prediction(out.x0.detach(), out.eps.detach())
        return self._guided(x, i)

    def _guided(self, x: torch.Tensor, i: int) -> Prediction:
        step = self.step_info(i)
        branches = self.guidance.branches(step)
        preds = self.predict(x, i, branches)
        extra = tuple(self.guidance.extra_forwards(preds, step, x))
        if extra:
            preds.update(self.predict_extra(x, i, extra))
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
    guidance.set_prompts(list(prompts) if prompts is not None else [req.prompt] * n)
    guidance.prepare(bundle, height, width)
    grad_mode = torch.no_grad() if guidance.needs_grad else torch.inference_mode()
    with grad_mode, guidance.patch(bundle):
        x = SAMPLERS[sampler](den, x, schedule, **kwargs)
        images = bundle.decode(x)
        figures = guidance.metrics(images)
    seconds = time.perf_counter() - t0
    meta = {"model": bundle.name, "sampler": sampler, "seconds": round(seconds, 4), "nfe": den.nfe,
            "height": height, "width": width, **figures}
    return RunResult(images=to_uint8(images), latents=x, seconds=seconds, nfe=den.nfe, request=req,
                     metadata=meta, unit=to_unit(images))
