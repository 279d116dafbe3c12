"""The guidance contract shared by every method (survey Part II; STYLE item 2).

Every method is a `Guidance`: it says which network predictions it needs at each step
(`branches`), combines them in `combine`, acts only inside its [start, stop) window of steps
(outside, it falls back to the plain conditional prediction unless it says otherwise), and restores
any model perturbation it installs (`patch`, a context manager around the run). `combine` is a pure
function of its inputs except for the per-run state a few methods keep (APG's momentum, Adaptive
Guidance's switch), which `reset()` clears before every run.

Branch names the engine understands:
  "cond"      the prompt's conditioning,
  "uncond"    the negative prompt's conditioning (the empty prompt when there is none), except for
              methods whose `all_branches` include "negative": then "uncond" is the empty prompt,
  "negative"  the negative prompt's conditioning, kept apart from the empty prompt (survey §4.2's
              explicit subtractive term, `negative_term.py`).
A method lists every branch it may ask for in the class attribute `all_branches`, so the engine can
encode them once before the run. Later methods add branches that perturb the network (they declare
them and install the perturbation in `patch`).

Internal-contrast methods (survey §5.2) add two hooks, both no-ops by default:
  "<name>_perturbed"  (e.g. "cond_perturbed", "uncond_perturbed") runs in the same batched forward as
              the other branches, with the conditioning of "<name>"; before every forward the engine
              calls `before_forward(branches, rows, x_in)` with the batch rows of each branch, and the
              method's attention processors (installed in `patch`) perturb only the rows of the
              perturbed branches (PAG, SEG);
  `extra_forwards(preds, step, x)` asks for more forward passes after the step's batched forward,
              each an `ExtraForward` with its own input state, conditioning and network (SAG's
              degraded input, whose mask comes from the first pass's attention; AutoGuidance's weak
              model). Their predictions join `preds` under their branch names before `combine`.

Every `combine` returns a `Prediction` consistent with the state, x = alpha * x0 + sigma * eps:
affine rules apply the same weights to x0 and eps; nonlinear rules compute in their own space (each
file says which) and convert back with the step's alpha and sigma.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, fields
from typing import Optional

import torch

from ..denoiser import Prediction


@dataclass
class StepInfo:
    index: int  # step number, 0 = first (noisiest)
    num_steps: int
    t: float  # normalised time in [0, 1], 1 = pure noise
    alpha: float
    sigma: float
    # Optional, filled by the engine (methods that need them say so):
    alpha_next: Optional[float] = None  # the level the sampler steps to: schedule.alpha[i + 1]
    sigma_next: Optional[float] = None  # schedule.sigma[i + 1]
    prediction_type: Optional[str] = None  # the network's output: epsilon | v_prediction | sample | flow

    @property
    def fraction(self) -> float:
        """Fraction of the run completed before this step, in [0, 1)."""
        return self.index / max(1, self.num_steps)

    @property
    def is_flow(self) -> bool:
        """Rectified flow (alpha + sigma = 1) rather than variance preserving (alpha^2 + sigma^2 = 1).

        Read from `prediction_type` when the engine gives it; otherwise from the noise levels. The two
        families share only the end points (alpha, sigma) = (0, 1) and (1, 0), which read as flow."""
        if self.prediction_type is not None:
            return self.prediction_type == "flow"
        levels = [(self.alpha, self.sigma)]
        if self.alpha_next is not None and self.sigma_next is not None:
            levels.append((self.alpha_next, self.sigma_next))
        for a, s in levels:
            if abs(a + s - 1.0) > 1e-6:
                return False
            if abs(a * a + s * s - 1.0) > 1e-6:
                return True
        return True


def prediction_for_step(x: torch.Tensor, x_next: torch.Tensor, step: StepInfo) -> Prediction:
    """The prediction (x0, eps) consistent with the state, alpha x0 + sigma eps = x, whose first-order
    step lands on `x_next`: alpha' x0 + sigma' eps = x_next (alpha', sigma' = step.alpha_next, sigma_next).

    DDIM (eta = 0) and Euler step to alpha' x0 + sigma' eps, and the flow Euler step
    x + (sigma' - sigma)(eps - x0) is the same point for a consistent prediction, so all of them land
    exactly on `x_next`. Solved in float64; the 2x2 system is regular whenever the signal-to-noise ratio
    changes over the step (alpha sigma' != sigma alpha')."""
    if step.alpha_next is None or step.sigma_next is None:
        raise ValueError("this guidance needs the next noise level (StepInfo.alpha_next, sigma_next), "
                         "which the engine fills")
    a, s, a1, s1 = step.alpha, step.sigma, step.alpha_next, step.sigma_next
    det = a * s1 - s * a1
    if abs(det) < 1e-12:
        raise ValueError(f"step {step.index}: the noise level does not change (alpha={a}, sigma={s}), "
                         "so no prediction moves the state")
    xd, nd = x.double(), x_next.double()
    x0 = (s1 * xd - s * nd) / det
    eps = (a * nd - a1 * xd) / det
    return Prediction(x0.to(x.dtype), eps.to(x.dtype))


def check_range(method: str, param: str, value, lo: float, hi: float, *, open_lo: bool = False) -> None:
    """Raise ValueError naming `param` unless lo <= value <= hi (lo < value when `open_lo`)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and (lo < value if open_lo else lo <= value) and value <= hi):
        bracket = "(" if open_lo else "["
        raise ValueError(f"{method}: {param}={value!r} is outside {bracket}{lo}, {hi}]")


def check_window(method: str, start_name: str, start: float, stop_name: str, stop: float) -> None:
    """Raise ValueError unless 0 <= start <= stop <= 1 (a window over the run, as fractions of the steps)."""
    if not (0.0 <= start <= stop <= 1.0):
        raise ValueError(f"{method}: {start_name}={start}, {stop_name}={stop} must satisfy "
                         f"0 <= {start_name} <= {stop_name} <= 1")


def in_window(step: StepInfo, start: float, stop: float) -> bool:
    return start <= step.fraction < stop


@dataclass
class Guidance:
    """Base class; subclasses are dataclasses whose fields are the method's parameters."""

    guidance_scale: float = 5.0
    start: float = 0.0  # window over the steps, as fractions of the run
    stop: float = 1.0

    name = "base"
    space = "any"  # the parameterization the combination rule is written in
    scale_range = (0.0, 30.0)
    all_branches = ("uncond", "cond")  # every branch `branches` may return (a class attribute, not a parameter)

    def validate(self) -> None:
        check_range(self.name, "guidance_scale", self.guidance_scale, *self.scale_range)
        check_window(self.name, "start", self.start, "stop", self.stop)

    def active(self, step: StepInfo) -> bool:
        return in_window(step, self.start, self.stop)

    def reset(self) -> None:
        """Forget per-run state (momentum buffers, switches); called before every run."""

    def branches(self, step: StepInfo) -> tuple[str, ...]:
        return ("uncond", "cond") if self.active(step) else ("cond",)

    def combine(self, preds: dict[str, Prediction], step: StepInfo, x: torch.Tensor) -> Prediction:
        raise NotImplementedError

    def __call__(self, preds: dict[str, Prediction], step: StepInfo, x: torch.Tensor) -> Prediction:
        if not self.active(step) or set(preds) == {"cond"}:
            return preds["cond"]
        return self.combine(preds, step, x)

    @contextlib.contextmanager
    def patch(self, bundle):
        """Install model perturbations for the run and restore them afterwards (none by default)."""
        yield

    # Energy-gradient methods (survey §1.3, §6) set this: the engine then runs the network with
    # autograd on the state x, and `combine` may differentiate through the predictions.
    needs_grad = False

    def set_prompts(self, prompts: list[str]) -> None:
        """The run's prompt of each image, given before `prepare` (for methods whose target is the prompt,
        such as classifier guidance); ignored by default."""

    def prepare(self, bundle, height: int, width: int) -> None:
        """Per-run set-up that needs the model and the output size (e.g. a measurement); none by default."""

    def metrics(self, images: torch.Tensor) -> dict:
        """Figures of the finished run (images in [-1, 1]) to show under the picture; none by default."""
        return {}

    def before_forward(self, branches: tuple[str, ...], rows: dict[str, slice], x_in: torch.Tensor) -> None:
        """Called by the engine before every network forward: `rows[b]` are the batch rows of branch b in
        `x_in`. Methods whose processors perturb some rows (survey §5.2) record them here; none by default."""

    def extra_forwards(self, preds: dict[str, Prediction], step: StepInfo, x: torch.Tensor) -> tuple["ExtraForward", ...]:
        """Forward passes to run after the step's batched forward, from its predictions; none by default."""
        return ()

    def params(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


PERTURBED_SUFFIX = "_perturbed"


def conditioning_branch(branch: str) -> str:
    """The encoded conditioning a branch runs with: "cond_perturbed" -> "cond", "cond" -> "cond"."""
    return branch[: -len(PERTURBED_SUFFIX)] if branch.endswith(PERTURBED_SUFFIX) else branch


def is_perturbed(branch: str) -> bool:
    """Whether the network runs perturbed (by the method's processors) on this branch's rows."""
    return branch.endswith(PERTURBED_SUFFIX)


@dataclass
class ExtraForward:
    """One more forward pass of a step (survey §5.2.2 SAG, §5.2.5 AutoGuidance), asked for by `extra_forwards`.

    The engine batches the extra forwards of a step that share a network into one call and adds their
    predictions to `preds` as `branch`; each prediction is consistent with its own input state `x`.
    """

    branch: str  # the name of its prediction in `preds`
    conditioning: str  # the encoded conditioning it runs with: "cond", "uncond", ...
    x: Optional[torch.Tensor] = None  # its input state; None: the step's state
    module: str = "unet"  # the bundle module that runs as the network (e.g. "unet_weak")


GUIDANCE_METHODS: dict[str, type[Guidance]] = {}


def register(cls: type[Guidance]) -> type[Guidance]:
    GUIDANCE_METHODS[cls.name] = cls
    return cls


# The built-in methods, one file each; importing a file registers its method.
METHOD_MODULES = ("cfg", "negative_term", "interval", "apg", "cfg_pp", "tcfg", "tag", "adaptive", "beta_cfg",
                  "cfg_zero_star")
# internal-contrast self-guidance (survey §5.2): perturbed attention, smoothed energy, self-attention, weak model
METHOD_MODULES += ("pag", "seg", "sag", "autoguidance")
# measurement guidance for inverse problems (survey §6): soft (gradient) and hard (projection) consistency
METHOD_MODULES += ("measurement_soft", "measurement_hard")
# explicit guidance with an external gradient (survey §3.1): the noise-aware ShapesWorld classifier
METHOD_MODULES += ("classifier",)


def load_methods() -> dict[str, type[Guidance]]:
    """Import (and so register) every built-in method; returns the registry."""
    for module in METHOD_MODULES:
        importlib.import_module(f"{__package__}.{module}")
    return GUIDANCE_METHODS


def guidance_names() -> list[str]:
    """The names `get_guidance` accepts, sorted."""
    return sorted(load_methods())


def get_guidance(name: str, **params) -> Guidance:
    """Build a guidance method by its name (the file name in studio/guidance/) with its parameters."""
    load_methods()
    if name not in GUIDANCE_METHODS:
        raise ValueError(f"unknown guidance {name!r}; available: {', '.join(sorted(GUIDANCE_METHODS))}")
    cls = GUIDANCE_METHODS[name]
    known = {f.name for f in fields(cls)}
    unknown = set(params) - known
    if unknown:
        raise ValueError(f"{name}: unknown parameter(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    g = cls(**params)
    g.validate()
    return g
