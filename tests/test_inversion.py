"""Inversion (survey §8): the `invert` / `reconstruct` API end to end on tiny seeded models.

The DDIM round trip on the exact Gaussian denoiser lives in test_samplers_analytic.py. Here:

* the API on the tiny SD pipeline (VAE) and its flow-matching twin: typed results, shapes, NFE,
  the method / model-kind checks;
* the flow inversion (reversed Euler) on the exact Gaussian denoiser and on a tiny flow UNet: the
  round-trip error is small and shrinks about 4x with 4x the steps;
* null-text inversion (§8.2) against DDIM inversion (§8.1) at CFG 5, its loss, and early stopping;
* negative-prompt inversion (§8.3): CFG collapses, reconstruction at any scale is the conditional one.

The quantitative tests use the SD UNet architecture with ShapesWorld's exact pixel-unshuffle codec
in place of the VAE, so latent errors are image errors and come from the inversion alone. A random
UNet predicts a rough field; its output layer is scaled by 0.1 (`OUT_SCALE`) so that the field is
smooth enough for DDIM inversion to round-trip at w = 1 (27 dB at 10 steps), as a trained model's is.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from studio.denoiser import to_prediction
from studio.families.base import load_bundle
from studio.families.sd import prediction_type_of
from studio.families.shapesworld import ShapesWorldBundle
from studio.inversion import InversionResult, Reconstruction, image_tensor, invert, psnr, reconstruct
from studio.inversion.ddim import invert_ddim
from studio.inversion.flow import invert_flow, reverse_schedule
from studio.inversion.null_text import fit_null_text
from studio.samplers import SAMPLERS
from studio.schedules import make_schedule
from studio.toyworld import models
from studio.toyworld.codec import PixelUnshuffleCodec
from tests import tiny
from tests.analytic import GaussianDenoiser

PROMPT = "a red cat"
OUT_SCALE = 0.1
STEPS = 10
SCALE = 5.0
NTI_LR = 0.1  # the tiny model's null embedding moves its output little; a larger Adam step shows the fit in 10 updates


def scene() -> np.ndarray:
    img = np.zeros((32, 32, 3), np.uint8)
    img[:] = (200, 40, 40)
    img[8:20, 10:26] = (30, 30, 220)
    return img


def codec_bundle(flow: bool = False, seed: int = 0, out_scale: float = OUT_SCALE) -> ShapesWorldBundle:
    """The tiny SD UNet (48 latent channels, 8x8) with the pixel-unshuffle codec: 32x32 images."""
    tok = tiny.tokenizer()
    unet = tiny.unet(seed, in_channels=48, sample_size=8)
    with torch.no_grad():
        unet.conv_out.weight.mul_(out_scale)
        unet.conv_out.bias.mul_(out_scale)
    sched = dict((tiny.flow_scheduler() if flow else tiny.ddim_scheduler()).config)
    sched["_class_name"] = "FlowMatchEulerDiscreteScheduler" if flow else "DDIMScheduler"
    modules = {"unet": unet.requires_grad_(False),
               "text_encoder": tiny.text_encoder(len(tok), seed=seed).requires_grad_(False)}
    return ShapesWorldBundle(name="tiny-codec", family="shapesworld-flow" if flow else "shapesworld",
                             kind="flow" if flow else "vp", prediction_type=prediction_type_of(sched),
                             scheduler_config=sched, modules=modules, default_size=(32, 32), size_multiple=4,
                             extra={"tokenizer": tok, "codec": PixelUnshuffleCodec(4), "latent_factor": 4})


@pytest.fixture(scope="module")
def vp_bundle():
    return codec_bundle()


def latent_psnr(rec: Reconstruction, result: InversionResult) -> float:
    return psnr(rec.latents, result.source_latents)  # codec latents are pixels in [-1, 1]


# --- the API


def test_api_end_to_end_sd(tiny_sd_dir):
    bundle = load_bundle(tiny_sd_dir)
    img, steps, inner = scene(), 4, 2
    x0 = bundle.encode(image_tensor(img))
    for method in ("ddim", "negative_prompt", "null_text"):
        r = invert(bundle, img, PROMPT, method, steps=steps, guidance_scale=SCALE, num_inner_steps=inner,
                   early_stop=False)
        assert isinstance(r, InversionResult)
        assert (r.method, r.sampler, r.steps, r.guidance_scale, r.prompt) == (method, "ddim", steps, SCALE, [PROMPT])
        assert r.latents.shape == bundle.latent_shape(1, 32, 32) and len(r.trajectory) == steps + 1
        assert r.trajectory[-1] is r.latents and torch.allclose(r.source_latents, x0, atol=1e-6)
        assert r.seconds > 0
        if method == "null_text":
            assert len(r.null_embeddings) == steps and r.inner_steps == [inner] * steps
            # pivot, then per step: the conditional forward, `inner` updates, the step with the optimum
            assert r.nfe == steps + steps * (1 + inner + 1)
        else:
            assert r.null_embeddings is None and r.nfe == steps
        rec = reconstruct(bundle, r)
        assert isinstance(rec, Reconstruction) and rec.nfe == 2 * steps
        assert rec.images[0].shape == (32, 32, 3) and rec.images[0].dtype == np.uint8
        assert torch.equal(r.reconstruct(bundle).latents, rec.latents)  # deterministic
        assert reconstruct(bundle, r, guidance_scale=1.0).nfe == steps
        edit = reconstruct(bundle, r, prompt="a blue dog")
        assert edit.prompt == ["a blue dog"] and not torch.allclose(edit.latents, rec.latents)
    # the same image as uint8 array, uint8 tensor or [-1, 1] tensor
    as_float = torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1
    for same in (torch.from_numpy(img), as_float, as_float[None]):
        assert torch.equal(image_tensor(same), image_tensor(img))
    assert image_tensor(img).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="flow-matching models"):
        invert(bundle, img, PROMPT, "flow", steps=steps)
    with pytest.raises(ValueError, match="unknown inversion method"):
        invert(bundle, img, PROMPT, "edict", steps=steps)
    with pytest.raises(ValueError, match="samples with ddim"):
        invert(bundle, img, PROMPT, "ddim", steps=steps, sampler="euler")


def test_api_end_to_end_flow(tiny_flow_dir):
    bundle = load_bundle(tiny_flow_dir)
    assert bundle.kind == "flow"
    img, steps = scene(), 4
    r = invert(bundle, img, PROMPT, "flow", steps=steps, guidance_scale=1.0)
    assert (r.method, r.sampler, r.nfe, len(r.trajectory)) == ("flow", "flow_euler", steps, steps + 1)
    assert reconstruct(bundle, r).nfe == steps
    for method in ("negative_prompt", "null_text"):  # flow pivot and flow Euler step
        r = invert(bundle, img, PROMPT, method, steps=steps, guidance_scale=SCALE, num_inner_steps=1, early_stop=False)
        assert r.sampler == "flow_euler" and reconstruct(bundle, r).latents.shape == r.latents.shape
    with pytest.raises(ValueError, match="use 'flow'"):
        invert(bundle, img, PROMPT, "ddim", steps=steps)


# --- DDIM inversion holding the network's own output fixed


class FrozenOutput:
    """A network whose output depends on the step only: DDIM inversion holding that output fixed is exact."""

    def __init__(self, schedule, prediction_type, shape):
        g = torch.Generator().manual_seed(3)
        self.schedule, self.ptype = schedule, prediction_type
        self.outs = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(len(schedule))]

    def __call__(self, x, i):
        return to_prediction(self.outs[i], x, self.schedule.alpha[i], self.schedule.sigma[i], self.ptype)


# (an x0 network's last step onto sigma = 0 lands on its output whatever the state: no inverse there)
@pytest.mark.parametrize("ptype,config", [("epsilon", "sd"), ("v_prediction", "sd"), ("sample", "sd"),
                                          ("v_prediction", "zero-snr")])
def test_ddim_inversion_exact_when_output_is_fixed(ptype, config):
    cfg = dict(tiny.ddim_scheduler().config) if config == "sd" else dict(models.make_diffusion_scheduler().config)
    sched = make_schedule(cfg, "ddim", 20)
    x0 = torch.randn((64, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    den = FrozenOutput(sched, ptype, x0.shape)
    back = SAMPLERS["ddim"](den, invert_ddim(den, x0, sched, prediction_type=ptype), sched)
    assert (back - x0).abs().max() < 1e-8
    if ptype != "epsilon":  # holding eps fixed instead is not the inverse of a v / x0 network's step
        back_eps = SAMPLERS["ddim"](den, invert_ddim(den, x0, sched), sched)
        assert (back_eps - x0).abs().max() > 1e-3


# --- flow inversion


def test_reverse_schedule():
    sched = make_schedule(dict(tiny.flow_scheduler().config), "flow_euler", 10)
    rev = reverse_schedule(sched)
    assert torch.equal(rev.sigma, sched.sigma.flip(0)) and torch.equal(rev.alpha, sched.alpha.flip(0))
    assert float(rev.timesteps[0]) == 0.0 and torch.equal(rev.timesteps[1:], sched.timesteps[1:].flip(0))
    # every level's network time is sigma * num_train_timesteps, as the scheduler assigns it
    assert torch.allclose(rev.timesteps.double(), rev.sigma[:-1] * 1000, atol=1e-3)
    with pytest.raises(ValueError, match="flow-matching"):
        reverse_schedule(make_schedule(dict(tiny.ddim_scheduler().config), "ddim", 10))


def test_flow_inversion_round_trip_analytic():
    mu = torch.tensor([1.5, -0.5, 0.0, 0.8], dtype=torch.float64)
    var = torch.tensor([0.25, 1.0, 0.1, 2.0], dtype=torch.float64)
    x0 = mu + var.sqrt() * torch.randn((2000, 4), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    errors, to_noise = {}, {}
    for steps in (25, 100):
        sched = make_schedule(dict(tiny.flow_scheduler().config), "flow_euler", steps)
        xT = invert_flow(GaussianDenoiser(reverse_schedule(sched), mu, var), x0, sched)
        # the exact flow of Gaussian data is the monotone affine map between the marginals: x_1 = (x_0 - mu) / std
        to_noise[steps] = (xT - (x0 - mu) / var.sqrt()).pow(2).mean().sqrt().item()
        back = SAMPLERS["flow_euler"](GaussianDenoiser(sched, mu, var), xT, sched)
        errors[steps] = ((back - x0).pow(2).mean() / x0.var(0).mean()).sqrt().item()
    print(f"flow inversion RMS error to the exact noise: {to_noise}; round-trip relative RMS error: {errors}")
    assert to_noise[100] < 0.05 and to_noise[100] < to_noise[25] / 3  # measured 0.107, 0.027
    assert errors[100] < 0.05 and errors[100] < errors[25] / 3  # first order in the step size; measured 0.141, 0.037


def test_flow_inversion_round_trip_tiny():
    bundle = codec_bundle(flow=True, out_scale=1.0)  # the random UNet as it is
    errors = {}
    for steps in (10, 40, 160):
        r = invert(bundle, scene(), PROMPT, "flow", steps=steps, guidance_scale=1.0)
        back = reconstruct(bundle, r).latents
        errors[steps] = float((back - r.source_latents).pow(2).mean().sqrt() / r.source_latents.pow(2).mean().sqrt())
    print(f"tiny flow round-trip relative RMS error: {errors}")  # measured 0.10, 0.026, 0.0065
    assert errors[160] < 0.02
    assert errors[40] < errors[10] / 3 and errors[160] < errors[40] / 3


# --- null-text and negative-prompt inversion


def test_null_text_beats_ddim_at_cfg(vp_bundle):
    img = scene()
    ddim = invert(vp_bundle, img, PROMPT, "ddim", steps=STEPS, guidance_scale=SCALE)
    npi = invert(vp_bundle, img, PROMPT, "negative_prompt", steps=STEPS, guidance_scale=SCALE)
    nti = invert(vp_bundle, img, PROMPT, "null_text", steps=STEPS, guidance_scale=SCALE, learning_rate=NTI_LR,
                 early_stop=False)
    p = {name: latent_psnr(reconstruct(vp_bundle, r), r) for name, r in (("ddim", ddim), ("npi", npi), ("nti", nti))}
    print(f"reconstruction PSNR at CFG {SCALE}: {p}")  # measured ddim 22.4, npi 27.1, nti 33.3 dB
    assert p["nti"] > p["ddim"] + 6.0
    assert p["nti"] > p["npi"] + 2.0
    # the loss of every step decreases under the updates
    for losses, landed in zip(nti.losses, nti.step_errors):
        assert len(losses) == 10 and landed < losses[0] and min(losses) < losses[0]
    # the same pivot: null-text only changes the unconditional branch
    assert torch.equal(nti.latents, npi.latents) and torch.equal(nti.latents, ddim.latents)


def test_null_text_fit_matches_reconstruction(vp_bundle):
    """The optimisation's own trajectory ends where `reconstruct` ends; with no updates it is DDIM's CFG run."""
    r = invert(vp_bundle, scene(), PROMPT, "ddim", steps=STEPS, guidance_scale=SCALE)
    cond, empty = vp_bundle.encode_prompt([PROMPT]), vp_bundle.encode_negative_prompt([""])
    for inner in (0, 3):
        fit = fit_null_text(vp_bundle, r.schedule, r.trajectory, cond, empty, SCALE, num_inner_steps=inner,
                            learning_rate=NTI_LR, early_stop=False)
        nti = InversionResult(method="null_text", latents=r.latents, trajectory=r.trajectory, prompt=r.prompt,
                              guidance_scale=SCALE, steps=STEPS, sampler="ddim", seconds=0.0, nfe=0, height=32,
                              width=32, schedule=r.schedule, null_embeddings=fit.embeddings)
        rec = reconstruct(vp_bundle, nti).latents
        assert torch.allclose(rec, fit.final_latents, atol=1e-4)
        if inner == 0:
            assert torch.allclose(rec, reconstruct(vp_bundle, r).latents, atol=1e-4)
        else:
            assert not torch.allclose(rec, reconstruct(vp_bundle, r).latents, atol=1e-3)


def test_null_text_early_stop(vp_bundle):
    img, eps = scene(), 1e-4
    fixed = invert(vp_bundle, img, PROMPT, "null_text", steps=STEPS, guidance_scale=SCALE, learning_rate=NTI_LR,
                   early_stop=False)
    early = invert(vp_bundle, img, PROMPT, "null_text", steps=STEPS, guidance_scale=SCALE, learning_rate=NTI_LR,
                   early_stop=True, early_stop_epsilon=eps)
    thresholds = [eps + 1e-3 * i / STEPS for i in range(STEPS)]
    assert sum(fixed.inner_steps) == 10 * STEPS
    assert sum(early.inner_steps) < sum(fixed.inner_steps)  # measured 93 of 100
    for used, losses, threshold in zip(early.inner_steps, early.losses, thresholds):
        assert used == len(losses) and (used == 10 or losses[-1] < threshold)
        assert all(loss >= threshold for loss in losses[:-1])  # it stops at the first loss under the threshold
    err = {name: float((reconstruct(vp_bundle, r).latents - r.source_latents).pow(2).mean())
           for name, r in (("fixed", fixed), ("early", early))}
    print(f"null-text reconstruction MSE: {err}, inner steps {sum(fixed.inner_steps)} vs {sum(early.inner_steps)}")
    # the rule accepts up to threshold_i at step i: the final error stays within their sum (measured 1.9e-3 vs 2.6e-3)
    assert err["early"] <= err["fixed"] + sum(thresholds)
    assert err["early"] < 0.5 * float((reconstruct(vp_bundle, invert(vp_bundle, img, PROMPT, "ddim", steps=STEPS,
                                                                   guidance_scale=SCALE)).latents
                                        - early.source_latents).pow(2).mean())


def test_negative_prompt_reconstruction_collapses_cfg(vp_bundle):
    """With the source prompt in both CFG branches, eps_c - eps_u = 0 and the scale drops out (§8.3 L1437-1443)."""
    r = invert(vp_bundle, scene(), PROMPT, "negative_prompt", steps=STEPS, guidance_scale=SCALE)
    at5 = reconstruct(vp_bundle, r)
    assert at5.nfe == 2 * STEPS  # both branches run
    assert torch.equal(at5.latents, reconstruct(vp_bundle, r, guidance_scale=3.0).latents)
    conditional = reconstruct(vp_bundle, r, guidance_scale=1.0)  # one branch, batch of one
    assert conditional.nfe == STEPS
    assert torch.allclose(at5.latents, conditional.latents, atol=1e-5)  # float rounding of the batched forward: 2e-6
    ddim = invert(vp_bundle, scene(), PROMPT, "ddim", steps=STEPS, guidance_scale=SCALE)
    assert torch.equal(ddim.latents, r.latents)  # same inversion; the empty prompt in CFG makes the difference
    assert (reconstruct(vp_bundle, ddim).latents - at5.latents).abs().max() > 0.05
