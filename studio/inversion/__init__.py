"""Inversion (survey Part III, §8, L1273-1487): from a real image back to the noise that reproduces it.

    result = invert(bundle, image, prompt, "null_text", steps=50, guidance_scale=7.5)
    rec = reconstruct(bundle, result)                      # back to the image
    edit = reconstruct(bundle, result, prompt="a blue star on a white background")   # edit it

Methods (`METHODS`), one file each:

* "ddim" (§8.1, `ddim.py`): DDIM inversion with the source prompt at `inversion_guidance_scale`
  (default 1); reconstruction samples with ordinary CFG (empty unconditional prompt) at
  `guidance_scale`, where the guidance mismatch of L1339 shows.
* "null_text" (§8.2, `null_text.py`): the same pivot at w = 1, then one optimised unconditional
  embedding per step so that the CFG step at `guidance_scale` follows the pivot; reconstruction uses
  them.
* "negative_prompt" (§8.3, `negative_prompt.py`): the same pivot; the source prompt's embedding is the
  unconditional branch (null_t* ~ c_src), so reconstruction at any scale is the conditional one.
* "flow" (`flow.py`, ours): the flow ODE integrated backwards with Euler for flow-matching models.

For flow-matching models "null_text" and "negative_prompt" use the flow inversion as their pivot and
the flow Euler step (ours; the survey writes them for DDIM).

Latents enter through the family's codec (`Bundle.encode`, x*_0 = E(I), L1352) and leave through
`Bundle.decode`. Everything here is a function of its arguments: no model loading, no globals.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from ..engine import GuidedDenoiser, Interrupted, to_uint8, to_unit
from ..families.base import Bundle, Conditioning
from ..guidance.cfg import CFG
from ..samplers import SAMPLERS
from ..schedules import Schedule, make_schedule
from .ddim import invert_ddim
from .flow import invert_flow, reverse_schedule
from .negative_prompt import negative_prompt_conditioning
from .null_text import EARLY_STOP_EPSILON, LEARNING_RATE, NUM_INNER_STEPS, fit_null_text

METHODS = ("ddim", "null_text", "negative_prompt", "flow")
DEFAULT_GUIDANCE_SCALE = 5.0
DEFAULT_STEPS = 50

ImageLike = Any  # uint8 HxWx3 (or BxHxWx3) array or tensor, a [-1, 1] float tensor, or a PIL image


@dataclass
class InversionResult:
    """What an inversion found. `trajectory[k]` is x*_k of the survey (k = 0 the encoded image, k = steps
    the inverted noise `latents`); sampling step i (0 = the noisiest) goes from x*_{steps - i} toward
    x*_{steps - i - 1}, and `null_embeddings[i]` is null-text's unconditional conditioning for it."""

    method: str
    latents: torch.Tensor  # x_T: where reconstruction starts
    trajectory: list[torch.Tensor]
    prompt: list[str]  # the source prompt of every image
    guidance_scale: float  # the CFG scale reconstruction and editing use
    steps: int
    sampler: str  # "ddim" or "flow_euler"
    seconds: float
    nfe: int  # network forward passes per image (each null-text update also runs one backward)
    height: int
    width: int
    schedule: Schedule = field(repr=False)
    inversion_guidance_scale: float = 1.0
    null_embeddings: Optional[list[Conditioning]] = field(default=None, repr=False)
    inner_steps: list[int] = field(default_factory=list)  # null-text: Adam updates used at each step
    losses: list[list[float]] = field(default_factory=list)  # null-text: loss before each update, per step
    step_errors: list[float] = field(default_factory=list)  # null-text: landing error of each optimised step
    params: dict = field(default_factory=dict)  # the method's settings

    @property
    def source_latents(self) -> torch.Tensor:
        """x*_0 = E(I), the encoded input image."""
        return self.trajectory[0]

    def reconstruct(self, bundle: Bundle, **kwargs) -> "Reconstruction":
        """`reconstruct(bundle, self, **kwargs)`: x_T -> x0_hat with the method's recipe (§8.1-§8.3)."""
        return reconstruct(bundle, self, **kwargs)


@dataclass
class Reconstruction:
    """x0_hat sampled back from x_T (§8.2 L1400-1402) and its decoded images, I_hat = D(x0_hat) (L1406)."""

    latents: torch.Tensor
    images: list[np.ndarray]  # uint8 HxWx3
    unit: np.ndarray  # float images in [0, 1], (B, H, W, 3)
    prompt: list[str]
    guidance_scale: float
    seconds: float
    nfe: int


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 2.0) -> float:
    """PSNR in dB of a reconstruction x0_hat against x0 (how close x0_hat ~ x0 comes, §8.1 L1326, §8.2 L1402);
    `peak` is the peak-to-peak range (2 for images in [-1, 1])."""
    mse = float((a.double() - b.double()).pow(2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(peak * peak / mse)


def image_tensor(image: ImageLike) -> torch.Tensor:
    """The image I of x*_0 = E(I) (§8.2, L1352) as the codec takes it: uint8 HxWx3 / BxHxWx3 arrays or
    tensors, PIL images, or float tensors (3, H, W) / (B, 3, H, W) in [-1, 1] -> float32 (B, 3, H, W) in [-1, 1]."""
    if not isinstance(image, (np.ndarray, torch.Tensor)):
        image = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
    if image.dtype == torch.uint8:
        if image.dim() == 3:
            image = image[None]
        if image.dim() != 4 or image.shape[-1] != 3:
            raise ValueError(f"uint8 images must be HxWx3 (got shape {tuple(image.shape)})")
        return image.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or image.shape[1] != 3:
        raise ValueError(f"float images must be (3, H, W) or (B, 3, H, W) in [-1, 1] (got shape {tuple(image.shape)})")
    return image.float()


def _sampler_for(bundle: Bundle, sampler: Optional[str]) -> str:
    """DDIM (eta = 0, §8.1 L1298) for diffusion models, flow Euler for flow models: the deterministic
    samplers whose steps the inversions reverse."""
    expected = "flow_euler" if bundle.kind == "flow" else "ddim"
    if sampler is not None and sampler != expected:
        raise ValueError(f"inversion of this {'flow-matching' if bundle.kind == 'flow' else 'diffusion'} model "
                         f"samples with {expected}, not {sampler!r}")
    return expected


def _check_method(bundle: Bundle, method: str) -> None:
    """DDIM inversion (§8.1) needs a diffusion model, the reversed flow Euler (`flow.py`) a flow model."""
    if method not in METHODS:
        raise ValueError(f"unknown inversion method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "ddim" and bundle.kind == "flow":
        raise ValueError("DDIM inversion applies to diffusion models; this is a flow-matching model: use 'flow'")
    if method == "flow" and bundle.kind != "flow":
        raise ValueError("flow inversion applies to flow-matching models; this is a diffusion model: use 'ddim'")


def _denoiser(bundle: Bundle, schedule: Schedule, w: float, cond: Conditioning, uncond: Conditioning) -> GuidedDenoiser:
    """The engine's denoise callable with CFG, eps_u + w (eps_c - eps_u) (§8.2 L1364); `uncond` is the
    empty prompt (§8.1), null_t* (§8.2) or c_src (§8.3)."""
    return GuidedDenoiser(bundle, schedule, CFG(guidance_scale=float(w)), {"cond": cond, "uncond": uncond})


class _PerStepDenoiser:
    """A denoise callable whose unconditional conditioning changes at every step: null-text's
    eps_theta(x_t, t, null_t*) + w [eps_theta(x_t, t, c) - eps_theta(x_t, t, null_t*)] (§8.2 L1378)."""

    def __init__(self, dens: Sequence[GuidedDenoiser]):
        self.dens = list(dens)

    def __call__(self, x, i):
        return self.dens[i](x, i)

    @property
    def nfe(self) -> int:
        return sum(d.nfe for d in self.dens)


def _stopper(should_stop, callback, phase):
    """Progress and cooperative stop between the steps of a phase (as `engine.generate`)."""
    def cb(i, n):
        if should_stop is not None and should_stop():
            raise Interrupted(f"stopped during {phase} at step {i + 1} of {n}")
        if callback is not None:
            callback(phase, i, n)
    return cb


def invert(bundle: Bundle, image: ImageLike, prompt: Union[str, Sequence[str]], method: str = "null_text", *,
           steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_GUIDANCE_SCALE, sampler: Optional[str] = None,
           inversion_guidance_scale: float = 1.0, num_inner_steps: int = NUM_INNER_STEPS, early_stop: bool = True,
           early_stop_epsilon: float = EARLY_STOP_EPSILON, learning_rate: float = LEARNING_RATE,
           callback: Optional[Callable[[str, int, int], None]] = None,
           should_stop: Optional[Callable[[], bool]] = None) -> InversionResult:
    """Invert `image` (the module docstring's methods) with its source `prompt`: x*_0 = E(I), then the
    DDIM inversion x_{t+1} = sqrt(abar_{t+1}) x0^(t) + sqrt(1 - abar_{t+1}) eps_theta(x_t, t, c_src)
    (§8.1 L1318) or its flow analogue up to x*_T, then, for null-text, the per-step fit of §8.2.

    `guidance_scale` is the CFG scale of reconstruction and editing (null-text optimises for it);
    `inversion_guidance_scale` the scale of the DDIM / flow inversion itself (1: the conditional
    model; null_text and negative_prompt always invert at 1, as §8.2's pivot). The null-text settings (`num_inner_steps`, `early_stop`,
    `early_stop_epsilon`, `learning_rate`) are documented in `null_text.py`. `callback(phase, i, n)`
    reports progress ("invert", then "optimize" for null-text); `should_stop()` stops between steps.
    """
    _check_method(bundle, method)
    sampler = _sampler_for(bundle, sampler)
    t0 = time.perf_counter()
    x_img = image_tensor(image).to(bundle.device, bundle.dtype)
    b, _, height, width = x_img.shape
    bundle.check_size(height, width)
    prompts = [prompt] * b if isinstance(prompt, str) else list(prompt)
    if len(prompts) != b:
        raise ValueError(f"{len(prompts)} prompts for {b} images")
    steps = int(steps)
    schedule = make_schedule(bundle.scheduler_config, sampler, steps, **bundle.schedule_kwargs(height, width, steps))
    w_inv = 1.0 if method in ("null_text", "negative_prompt") else float(inversion_guidance_scale)
    CFG(guidance_scale=float(guidance_scale)).validate()
    with torch.no_grad():
        x0 = bundle.encode(x_img)
        cond = bundle.encode_prompt(prompts)
        empty = bundle.encode_negative_prompt([""] * b)
        stop = _stopper(should_stop, callback, "invert")
        if bundle.kind == "flow":
            den = _denoiser(bundle, reverse_schedule(schedule), w_inv, cond, empty)
            xT, traj = invert_flow(den, x0, schedule, return_trajectory=True,
                                   callback=lambda i, x: stop(steps - 1 - i, steps))
        else:
            den = _denoiser(bundle, schedule, w_inv, cond, empty)
            xT, traj = invert_ddim(den, x0, schedule, return_trajectory=True, prediction_type=bundle.prediction_type,
                                   callback=lambda i, x: stop(steps - 1 - i, steps))
    nfe = den.nfe
    result = InversionResult(method=method, latents=xT, trajectory=traj, prompt=prompts,
                             guidance_scale=float(guidance_scale), steps=steps, sampler=sampler, seconds=0.0, nfe=0,
                             height=height, width=width, schedule=schedule, inversion_guidance_scale=w_inv)
    if method == "null_text":
        fit = fit_null_text(bundle, schedule, traj, cond, empty, guidance_scale, sampler=sampler,
                            num_inner_steps=num_inner_steps, early_stop=early_stop,
                            early_stop_epsilon=early_stop_epsilon, learning_rate=learning_rate,
                            callback=_stopper(should_stop, callback, "optimize"))
        nfe += fit.nfe
        result.null_embeddings = fit.embeddings
        result.inner_steps, result.losses, result.step_errors = fit.inner_steps, fit.losses, fit.step_errors
        result.params = {"num_inner_steps": num_inner_steps, "early_stop": early_stop,
                         "early_stop_epsilon": early_stop_epsilon, "learning_rate": learning_rate}
    result.nfe = nfe
    result.seconds = time.perf_counter() - t0
    return result


def reconstruct(bundle: Bundle, result: InversionResult, *, prompt: Union[None, str, Sequence[str]] = None,
                guidance_scale: Optional[float] = None, callback: Optional[Callable[[str, int, int], None]] = None,
                should_stop: Optional[Callable[[], bool]] = None) -> Reconstruction:
    """Sample back from `result.latents` with the method's recipe: ddim / flow with CFG against the empty
    prompt, null_text with its optimised null_t* as the unconditional branch of step t, negative_prompt
    with the source prompt there. `prompt` (default: the source prompt) edits; `guidance_scale`
    (default: the result's) changes the CFG scale."""
    t0 = time.perf_counter()
    b = result.latents.shape[0]
    prompts = result.prompt if prompt is None else ([prompt] * b if isinstance(prompt, str) else list(prompt))
    w = result.guidance_scale if guidance_scale is None else float(guidance_scale)
    schedule = result.schedule
    stop = _stopper(should_stop, callback, "sample")
    with torch.no_grad():
        cond = bundle.encode_prompt(prompts)
        if result.method == "null_text":
            if not result.null_embeddings:
                raise ValueError("this null-text result has no optimised embeddings")
            den = _PerStepDenoiser([_denoiser(bundle, schedule, w, cond, u) for u in result.null_embeddings])
        elif result.method == "negative_prompt":
            den = _denoiser(bundle, schedule, w, cond, negative_prompt_conditioning(bundle, result.prompt))
        else:
            den = _denoiser(bundle, schedule, w, cond, bundle.encode_negative_prompt([""] * b))
        x = SAMPLERS[result.sampler](den, result.latents.clone(), schedule,
                                     callback=lambda i, x, pred: stop(i, len(schedule)))
        images = bundle.decode(x)
    return Reconstruction(latents=x, images=to_uint8(images), unit=to_unit(images), prompt=prompts,
                          guidance_scale=w, seconds=time.perf_counter() - t0, nfe=den.nfe)


__all__ = ["METHODS", "InversionResult", "Reconstruction", "invert", "reconstruct", "psnr", "image_tensor",
           "invert_ddim", "invert_flow", "reverse_schedule", "fit_null_text"]
