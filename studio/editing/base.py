"""What the editing methods share (survey §7): the source of an edit, its result, and the sampling
loops that run an edit alone or beside its source.

An edit starts from an `EditSource`: an inverted real image (survey §8; `EditSource.from_inversion`)
or a generated one (`source_from_generation`), with its whole trajectory x*_0 .. x*_T and the
sampling settings that replay it. Replaying the source means sampling from x*_T with its prompt, its
guidance scale and its unconditional branch at every step: the empty prompt for a generated image or
a DDIM inversion, null-text inversion's optimised null_t* (§8.2), or the source prompt itself for
negative-prompt inversion (§8.3). The edit branch uses the same unconditional branch, so that with
the source prompt as target it is the replay.

Two loops, both plain functions of their arguments:

* `run_single`: one branch from any level of the schedule (SDEdit, blended and DiffEdit denoising);
  its forward pass is the engine's (rows [uncond, cond] or [cond] when the scale is 1), so a run from
  x_T under a prompt equals `engine.generate` with the same noise.
* `run_pair`: the source and the edit branch side by side in one batched forward, rows
  [src_uncond, edit_uncond, src_cond, edit_cond] (or [src_cond, edit_cond] without CFG), for the
  attention and feature methods (Prompt-to-Prompt, MasaCtrl, KV reuse, PnP); an attention controller
  hears the layout before every forward. A forward of k rows counts k network evaluations.

Both accept a `post_step(i, x) -> x` applied after sampling step i (latent blending) and a `Progress`
that reports every step and stops cooperatively between steps (raising `engine.Interrupted`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..denoiser import Prediction, to_prediction
from ..engine import Interrupted, initial_noise, to_uint8
from ..families.base import Bundle, Conditioning
from ..schedules import Schedule, make_schedule

SAMPLERS = ("ddim", "euler", "flow_euler")  # deterministic one-evaluation steps that replay a trajectory


@dataclass
class EditSource:
    """What an edit starts from. `trajectory[k]` is x*_k (k = 0 the clean latent, k = steps the noise
    `latents`); sampling step i (0 = the noisiest) goes from x*_{steps - i} toward x*_{steps - i - 1}."""

    latents: torch.Tensor  # x_T
    trajectory: list[torch.Tensor]  # x*_0 .. x*_T
    prompt: str
    guidance_scale: float
    steps: int
    sampler: str
    schedule: Schedule = field(repr=False)
    height: int
    width: int
    null_embeddings: Optional[list] = field(default=None, repr=False)  # null-text's per-step unconditional conditionings
    image: Optional[np.ndarray] = field(default=None, repr=False)  # uint8 HxWx3
    origin: str = "generated"  # "generated" or the inversion method ("ddim", "null_text", "negative_prompt", "flow")

    @classmethod
    def from_inversion(cls, result, image: Optional[np.ndarray] = None) -> "EditSource":
        """The source of an `InversionResult` of one image (survey §8), with its null-text embeddings."""
        if result.latents.shape[0] != 1:
            raise ValueError(f"an edit starts from one image; this inversion holds {result.latents.shape[0]}")
        return cls(latents=result.latents, trajectory=list(result.trajectory), prompt=result.prompt[0],
                   guidance_scale=float(result.guidance_scale), steps=int(result.steps), sampler=result.sampler,
                   schedule=result.schedule, height=int(result.height), width=int(result.width),
                   null_embeddings=result.null_embeddings, image=None if image is None else np.asarray(image),
                   origin=result.method)

    @property
    def source_latents(self) -> torch.Tensor:
        """x*_0: the clean latent of the source image."""
        return self.trajectory[0]

    def level(self, i: int) -> torch.Tensor:
        """The trajectory's state before sampling step i (x*_{steps - i}); i = steps gives x*_0."""
        return self.trajectory[self.steps - i]

    def check(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"editing replays sources sampled with {', '.join(SAMPLERS)}, not {self.sampler!r}")
        if len(self.trajectory) != self.steps + 1 or len(self.schedule) != self.steps:
            raise ValueError(f"the source has {len(self.trajectory)} trajectory states and a schedule of "
                             f"{len(self.schedule)} steps for steps={self.steps}")
        if self.null_embeddings is not None and len(self.null_embeddings) != self.steps:
            raise ValueError(f"the source has {len(self.null_embeddings)} null-text embeddings for {self.steps} steps")


@dataclass
class EditResult:
    method: str
    image: np.ndarray  # uint8 HxWx3
    params: dict  # the method's settings, defaults resolved
    seconds: float
    nfe: int  # network evaluations (a batched forward of k rows counts k)
    mask: Optional[np.ndarray] = None  # float HxW in [0, 1] at image resolution: the mask used or computed
    latents: Optional[torch.Tensor] = field(default=None, repr=False)  # the edit's final latent
    source_latents: Optional[torch.Tensor] = field(default=None, repr=False)  # the source branch's final latent
    source_image: Optional[np.ndarray] = field(default=None, repr=False)  # its image (methods that run the source beside the edit)


# --- conditioning


def unconditional(bundle: Bundle, source: EditSource) -> Callable[[int], Conditioning]:
    """The unconditional conditioning of sampling step i: null_t* (§8.2), the source prompt (§8.3), or ""."""
    if source.null_embeddings is not None:
        nulls = source.null_embeddings
        return lambda i: nulls[i]
    c = bundle.encode_prompt([source.prompt]) if source.origin == "negative_prompt" else bundle.encode_negative_prompt([""])
    return lambda i: c


class Progress:
    """Cooperative stop and progress over one edit: `callback(i, n)` after unit i (0-based) of the n network
    steps the edit runs (DiffEdit's noise draws, then the denoising steps), `should_stop()` checked before
    it (raising `engine.Interrupted`)."""

    def __init__(self, callback=None, should_stop=None, total: int = 0):
        self.callback, self.should_stop = callback, should_stop
        self.total, self.done = int(total), 0

    def expect(self, n: int) -> None:
        """n more units are coming (the total grows only when the plan did not count them)."""
        self.total = max(self.total, self.done + int(n))

    def step(self, phase: str) -> None:
        if self.should_stop is not None and self.should_stop():
            raise Interrupted(f"stopped during {phase} after {self.done} of {self.total} steps")
        self.done += 1
        if self.callback is not None:
            self.callback(self.done - 1, self.total)


def _c(v, x):
    return torch.as_tensor(float(v), dtype=x.dtype, device=x.device)


def advance(pred: Prediction, x: torch.Tensor, schedule: Schedule, i: int, sampler: str) -> torch.Tensor:
    """One deterministic sampler step from level i to i + 1, written as `studio.samplers` writes it."""
    if sampler == "ddim":
        from ..samplers import ddim_step

        return ddim_step(pred, x, schedule, i)
    if sampler == "euler":
        return _c(schedule.alpha[i + 1], x) * pred.x0 + _c(schedule.sigma[i + 1], x) * pred.eps
    if sampler == "flow_euler":
        return x + _c(schedule.sigma[i + 1] - schedule.sigma[i], x) * pred.velocity()
    raise ValueError(f"editing steps with {', '.join(SAMPLERS)}, not {sampler!r}")


def _forward(bundle: Bundle, schedule: Schedule, i: int, rows: list[torch.Tensor], cond: Conditioning) -> list[Prediction]:
    """One batched network call on `rows` (each (1, C, h, w) or a batch), predictions per row group."""
    x_in = torch.cat(rows) if len(rows) > 1 else rows[0]
    out = bundle.model(x_in, schedule.timesteps[min(i, len(schedule) - 1)], cond)
    a, s = schedule.alpha[i], schedule.sigma[i]
    chunks = out.split([r.shape[0] for r in rows]) if len(rows) > 1 else (out,)
    return [to_prediction(o, r, a, s, bundle.prediction_type) for o, r in zip(chunks, rows)]


def _cfg(u: Prediction, c: Prediction, w: float) -> Prediction:
    """eps_u + w (eps_c - eps_u), on x0 and eps alike (`guidance.cfg.CFG.combine`, survey §4.1)."""
    return Prediction(u.x0 + w * (c.x0 - u.x0), u.eps + w * (c.eps - u.eps))


def run_single(bundle: Bundle, source: EditSource, cond: Conditioning, x: torch.Tensor, start: int = 0, *,
               post_step: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None,
               on_step: Optional[Callable[[int, torch.Tensor], None]] = None,
               controller=None, progress: Optional[Progress] = None, phase: str = "edit") -> tuple[torch.Tensor, int]:
    """Sample one branch from level `start` (x is the state there) to the end with the source's
    schedule, scale and unconditional branch, under `cond`. Returns (x0, nfe)."""
    schedule, sampler, w = source.schedule, source.sampler, float(source.guidance_scale)
    uncond = unconditional(bundle, source)
    n = len(schedule)
    progress = progress or Progress()
    progress.expect(n - start)
    latent = (int(x.shape[-2]), int(x.shape[-1]))
    nfe = 0
    if controller is not None:
        controller.begin(n, start)
    for i in range(start, n):
        if w == 1.0:
            if controller is not None:
                controller.set_layout(1, (), (0, 0), latent)
            (pred,) = _forward(bundle, schedule, i, [x], cond)
            nfe += 1
        else:
            if controller is not None:
                controller.set_layout(2, (), (1, 1), latent)
            u, c = _forward(bundle, schedule, i, [x, x], Conditioning.cat([uncond(i), cond]))
            pred = _cfg(u, c, w)
            nfe += 2
        x = advance(pred, x, schedule, i, sampler)
        if controller is not None:
            controller.between_steps()
        if post_step is not None:
            x = post_step(i, x)
        if on_step is not None:
            on_step(i, x)
        progress.step(phase)
    return x, nfe


def run_pair(bundle: Bundle, source: EditSource, target: Conditioning, *, controller=None,
             post_step: Optional[Callable[[int, torch.Tensor], torch.Tensor]] = None,
             source_states: str = "replay", progress: Optional[Progress] = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The source branch (source prompt) and the edit branch (`target`) from the shared x_T, one batched
    forward per step. `source_states="trajectory"` sets the source branch to the source's trajectory
    x*_t before every step instead of letting it evolve (PnP's source pass reads the inverted latents).
    `post_step(i, x)` sees x = [x_src; x_edit] (2, C, h, w). Returns (x0_src, x0_edit, nfe)."""
    schedule, sampler, w = source.schedule, source.sampler, float(source.guidance_scale)
    uncond = unconditional(bundle, source)
    cond_src = bundle.encode_prompt([source.prompt])
    n = len(schedule)
    progress = progress or Progress()
    progress.expect(n)
    x = torch.cat([source.latents, source.latents])
    latent = (int(x.shape[-2]), int(x.shape[-1]))
    nfe = 0
    if controller is not None:
        controller.begin(n)
    for i in range(n):
        if source_states == "trajectory":
            x = torch.cat([source.level(i), x[1:]])
        xs, xe = x[:1], x[1:]
        if w == 1.0:
            if controller is not None:
                controller.set_layout(2, ((0, 1),), (0, 1), latent)
            ps, pe = _forward(bundle, schedule, i, [xs, xe], Conditioning.cat([cond_src, target]))
            nfe += 2
        else:
            u = uncond(i)
            if controller is not None:
                controller.set_layout(4, ((0, 1), (2, 3)), (2, 3), latent)
            us, ue, cs, ce = _forward(bundle, schedule, i, [xs, xe, xs, xe], Conditioning.cat([u, u, cond_src, target]))
            ps, pe = _cfg(us, cs, w), _cfg(ue, ce, w)
            nfe += 4
        pred = Prediction(torch.cat([ps.x0, pe.x0]), torch.cat([ps.eps, pe.eps]))
        x = advance(pred, x, schedule, i, sampler)
        if controller is not None:
            controller.between_steps()
        if post_step is not None:
            x = post_step(i, x)
        progress.step("edit")
    return x[:1], x[1:], nfe


def replay(bundle: Bundle, source: EditSource, *, controller=None, progress: Optional[Progress] = None) -> tuple[torch.Tensor, int]:
    """The unedited replay of the source: x*_T sampled back under its own prompt. Returns (x0, nfe)."""
    source.check()
    with torch.no_grad():
        return run_single(bundle, source, bundle.encode_prompt([source.prompt]), source.latents.clone(),
                          controller=controller, progress=progress, phase="replay")


def decode_image(bundle: Bundle, latents: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return to_uint8(bundle.decode(latents))[0]


def source_from_generation(bundle: Bundle, prompt: str, *, seed: int = 0, steps: int = 50, guidance_scale: float = 5.0,
                           callback=None, should_stop=None) -> EditSource:
    """Sample `prompt` from seeded noise with the model's default sampler and CFG against the empty
    prompt (as `engine.generate`), keeping every state of the trajectory. `callback(i, n)` after step i
    of n; `should_stop()` stops between steps."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the source prompt is empty")
    steps = int(steps)
    height, width = bundle.default_size
    sampler = bundle.default_sampler
    schedule = make_schedule(bundle.scheduler_config, sampler, steps, **bundle.schedule_kwargs(height, width, steps))
    generator = torch.Generator("cpu").manual_seed(int(seed))
    x = initial_noise(bundle, bundle.latent_shape(1, height, width), generator)
    states = [x]
    source = EditSource(latents=x, trajectory=[], prompt=prompt, guidance_scale=float(guidance_scale), steps=steps,
                        sampler=sampler, schedule=schedule, height=height, width=width, origin="generated")
    with torch.no_grad():
        x0, _ = run_single(bundle, source, bundle.encode_prompt([prompt]), x, on_step=lambda i, xi: states.append(xi),
                           progress=Progress(callback, should_stop), phase="source")
    source.trajectory = states[::-1]
    source.image = decode_image(bundle, x0)
    return source


# --- parameters, strengths and masks


def resolve_params(method: str, defaults: dict, params: Optional[dict]) -> dict:
    params = dict(params or {})
    unknown = set(params) - set(defaults)
    if unknown:
        raise ValueError(f"{method}: unknown parameter(s) {', '.join(sorted(unknown))}; "
                         f"it takes {', '.join(sorted(defaults)) or 'none'}")
    return {**defaults, **params}


def check_fraction(method: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{method}: {name}={value!r} must be a number in [0, 1]")
    return float(value)


def start_index(steps: int, strength: float) -> int:
    """The first sampling step of a run that starts at noise level t0 = strength * T: diffusers'
    img2img rule, min(int(steps * strength), steps) steps from the end."""
    return steps - min(int(steps * strength), steps)


def check_mask(method: str, mask, height: int, width: int) -> np.ndarray:
    """A user mask as float32 HxW in [0, 1] (white = the region to edit): HxW or HxWxC arrays (channels
    reduced by their maximum), bool, [0, 1] floats or 0-255 values."""
    if mask is None:
        raise ValueError(f"{method} needs a mask of the region to edit")
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m.max(axis=-1)
    if m.ndim != 2:
        raise ValueError(f"{method}: the mask must be HxW (got shape {tuple(np.shape(mask))})")
    if m.shape != (height, width):
        raise ValueError(f"{method}: the mask is {m.shape[1]}x{m.shape[0]} but the source image is {width}x{height}")
    m = m.astype(np.float32)
    if not np.isfinite(m).all():
        raise ValueError(f"{method}: the mask has non-finite values")
    if m.max() > 1.0:
        m = m / 255.0
    m = np.clip(m, 0.0, 1.0)
    if not m.any():
        raise ValueError(f"{method}: the mask is empty (all zero); paint the region to edit")
    return m


def grid_mask(mask: np.ndarray, h: int, w: int, device=None) -> torch.Tensor:
    """The mask on an h x w grid (latent cells or attention tokens): a cell is inside when at least
    half of its pixels are."""
    t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    return (F.adaptive_avg_pool2d(t, (h, w))[0, 0] >= 0.5).to(device or "cpu")


def image_mask(cells: torch.Tensor, height: int, width: int) -> np.ndarray:
    """A grid mask (h, w) back at image resolution (nearest), float32 in [0, 1]."""
    m = F.interpolate(cells.float().cpu()[None, None], size=(height, width), mode="nearest")[0, 0]
    return m.numpy().astype(np.float32)


def elapsed(t0: float) -> float:
    return time.perf_counter() - t0


__all__ = ["EditSource", "EditResult", "source_from_generation", "replay", "run_single", "run_pair", "advance",
           "unconditional", "check_mask", "grid_mask", "image_mask", "start_index", "resolve_params",
           "check_fraction", "decode_image"]
