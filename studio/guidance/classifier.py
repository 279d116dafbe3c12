"""Classifier guidance (survey §3.1, L330-363) with the noise-aware ShapesWorld attribute classifier.

The survey's Bayes decomposition (L334) grad log p_t(x_t | c) = grad log p_t(x_t) + grad log p_t(c | x_t)
is made usable by a classifier p_phi(c | x_t, t) trained on noisy states (`toyworld/classifier.py`):

    g_phi(x_t, t; c) = grad_{x_t} log p_phi(c | x_t, t)                                  (L340)
    s~(x_t, t; c)    = s_theta(x_t, t) + w(t) g_phi(x_t, t; c)                          (L348)

Sign. With E_phi = -log p_phi (L344), the energy template is u_ctrl = u_base - lambda(t) grad E_phi
(L118, L234, L321), i.e. u_base + lambda(t) grad log p_phi. L356 writes "+ lambda grad E_phi", which
would push away from the class; we use the sign of L118/L321 (= the guided score of L348; flow form L360).

In eps form, with the state x = alpha x_0 + sigma eps (so s_theta = -eps_hat / sigma), the guided score
s~ = -eps' / sigma gives (standard, not in the survey)

    eps' = eps_hat - w * sigma * g,       g = sum_k grad_{x_t} log p_phi(c_k | x_t, t),
    x0'  = (x_t - sigma * eps') / alpha   (alpha > 0; at alpha = 0 the state is pure noise and x0' = x0_hat),

with eps_hat, x0_hat the CFG prediction u_uncond + guidance_scale (u_cond - u_uncond) (guidance_scale 1 =
the conditional model alone, one network pass), w = `classifier_scale` and the sum over the attributes the
prompt states: shape and colour always, size, position and background when the caption names them. The
prompt is parsed with `world.parse_caption`; it must be a one-object ShapesWorld caption with base shapes
and textures (the classifier's heads describe the first object of one-object scenes).

Space: eps (the score). The same formula serves the flow twin: its state (1 - s) x_0 + s eps is fed to the
classifier as the variance-preserving state x / sqrt(alpha^2 + sigma^2) at abar = alpha^2 / (alpha^2 + sigma^2)
(`classifier.vp_inputs`), and eps' = eps_hat - w sigma g holds for any alpha, sigma because the noisy
marginal's score is -E[eps | x_t] / sigma in both families.

Gradients flow through the classifier only, never through the generator: `combine` differentiates the
classifier on a detached copy of x_t (outside inference mode, inside an enable_grad block), so the method
keeps `needs_grad = False` and the engine runs the UNet under inference mode, without autograd.

The target prompt: the engine does not hand the run's prompt to guidance methods, so it is the parameter
`prompt` (the caption to steer toward; one for the batch), or a list given with `set_prompts` (one per image).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..denoiser import Prediction
from ..toyworld import classifier as clf
from ..toyworld import world
from .base import Guidance, StepInfo, check_range, register

SHAPESWORLD_FAMILIES = ("shapesworld", "shapesworld-flow")


def stated_targets(prompt: str) -> dict[str, int]:
    """{head: class index} for every attribute a one-object ShapesWorld caption states (survey §3.1's c);
    ValueError for text outside the grammar or outside what the classifier knows."""
    scene = world.parse_caption(prompt)
    if scene is None:
        raise ValueError(f"classifier guidance: {prompt!r} is not a ShapesWorld caption (e.g. \"a small red "
                         f"circle on the left on a gray background\")")
    if len(scene.objects) != 1:
        raise ValueError(f"classifier guidance: {prompt!r} describes {len(scene.objects)} objects; the classifier "
                         "reads one-object scenes only")
    o = scene.objects[0]
    if o.shape not in clf.HEADS["shape"] or o.texture != "plain":
        raise ValueError(f"classifier guidance: {prompt!r} names a held-out concept ({o.shape}, {o.texture}) "
                         "that the classifier has no class for")
    targets = {"shape": o.shape, "color": o.color}
    if scene.mention_size[0]:
        targets["size"] = o.size
    if scene.mention_position[0]:
        targets["position"] = o.position
    if scene.mention_background:
        targets["background"] = scene.background
    return {k: clf.HEADS[k].index(v) for k, v in targets.items()}


def log_prob_of_targets(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor],
                        mask: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-row sum_k log p_phi(c_k | x_t, t) over the stated heads (mask 1) -> (B,)."""
    total = 0.0
    for k, lab in labels.items():
        lp = logits[k].float().log_softmax(-1).gather(1, lab.view(-1, 1)).squeeze(1)
        total = total + lp * mask[k]
    return total


@register
@dataclass
class ClassifierGuidance(Guidance):
    guidance_scale: float = 1.0  # CFG weight of the base prediction; 1 = the conditional model alone
    classifier_scale: float = 1.0  # w in eps' = eps - w sigma grad log p_phi
    prompt: str = ""  # the caption to steer toward; "" = the prompts given with set_prompts

    name = "classifier"
    space = "eps (score)"
    needs_grad = False  # the classifier's gradient is taken inside combine; the UNet runs without autograd
    classifier_dir = None  # a class attribute (not a request parameter); None: the shipped classifier

    def validate(self) -> None:
        super().validate()
        check_range(self.name, "classifier_scale", self.classifier_scale, 0.0, 1000.0)
        if not isinstance(self.prompt, str):
            raise ValueError(f"{self.name}: prompt must be text")
        if self.prompt:
            stated_targets(self.prompt)

    def __post_init__(self):
        self._prompts: Optional[list[str]] = None
        self._model = self._bundle = None
        self._labels = self._mask = None

    def set_prompts(self, prompts: Sequence[str]) -> None:
        """The run's prompts, one per image (used when the `prompt` parameter is empty)."""
        self._prompts = list(prompts)

    def branches(self, step: StepInfo) -> tuple[str, ...]:
        if not self.active(step) or self.guidance_scale == 1.0:
            return ("cond",)
        return ("uncond", "cond")

    def prepare(self, bundle, height: int, width: int) -> None:
        """Check the model and size, parse the target prompt(s), load the classifier on the bundle's device."""
        family = getattr(bundle, "family", None)
        if family not in SHAPESWORLD_FAMILIES:
            raise ValueError(f"classifier guidance needs a ShapesWorld model (its classifier reads ShapesWorld "
                             f"latents); {getattr(bundle, 'name', '') or family!r} is a {family} model")
        size = world.IMAGE_SIZE
        if (height, width) != (size, size):
            raise ValueError(f"classifier guidance: the classifier reads {size}x{size} images, not {width}x{height}")
        prompts = [self.prompt] if self.prompt else self._prompts
        if not prompts:
            raise ValueError("classifier guidance: give the caption to steer toward as the parameter prompt=...")
        targets = [stated_targets(p) for p in prompts]
        self._labels = {k: torch.tensor([t.get(k, 0) for t in targets]) for k in clf.HEADS}
        self._mask = {k: torch.tensor([float(k in t) for t in targets]) for k in clf.HEADS}
        self._bundle = bundle
        self._model = clf.load_classifier(self.classifier_dir, device=bundle.device)
        self._table = clf.noise_table()

    def _rows(self, tensors: dict[str, torch.Tensor], n: int, device) -> dict[str, torch.Tensor]:
        """Per-row targets for a batch of n: one prompt broadcasts, one per image must match n."""
        m = next(iter(tensors.values())).shape[0]
        if m not in (1, n):
            raise ValueError(f"classifier guidance: {m} target prompts for a batch of {n} images")
        return {k: v.expand(n).to(device) if m == 1 else v.to(device) for k, v in tensors.items()}

    def gradient(self, x: torch.Tensor, step: StepInfo) -> torch.Tensor:
        """g = grad_x sum_k log p_phi(c_k | x, t) over the stated heads (survey §3.1, L340), through the
        classifier only. Works inside the engine's inference mode: it differentiates a normal copy of x."""
        if self._model is None:
            raise RuntimeError("classifier guidance: prepare() loads the classifier before the run")
        labels = self._rows(self._labels, x.shape[0], x.device)
        mask = self._rows(self._mask, x.shape[0], x.device)
        with torch.inference_mode(False), torch.enable_grad():
            xg = x.detach().clone().float().requires_grad_(True)
            inp, t = clf.vp_inputs(xg, step.alpha, step.sigma, self._table)
            logits = self._model(inp, torch.full((x.shape[0],), t, device=x.device))
            lp = log_prob_of_targets(logits, labels, {k: v.float() for k, v in mask.items()})
            (g,) = torch.autograd.grad(lp.sum(), xg)
        return g.to(x.dtype)

    def combine(self, preds: dict[str, Prediction], step: StepInfo, x: torch.Tensor) -> Prediction:
        """eps' = eps_cfg - w sigma g, x0' = (x - sigma eps') / alpha (x0_cfg at alpha = 0)."""
        c = preds["cond"]
        if "uncond" in preds:
            u, s = preds["uncond"], self.guidance_scale
            base = Prediction(u.x0 + s * (c.x0 - u.x0), u.eps + s * (c.eps - u.eps))
        else:
            base = c
        if self.classifier_scale == 0.0:
            return base
        g = self.gradient(x, step)
        eps = base.eps - (self.classifier_scale * step.sigma) * g
        x0 = (x - step.sigma * eps) / step.alpha if step.alpha > 0 else base.x0
        return Prediction(x0, eps)

    def __call__(self, preds, step, x):
        if not self.active(step):
            return preds["cond"]
        return self.combine(preds, step, x)  # the classifier term acts even with the conditional branch alone

    def metrics(self, images: torch.Tensor) -> dict:
        """Mean log p_phi(stated attributes | x_0, t = 0) of the finished images under the classifier."""
        if self._model is None or images.shape[-2:] != (world.IMAGE_SIZE, world.IMAGE_SIZE):
            return {}
        with torch.inference_mode(False), torch.no_grad():
            z = self._bundle.encode(images.detach().clone().float().clamp(-1, 1))
            labels = self._rows(self._labels, z.shape[0], z.device)
            mask = self._rows(self._mask, z.shape[0], z.device)
            logits = self._model(z, torch.zeros(z.shape[0], device=z.device))
            lp = log_prob_of_targets(logits, labels, {k: v.float() for k, v in mask.items()})
        return {"classifier_log_prob": round(float(lp.mean()), 4)}

