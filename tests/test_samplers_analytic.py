"""Samplers on the exact denoiser of Gaussian data land on the data's mean and variance."""

from __future__ import annotations

import pytest
import torch

from studio.denoiser import PREDICTION_TYPES, Prediction, from_prediction, to_prediction
from studio.inversion.ddim import invert_ddim
from studio.samplers import SAMPLERS
from studio.schedules import make_schedule
from studio.toyworld import models
from tests import tiny
from tests.analytic import GaussianDenoiser

MU = torch.tensor([1.5, -0.5, 0.0, 0.8], dtype=torch.float64)
VAR = torch.tensor([0.25, 1.0, 0.1, 2.0], dtype=torch.float64)
N = 10000

SD_CONFIG = dict(tiny.ddim_scheduler().config)
ZSNR_CONFIG = dict(models.make_diffusion_scheduler().config)
FLOW_CONFIG = dict(tiny.flow_scheduler().config)

CASES = [
    ("ddim", SD_CONFIG, {}), ("ddim", SD_CONFIG, {"eta": 1.0}), ("euler", SD_CONFIG, {}), ("euler_a", SD_CONFIG, {}),
    ("dpmpp_2m", SD_CONFIG, {}), ("ddim", ZSNR_CONFIG, {}), ("euler", ZSNR_CONFIG, {}), ("dpmpp_2m", ZSNR_CONFIG, {}),
    ("euler_a", ZSNR_CONFIG, {}), ("flow_euler", FLOW_CONFIG, {}), ("flow_heun", FLOW_CONFIG, {}),
]


@pytest.mark.parametrize("sampler,config,kw", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_sampler_lands_on_data_distribution(sampler, config, kw):
    # 400 steps: the remaining error is dominated by the schedules' last jump onto sigma = 0
    # (the posterior mean at the last noise level shrinks the variance by var / (var + sigma_last^2)).
    steps = 400
    sched = make_schedule(config, sampler, steps)
    den = GaussianDenoiser(sched, MU, VAR)
    g = torch.Generator().manual_seed(0)
    # start from the exact marginal at the first level (SD's schedule has a non-zero terminal SNR)
    a0, s0 = float(sched.alpha[0]), float(sched.sigma[0])
    x = a0 * MU + (a0**2 * VAR + s0**2).sqrt() * torch.randn((N, 4), generator=g, dtype=torch.float64)
    out = SAMPLERS[sampler](den, x, sched, generator=g, **kw)
    mean, var = out.mean(0), out.var(0)
    # sampling error of the moments with N draws is ~ 3 * sqrt(var / N); add a small discretization budget
    assert torch.all((mean - MU).abs() < 3 * (VAR / N).sqrt() + 0.01), (mean, MU)
    stochastic = sampler == "euler_a" or kw.get("eta", 0) > 0
    assert torch.all(((var - VAR) / VAR).abs() < (0.12 if stochastic else 0.08)), (var, VAR)


def test_wrong_denoiser_is_detected():
    """The check above can fail: a denoiser for other data lands elsewhere."""
    sched = make_schedule(SD_CONFIG, "ddim", 400)
    den = GaussianDenoiser(sched, MU + 0.3, VAR * 2)
    a0, s0 = float(sched.alpha[0]), float(sched.sigma[0])
    x = a0 * MU + (a0**2 * VAR + s0**2).sqrt() * torch.randn((N, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = SAMPLERS["ddim"](den, x, sched)
    assert not torch.all((out.mean(0) - MU).abs() < 3 * (VAR / N).sqrt() + 0.01)
    assert not torch.all(((out.var(0) - VAR) / VAR).abs() < 0.08)


@pytest.mark.parametrize("config", [SD_CONFIG, ZSNR_CONFIG], ids=["sd", "zero-snr"])
def test_ddim_inversion_round_trip(config):
    g = torch.Generator().manual_seed(1)
    x0 = MU + VAR.sqrt() * torch.randn((2000, 4), generator=g, dtype=torch.float64)
    errors = {}
    for steps in (50, 200):
        sched = make_schedule(config, "ddim", steps)
        den = GaussianDenoiser(sched, MU, VAR)
        xT = invert_ddim(den, x0, sched)
        if steps == 200:
            # the inverted latents follow the exact marginal at the first level (N(0, I) at zero terminal SNR)
            a0, s0 = float(sched.alpha[0]), float(sched.sigma[0])
            assert ((xT.mean(0) - a0 * MU).abs() < 0.1).all()
            assert ((xT.var(0) / (a0**2 * VAR + s0**2) - 1).abs() < 0.1).all()
        back = SAMPLERS["ddim"](den, xT, sched)
        errors[steps] = ((back - x0).pow(2).mean() / x0.var(0).mean()).sqrt().item()
    print(f"round-trip relative RMS error: {errors}")
    assert errors[200] < 3e-2
    assert errors[200] < errors[50] / 3  # first-order discretization error: 4x the steps, about 4x smaller


@pytest.mark.parametrize("ptype", PREDICTION_TYPES)
def test_parameterization_round_trip(ptype):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    if ptype == "flow":
        a, s = 0.3, 0.7
    else:
        a, s = 0.6, 0.8  # a^2 + s^2 = 1
    x = a * x0 + s * eps
    out = from_prediction(Prediction(x0, eps), a, s, ptype)
    back = to_prediction(out, x, a, s, ptype)
    assert torch.allclose(back.x0, x0, atol=1e-5) and torch.allclose(back.eps, eps, atol=1e-5)
    expected = {"epsilon": eps, "sample": x0, "flow": eps - x0, "v_prediction": a * eps - s * x0}[ptype]
    assert torch.allclose(out, expected, atol=1e-6)


def test_sampler_choice_checked_against_model_kind():
    with pytest.raises(ValueError, match="does not apply"):
        make_schedule(FLOW_CONFIG, "ddim", 10)
    with pytest.raises(ValueError, match="does not apply"):
        make_schedule(SD_CONFIG, "flow_euler", 10)
    with pytest.raises(ValueError, match="at least 1"):
        make_schedule(SD_CONFIG, "ddim", 0)
