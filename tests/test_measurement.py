"""Measurement guidance for inverse problems (survey §6): operators, soft and hard data consistency."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from studio.denoiser import Prediction
from studio.guidance import StepInfo, get_guidance
from studio.guidance.measurement_hard import psnr
from studio.inverse.operators import Operator
from studio.requests import GenerateRequest
from studio.session import SessionManager
from studio.toyworld import world

OPS = [("inpaint", {"mask": "center"}), ("inpaint", {"mask": "random"}), ("super_resolution", {"factor": 4}),
       ("deblur", {"sigma": 1.5})]


@pytest.mark.parametrize("kind,kw", OPS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(OPS)])
def test_operator_is_linear_and_projection_is_consistent(kind, kw):
    g = torch.Generator().manual_seed(0)
    op = Operator.build(kind, 64, 64, **kw)
    a, b = torch.randn(2, 3, 64, 64, generator=g), torch.randn(2, 3, 64, 64, generator=g)
    assert torch.allclose(op(2 * a + b), 2 * op(a) + op(b), atol=1e-4)
    y = op(b)
    p = op.project(a, y)
    before, after = (op(a) - y).norm(), (op(p) - y).norm()
    if kind == "deblur":  # the pseudo-inverse is regularised (eps) where the blur nearly removes a frequency
        assert after < 0.05 * before
    else:
        assert (op(p) - y).abs().max() < 1e-4 and before > 1.0
        assert torch.allclose(op.project(p, y), p, atol=1e-4)  # a projection: applying it twice changes nothing


def test_soft_gradient_matches_the_survey_chain_rule():
    """grad_x ||A x0_hat(x) - y||^2 = 2 J^T A^T (A x0_hat - y) (§6.3), with a linear x0_hat(x) = k x."""
    g = torch.Generator().manual_seed(1)
    truth = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    path = "/tmp/_studio_truth.png"
    Image.fromarray(((truth[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(path)

    class Identity:
        device = torch.device("cpu")

        def decode(self, z):
            return z

        def encode(self, x):
            return x

    m = get_guidance("measurement_soft", operator_name="super_resolution", image=path, step_size=0.5)
    m.prepare(Identity(), 64, 64)
    k = 0.7
    x = torch.randn(1, 3, 64, 64, generator=g, requires_grad=True)
    pred = Prediction(k * x, torch.zeros_like(x))
    step = StepInfo(3, 10, 0.5, 0.6, 0.8, alpha_next=0.8, sigma_next=0.6)
    out = m({"cond": pred}, step, x)
    r = m.operator(k * x.detach()) - m._y
    grad = 2 * k * torch.nn.functional.interpolate(r, scale_factor=4, mode="nearest") / 16  # A^T of 4x avg-pooling
    expected = k * x.detach() - 0.5 / r.pow(2).sum().sqrt() / 0.8 * grad
    assert torch.allclose(out.x0, expected, atol=1e-5)


@pytest.fixture(scope="module")
def truth_png(tmp_path_factory):
    scene = world.Scene((world.ObjectSpec("circle", "red", "large", "left"),), "gray")
    path = str(tmp_path_factory.mktemp("truth") / "truth.png")
    Image.fromarray(world.render(scene)).save(path)
    return path, world.caption(scene)


@pytest.mark.parametrize("kind", ["inpaint", "super_resolution", "deblur"])
def test_hard_consistency_output_satisfies_the_measurement(truth_png, kind):
    path, prompt = truth_png
    s = SessionManager(device="cpu")
    plain = s.generate(GenerateRequest(prompt, steps=6, seed=1))
    res = s.generate(GenerateRequest(prompt, steps=6, seed=1, guidance="measurement_hard", guidance_scale=1.0,
                                     guidance_params={"operator_name": kind, "image": path}))
    # exact for inpainting; for the others, clipping the output to the valid pixel range costs a little
    assert res.metadata["measurement_psnr"] > {"inpaint": 60, "super_resolution": 35, "deblur": 30}[kind]
    truth = torch.from_numpy(np.asarray(Image.open(path))).permute(2, 0, 1)[None].float() / 127.5 - 1
    out = torch.from_numpy(res.images[0]).permute(2, 0, 1)[None].float() / 127.5 - 1
    base = torch.from_numpy(plain.images[0]).permute(2, 0, 1)[None].float() / 127.5 - 1
    assert abs(psnr(out, truth) - res.metadata["psnr"]) < 0.5
    if kind == "inpaint":  # the known pixels are restored exactly, whatever the model draws elsewhere
        assert psnr(out, truth) > psnr(base, truth) + 3


def test_soft_consistency_reduces_the_residual(truth_png):
    path, prompt = truth_png
    s = SessionManager(device="cpu")
    runs = {}
    for zeta in (0.0, 1.0):
        runs[zeta] = s.generate(GenerateRequest(prompt, steps=8, seed=2, guidance="measurement_soft", guidance_scale=1.0,
                                                guidance_params={"operator_name": "super_resolution", "image": path,
                                                                 "step_size": zeta}))
    assert runs[1.0].metadata["measurement_psnr"] > runs[0.0].metadata["measurement_psnr"] + 3


def test_wrong_image_size_is_a_clear_error(tmp_path):
    p = tmp_path / "small.png"
    Image.new("RGB", (32, 48)).save(p)
    s = SessionManager(device="cpu")
    with pytest.raises(ValueError, match="32x48.*64x64"):
        s.generate(GenerateRequest("a red circle", steps=2, guidance="measurement_hard",
                                   guidance_params={"operator_name": "inpaint", "image": str(p)}))
    with pytest.raises(ValueError, match="operator_name"):
        get_guidance("measurement_hard", operator_name="fourier", image=str(p))
    # the session is still usable
    assert s.generate(GenerateRequest("a red circle", steps=2)).images[0].shape == (64, 64, 3)
