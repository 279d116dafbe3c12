"""Guidance methods: each rule against its survey formula written out here in plain torch, the
diffusers guiders where one exists, windows, branch requests (NFE savings), state and validation.

Tensors are small, random and float64; predictions are built consistent with the state,
x = alpha * x0 + sigma * eps, as the engine's `to_prediction` makes them.
"""

from __future__ import annotations

import math

import pytest
import torch

from studio.denoiser import Prediction
from studio.guidance import StepInfo, get_guidance, guidance_names
from studio.guidance.base import prediction_for_step

SHAPE = (3, 2, 4, 4)
ALL = ("adaptive", "apg", "beta_cfg", "cfg", "cfg_pp", "cfg_zero_star", "interval", "negative_term", "tag", "tcfg")


def vp_step(index=3, num_steps=10, t=0.55, t_next=0.45, prediction_type="epsilon", **kw):
    """A variance-preserving step: alpha = cos(pi t / 2), sigma = sin(pi t / 2)."""
    a, s = math.cos(math.pi * t / 2), math.sin(math.pi * t / 2)
    a1, s1 = math.cos(math.pi * t_next / 2), math.sin(math.pi * t_next / 2)
    return StepInfo(index, num_steps, t, a, s, alpha_next=a1, sigma_next=s1, prediction_type=prediction_type, **kw)


def flow_step(index=3, num_steps=10, t=0.6, t_next=0.5, prediction_type="flow"):
    return StepInfo(index, num_steps, t, 1 - t, t, alpha_next=1 - t_next, sigma_next=t_next,
                    prediction_type=prediction_type)


def make(step, names=("uncond", "cond"), seed=0, spread=1.0):
    """A state x and one consistent prediction per branch (x0 drawn around a shared mean)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    mean = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    preds = {}
    for n in names:
        x0 = mean + spread * torch.randn(SHAPE, generator=g, dtype=torch.float64)
        preds[n] = Prediction(x0, (x - step.alpha * x0) / step.sigma)
    return x, preds


def close(a, b, tol=1e-9):
    return torch.allclose(a, b, rtol=tol, atol=tol)


def per_sample_dot(a, b):
    return (a * b).flatten(1).sum(1).view(-1, 1, 1, 1)


def consistent(p, x, step, tol=1e-9):
    return close(step.alpha * p.x0 + step.sigma * p.eps, x, tol)


# --- registry, windows, validation -------------------------------------------------------------

def test_every_method_is_registered_and_builds_with_its_defaults():
    assert set(ALL) <= set(guidance_names())
    for name in ALL:
        g = get_guidance(name)
        assert g.name == name
    with pytest.raises(ValueError, match="unknown guidance 'nope'"):
        get_guidance("nope")


@pytest.mark.parametrize("name", ALL)
def test_window_start_stop_is_honoured(name):
    g = get_guidance(name, start=0.5, stop=0.8)
    g.reset()
    x, preds = make(vp_step(), names=("uncond", "cond", "negative"))
    for index, inside in ((1, False), (6, True), (8, False)):  # fractions 0.1, 0.6, 0.8 (stop is excluded)
        step = vp_step(index=index, t=0.5)
        if inside:
            assert "uncond" in g.branches(step)
        else:
            assert g.branches(step) == ("cond",)
            assert g(preds, step, x) is preds["cond"]
            assert g({"cond": preds["cond"]}, step, x) is preds["cond"]


@pytest.mark.parametrize("name, params, message", [
    ("cfg", {"guidance_scale": 40.0}, "guidance_scale"),
    ("cfg", {"guidance_rescale": 1.5}, "guidance_rescale"),
    ("cfg", {"start": 0.8, "stop": 0.2}, "start"),
    ("cfg", {"rescale": 0.5}, "unknown parameter.*rescale"),
    ("negative_term", {"negative_scale": -1.0}, "negative_scale"),
    ("interval", {"t_lo": 0.8, "t_hi": 0.2}, "t_lo"),
    ("interval", {"t_hi": 1.5}, "t_hi"),
    ("interval", {"schedule": "ramp"}, "schedule"),
    ("interval", {"early_scale": 50.0}, "early_scale"),
    ("interval", {"late_scale": -1.0}, "late_scale"),
    ("apg", {"eta": 1.5}, "eta"),
    ("apg", {"norm_threshold": -1.0}, "norm_threshold"),
    ("apg", {"momentum": -1.0}, "momentum"),
    ("cfg_pp", {"guidance_scale": 7.5}, r"guidance_scale=7.5 is outside \[0.0, 1.0\]"),
    ("tag", {"tangential_scale": -0.1}, "tangential_scale"),
    ("tag", {"radial_scale": 9.0}, "radial_scale"),
    ("adaptive", {"threshold": 1.2}, "threshold"),
    ("beta_cfg", {"a": 1.0}, "a=1.0"),
    ("beta_cfg", {"b": 0.5}, "b=0.5"),
    ("beta_cfg", {"gamma": -1.0}, "gamma"),
    ("cfg_zero_star", {"zero_init_steps": -1}, "zero_init_steps"),
    ("cfg_zero_star", {"zero_init_steps": 1.5}, "zero_init_steps"),
])
def test_validation_names_the_parameter(name, params, message):
    with pytest.raises(ValueError, match=message):
        get_guidance(name, **params)


def test_step_info_reads_the_family():
    assert flow_step(prediction_type=None).is_flow
    assert not vp_step(prediction_type=None).is_flow
    # the end point (alpha, sigma) = (0, 1) is shared; the next level decides, and alone it reads as flow
    assert StepInfo(0, 10, 1.0, 0.0, 1.0, alpha_next=0.1, sigma_next=0.9).is_flow
    assert not StepInfo(0, 10, 1.0, 0.0, 1.0, alpha_next=0.6, sigma_next=0.8).is_flow
    assert not StepInfo(0, 10, 1.0, 0.0, 1.0, prediction_type="v_prediction").is_flow


def test_prediction_for_step_is_consistent_and_lands_on_the_target():
    for step in (vp_step(), flow_step(), flow_step(index=0, t=1.0, t_next=0.9)):
        x, preds = make(step)
        target = x + 0.1 * preds["cond"].x0
        p = prediction_for_step(x, target, step)
        assert consistent(p, x, step)
        assert close(step.alpha_next * p.x0 + step.sigma_next * p.eps, target)
    with pytest.raises(ValueError, match="alpha_next"):
        prediction_for_step(x, x, StepInfo(0, 10, 0.5, 0.8, 0.6))


# --- CFG and guidance rescale -----------------------------------------------------------------

def test_cfg_formula_and_one_branch_at_scale_one():
    step = vp_step()
    x, p = make(step)
    w = 3.5
    out = get_guidance("cfg", guidance_scale=w)(p, step, x)
    u, c = p["uncond"], p["cond"]
    assert close(out.eps, u.eps + w * (c.eps - u.eps)) and close(out.x0, u.x0 + w * (c.x0 - u.x0))
    assert consistent(out, x, step)
    assert not close(get_guidance("cfg", guidance_scale=w + 1)(p, step, x).eps, out.eps)
    assert get_guidance("cfg", guidance_scale=1.0).branches(step) == ("cond",)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow", None])
def test_cfg_rescale_formula_in_the_native_output_space(prediction_type):
    step = flow_step() if prediction_type == "flow" else vp_step(prediction_type=prediction_type)
    x, p = make(step)
    w, phi = 6.0, 0.7
    a, s = step.alpha, step.sigma

    def native(q):  # Lin et al. rescale the network output; the engine's type, eps when unknown
        spaces = {"epsilon": q.eps, None: q.eps, "v_prediction": a * q.eps - s * q.x0, "flow": q.eps - q.x0}
        return spaces[prediction_type]

    g_c, g_u = native(p["cond"]), native(p["uncond"])
    g = g_u + w * (g_c - g_u)
    ratio = g_c.flatten(1).std(1).view(-1, 1, 1, 1) / g.flatten(1).std(1).view(-1, 1, 1, 1)
    expected = phi * g * ratio + (1 - phi) * g
    out = get_guidance("cfg", guidance_scale=w, guidance_rescale=phi)(p, step, x)
    assert close(native(out), expected)
    assert consistent(out, x, step)
    plain = get_guidance("cfg", guidance_scale=w)(p, step, x)
    assert close(get_guidance("cfg", guidance_scale=w, guidance_rescale=0.0)(p, step, x).eps, plain.eps)
    assert not close(out.eps, plain.eps, 1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_cfg_rescale_matches_diffusers_guider(prediction_type):
    from diffusers.guiders import ClassifierFreeGuidance

    step = vp_step(prediction_type=prediction_type)
    x, p = make(step)
    w, phi = 7.5, 0.7
    guider = ClassifierFreeGuidance(guidance_scale=w, guidance_rescale=phi)
    guider.set_state(step=step.index, num_inference_steps=step.num_steps, timestep=torch.tensor(500))
    as_out = (lambda q: q.eps) if prediction_type == "epsilon" else (lambda q: q.v(step.alpha, step.sigma))
    ref = guider.forward(pred_cond=as_out(p["cond"]), pred_uncond=as_out(p["uncond"])).pred
    ours = get_guidance("cfg", guidance_scale=w, guidance_rescale=phi)(p, step, x)
    assert close(as_out(ours), ref, 1e-7)


# --- negative prompt as a subtractive term ----------------------------------------------------

def test_negative_term_formula_with_three_branches():
    step = vp_step()
    x, p = make(step, names=("uncond", "cond", "negative"))
    g = get_guidance("negative_term", guidance_scale=5.0, negative_scale=2.0)
    assert g.branches(step) == ("uncond", "cond", "negative") and "negative" in g.all_branches
    out = g(p, step, x)
    u, c, n = p["uncond"], p["cond"], p["negative"]
    for f in ("x0", "eps"):
        expected = getattr(u, f) + 5.0 * (getattr(c, f) - getattr(u, f)) - 2.0 * (getattr(n, f) - getattr(u, f))
        assert close(getattr(out, f), expected)
    assert consistent(out, x, step)
    # w_- defaults to w_+: u_uncond + w (u_+ - u_-)
    same = get_guidance("negative_term", guidance_scale=5.0)(p, step, x)
    assert close(same.eps, u.eps + 5.0 * (c.eps - n.eps))
    assert not close(same.eps, out.eps)


# --- limited interval and weak-strong-weak --------------------------------------------------------

def test_limited_interval_uses_one_branch_outside_the_interval():
    g = get_guidance("interval", guidance_scale=6.0, t_lo=0.3, t_hi=0.7)
    for t, inside in ((0.9, False), (0.7, True), (0.5, True), (0.3, False), (0.1, False)):
        step = vp_step(t=t, t_next=max(0.0, t - 0.1))
        x, p = make(step)
        if inside:
            assert g.branches(step) == ("uncond", "cond")
            u, c = p["uncond"], p["cond"]
            out = g(p, step, x)
            assert close(out.eps, u.eps + 6.0 * (c.eps - u.eps)) and close(out.x0, u.x0 + 6.0 * (c.x0 - u.x0))
        else:
            assert g.branches(step) == ("cond",)
            assert g({"cond": p["cond"]}, step, x) is p["cond"]


def test_weak_strong_weak_schedule_follows_the_table():
    g = get_guidance("interval", schedule="weak_strong_weak", guidance_scale=7.0, early_scale=1.5, late_scale=2.5)
    for t, w in ((0.9, 1.5), (0.5, 7.0), (0.2, 2.5)):
        step = vp_step(t=t, t_next=t - 0.1)
        x, p = make(step)
        assert g.branches(step) == ("uncond", "cond")
        u, c = p["uncond"], p["cond"]
        assert close(g(p, step, x).eps, u.eps + w * (c.eps - u.eps))
    early_off = get_guidance("interval", schedule="weak_strong_weak", early_scale=1.0)
    assert early_off.branches(vp_step(t=0.9, t_next=0.8)) == ("cond",)


# --- APG ----------------------------------------------------------------------------------

def apg_reference(steps, w, eta, r, beta):
    """Survey §5.1.1 in x0 space, with the momentum recursion m_i = D_i + beta m_{i-1} before the threshold."""
    m, outs, clipped = 0.0, [], False
    for step, x, p in steps:
        c, u = p["cond"].x0, p["uncond"].x0
        m = (c - u) + beta * m
        norm = m.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        scale = torch.clamp(r / norm, max=1.0)
        clipped |= bool((scale < 1).any())
        d = m * scale
        par = per_sample_dot(d, c) / per_sample_dot(c, c) * c
        x0 = c + (w - 1) * ((d - par) + eta * par)
        outs.append(Prediction(x0, (x - step.alpha * x0) / step.sigma))
    return outs, clipped


def apg_steps(n=3):
    out = []
    for i in range(n):
        step = vp_step(index=i, t=0.9 - 0.1 * i, t_next=0.8 - 0.1 * i)
        x, p = make(step, seed=10 + i)
        out.append((step, x, p))
    return out


def test_apg_matches_the_survey_formula_with_momentum_and_threshold():
    w, eta, r, beta = 6.0, 0.25, 6.5, -0.5
    steps = apg_steps()
    expected, clipped = apg_reference(steps, w, eta, r, beta)
    assert clipped  # the threshold is exercised
    g = get_guidance("apg", guidance_scale=w, eta=eta, norm_threshold=r, momentum=beta)
    g.reset()
    for (step, x, p), e in zip(steps, expected):
        out = g(p, step, x)
        assert close(out.x0, e.x0) and close(out.eps, e.eps)
        assert consistent(out, x, step)
    # reset() forgets the momentum: the first step again equals a fresh run's first step
    g.reset()
    step, x, p = steps[1]
    fresh = get_guidance("apg", guidance_scale=w, eta=eta, norm_threshold=r, momentum=beta)(p, step, x)
    assert close(g(p, step, x).x0, fresh.x0)
    assert not close(fresh.x0, expected[1].x0)
    # eta matters
    assert not close(get_guidance("apg", guidance_scale=w, eta=0.9)(p, step, x).x0,
                     get_guidance("apg", guidance_scale=w, eta=0.1)(p, step, x).x0)


def test_apg_matches_diffusers_guider():
    from diffusers.guiders import AdaptiveProjectedGuidance
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer

    w, eta, r, beta = 6.0, 0.25, 6.5, -0.5
    # the survey's x0_cond + (w - 1) D~ is diffusers' original formulation with scale w - 1
    guider = AdaptiveProjectedGuidance(guidance_scale=w - 1, adaptive_projected_guidance_momentum=beta,
                                       adaptive_projected_guidance_rescale=r, eta=eta, use_original_formulation=True)
    guider.momentum_buffer = MomentumBuffer(beta)  # what its prepare_inputs does at step 0
    g = get_guidance("apg", guidance_scale=w, eta=eta, norm_threshold=r, momentum=beta)
    for step, x, p in apg_steps():
        guider.set_state(step=step.index, num_inference_steps=step.num_steps, timestep=torch.tensor(900))
        ref = guider.forward(pred_cond=p["cond"].x0, pred_uncond=p["uncond"].x0).pred
        assert close(g(p, step, x).x0, ref, 1e-7)


# --- CFG++ ----------------------------------------------------------------------------------

@pytest.mark.parametrize("step", [vp_step(), flow_step(), flow_step(index=0, t=1.0, t_next=0.9)])
def test_cfg_pp_denoises_with_the_guided_x0_and_renoises_with_the_unconditional_eps(step):
    x, p = make(step)
    lam = 0.6
    u, c = p["uncond"], p["cond"]
    x0_lam = (1 - lam) * u.x0 + lam * c.x0
    target = step.alpha_next * x0_lam + step.sigma_next * u.eps  # §5.1.2's DDIM step
    out = get_guidance("cfg_pp", guidance_scale=lam)(p, step, x)
    assert close(step.alpha_next * out.x0 + step.sigma_next * out.eps, target)  # DDIM (eta = 0) and Euler
    assert consistent(out, x, step)
    if step.is_flow:  # flow Euler: x + (sigma' - sigma) * velocity
        assert close(x + (step.sigma_next - step.sigma) * (out.eps - out.x0), target)
    other = get_guidance("cfg_pp", guidance_scale=0.2)(p, step, x)
    assert not close(step.alpha_next * other.x0 + step.sigma_next * other.eps, target)


def test_cfg_pp_without_the_next_level_returns_guided_x0_and_unconditional_eps():
    step = StepInfo(3, 10, 0.5, 0.8, 0.6)
    x, p = make(step)
    out = get_guidance("cfg_pp", guidance_scale=0.3)(p, step, x)
    assert close(out.x0, 0.7 * p["uncond"].x0 + 0.3 * p["cond"].x0)
    assert out.eps is p["uncond"].eps


# --- TCFG ----------------------------------------------------------------------------------

def tcfg_reference(p, step, x, w):
    """Survey §5.1.3 (1) on scores s = -eps / sigma: S = [s_uncond s_cond] (d x 2) = U S V^T, keep U[:, :1]."""
    s_u, s_c = -p["uncond"].eps / step.sigma, -p["cond"].eps / step.sigma
    out = torch.empty_like(s_u)
    for i in range(s_u.shape[0]):
        S = torch.stack([s_u[i].flatten(), s_c[i].flatten()], dim=1)
        U, _, _ = torch.linalg.svd(S, full_matrices=False)
        u1 = U[:, :1]
        s_u_t = (u1 @ (u1.T @ s_u[i].flatten()[:, None])).view_as(s_u[i])
        out[i] = s_u_t + w * (s_c[i] - s_u_t)
    eps = -step.sigma * out
    return Prediction((x - step.sigma * eps) / step.alpha, eps)


def test_tcfg_matches_the_survey_formula_in_score_space():
    step = vp_step()
    x, p = make(step)
    w = 5.0
    out = get_guidance("tcfg", guidance_scale=w)(p, step, x)
    expected = tcfg_reference(p, step, x, w)
    assert close(out.eps, expected.eps) and close(out.x0, expected.x0)
    assert consistent(out, x, step)
    cfg = get_guidance("cfg", guidance_scale=w)(p, step, x)
    assert not close(out.eps, cfg.eps, 1e-4)  # the filter is not the identity
    # at alpha = 0 (pure noise) it is CFG on (x0, eps)
    noise = StepInfo(0, 10, 1.0, 0.0, 1.0, alpha_next=0.1, sigma_next=0.9, prediction_type="flow")
    xn, pn = make(flow_step(index=0, t=0.99, t_next=0.9))
    zero = get_guidance("tcfg", guidance_scale=w)(pn, noise, xn)
    assert close(zero.eps, pn["uncond"].eps + w * (pn["cond"].eps - pn["uncond"].eps))


def test_tcfg_matches_diffusers_guider():
    from diffusers.guiders import TangentialClassifierFreeGuidance

    step = vp_step()
    x, p = make(step)
    guider = TangentialClassifierFreeGuidance(guidance_scale=5.0)
    guider.set_state(step=step.index, num_inference_steps=step.num_steps, timestep=torch.tensor(500))
    ref = guider.forward(pred_cond=p["cond"].eps, pred_uncond=p["uncond"].eps).pred
    assert close(get_guidance("tcfg", guidance_scale=5.0)(p, step, x).eps, ref, 1e-5)  # diffusers' SVD runs in float32


# --- TAG ------------------------------------------------------------------------------------

@pytest.mark.parametrize("step", [vp_step(), flow_step()])
def test_tag_amplifies_the_tangential_part_of_the_step(step):
    x, p = make(step)
    w, lam_par, lam_perp = 4.0, 1.0, 1.3
    u, c = p["uncond"], p["cond"]
    x0, eps = u.x0 + w * (c.x0 - u.x0), u.eps + w * (c.eps - u.eps)
    delta = step.alpha_next * x0 + step.sigma_next * eps - x
    unit = x / x.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    par = per_sample_dot(unit, delta) * unit
    target = x + lam_par * par + lam_perp * (delta - par)
    out = get_guidance("tag", guidance_scale=w, tangential_scale=lam_perp, radial_scale=lam_par)(p, step, x)
    x_next = step.alpha_next * out.x0 + step.sigma_next * out.eps
    assert close(x_next, target)
    assert consistent(out, x, step)
    assert close(per_sample_dot(x_next - x, unit), per_sample_dot(delta, unit))  # radial part kept
    if step.is_flow:
        assert close(x + (step.sigma_next - step.sigma) * out.velocity(), target)
    # unit scales give back the base (CFG) step
    same = get_guidance("tag", guidance_scale=w, tangential_scale=1.0)(p, step, x)
    assert close(step.alpha_next * same.x0 + step.sigma_next * same.eps, x + delta)
    assert not close(x_next, x + delta)


def test_tag_on_the_conditional_prediction_and_without_the_next_level():
    step = vp_step()
    x, p = make(step)
    g = get_guidance("tag", guidance_scale=1.0)
    assert g.branches(step) == ("cond",)
    out = g({"cond": p["cond"]}, step, x)
    assert consistent(out, x, step) and not close(out.x0, p["cond"].x0)
    with pytest.raises(ValueError, match="alpha_next"):
        g({"cond": p["cond"]}, StepInfo(3, 10, 0.5, 0.8, 0.6), x)


# --- Adaptive Guidance ------------------------------------------------------------------------

def test_adaptive_guidance_drops_to_one_branch_after_the_threshold_and_reset_restores_it():
    step = vp_step()
    x, p = make(step)
    g = get_guidance("adaptive", guidance_scale=5.0, threshold=0.99)
    g.reset()
    u, c = p["uncond"], p["cond"]

    def gamma(a, b):  # §5.3.1: cosine of the eps predictions, per sample; the batch switches on the smallest
        norms = (a.flatten(1).norm(dim=1) * b.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)
        return float((per_sample_dot(a, b) / norms).min())

    assert gamma(c.eps, u.eps) < 0.99
    assert g.branches(step) == ("uncond", "cond")
    out = g(p, step, x)
    assert close(out.eps, u.eps + 5.0 * (c.eps - u.eps)) and close(out.x0, u.x0 + 5.0 * (c.x0 - u.x0))
    assert g.branches(vp_step(index=4)) == ("uncond", "cond")
    # a step whose branches nearly agree: gamma >= threshold, the conditional output, then one branch
    near = Prediction(c.x0 + 1e-3 * (u.x0 - c.x0), c.eps + 1e-3 * (u.eps - c.eps))
    assert gamma(c.eps, near.eps) >= 0.99
    out = g({"uncond": near, "cond": c}, vp_step(index=4), x)
    assert out is c
    assert g.branches(vp_step(index=5)) == ("cond",)
    assert g({"cond": c}, vp_step(index=5), x) is c
    assert g.similarities == pytest.approx([gamma(c.eps, u.eps), gamma(c.eps, near.eps)])
    g.reset()
    assert g.branches(vp_step(index=5)) == ("uncond", "cond") and g.similarities == []
    # a threshold above the similarity never switches
    strict = get_guidance("adaptive", threshold=1.0)
    strict({"uncond": near, "cond": c}, vp_step(index=4), x)
    assert strict.branches(vp_step(index=5)) == ("uncond", "cond")


# --- beta-CFG --------------------------------------------------------------------------------

def test_beta_cfg_matches_the_survey_formula():
    step = vp_step(index=3, num_steps=10)
    x, p = make(step)
    w, a, b, gam = 7.5, 2.5, 3.0, 0.7
    s = 3 / 9
    beta = s ** (a - 1) * (1 - s) ** (b - 1) * math.gamma(a + b) / (math.gamma(a) * math.gamma(b))
    u, c = p["uncond"], p["cond"]
    diff = c.eps - u.eps
    k = beta * w / diff.flatten(1).norm(dim=1).view(-1, 1, 1, 1) ** gam
    out = get_guidance("beta_cfg", guidance_scale=w, a=a, b=b, gamma=gam)(p, step, x)
    assert close(out.eps, u.eps + k * diff)
    assert close(out.x0, u.x0 + k * (c.x0 - u.x0))
    assert consistent(out, x, step)
    assert not close(get_guidance("beta_cfg", guidance_scale=w, a=a, b=b, gamma=0.0)(p, step, x).eps, out.eps)


def test_beta_cfg_is_unconditional_at_both_ends():
    from studio.guidance.beta_cfg import beta_density

    grid = torch.linspace(0, 1, 20001, dtype=torch.float64)
    vals = torch.tensor([beta_density(float(v), 2.5, 3.0) for v in grid], dtype=torch.float64)
    assert float(torch.trapezoid(vals, grid)) == pytest.approx(1.0, abs=1e-6)  # a density
    g = get_guidance("beta_cfg")
    for index in (0, 9):
        step = vp_step(index=index, num_steps=10)
        x, p = make(step)
        assert g.branches(step) == ("uncond",)
        assert g({"uncond": p["uncond"]}, step, x) is p["uncond"]
    assert g.branches(vp_step(index=5, num_steps=10)) == ("uncond", "cond")


# --- CFG-Zero* -------------------------------------------------------------------------------

def zero_star_reference(u_c, u_u, w):
    s = per_sample_dot(u_c, u_u) / per_sample_dot(u_u, u_u)
    return s * u_u + w * (u_c - s * u_u)


def test_cfg_zero_star_formula_in_velocity_space_for_flow():
    step = flow_step()
    x, p = make(step)
    w = 4.0
    u_c, u_u = p["cond"].eps - p["cond"].x0, p["uncond"].eps - p["uncond"].x0
    out = get_guidance("cfg_zero_star", guidance_scale=w)(p, step, x)
    assert close(out.velocity(), zero_star_reference(u_c, u_u, w), 1e-7)
    assert consistent(out, x, step)
    assert not close(out.velocity(), u_u + w * (u_c - u_u), 1e-4)  # s* != 1 here


def test_cfg_zero_star_formula_in_v_space_for_diffusion():
    step = vp_step(prediction_type=None)
    x, p = make(step)
    a, s = step.alpha, step.sigma
    v_c, v_u = a * p["cond"].eps - s * p["cond"].x0, a * p["uncond"].eps - s * p["uncond"].x0
    out = get_guidance("cfg_zero_star", guidance_scale=4.0)(p, step, x)
    assert close(a * out.eps - s * out.x0, zero_star_reference(v_c, v_u, 4.0), 1e-7)
    assert consistent(out, x, step)


def test_cfg_zero_star_zero_init_gives_a_zero_velocity():
    g = get_guidance("cfg_zero_star", guidance_scale=4.0, zero_init_steps=2)
    for index in (0, 1):
        step = flow_step(index=index, t=1.0 - 0.1 * index, t_next=0.9 - 0.1 * index)
        x, p = make(step)
        assert g.branches(step) == ("cond",)
        out = g({"cond": p["cond"]}, step, x)
        assert close(out.x0, x) and close(out.eps, x)  # flow: x0 = eps = x, the state stays put
    step = vp_step(index=0)
    x, p = make(step)
    out = g({"cond": p["cond"]}, step, x)
    assert close(step.alpha * out.eps - step.sigma * out.x0, torch.zeros_like(x)) and consistent(out, x, step)
    assert g.branches(flow_step(index=2)) == ("uncond", "cond")
    assert get_guidance("cfg_zero_star", zero_init_steps=2.0).zero_init_steps == 2
    first = flow_step(index=0, t=1.0, t_next=0.9)
    assert get_guidance("cfg_zero_star", zero_init_steps=0).branches(first) == ("uncond", "cond")


def test_cfg_zero_star_matches_diffusers_guider():
    from diffusers.guiders import ClassifierFreeZeroStarGuidance

    w = 4.0
    guider = ClassifierFreeZeroStarGuidance(guidance_scale=w, zero_init_steps=1)
    g = get_guidance("cfg_zero_star", guidance_scale=w, zero_init_steps=1)
    for index in (0, 3):
        step = flow_step(index=index)
        x, p = make(step)
        guider.set_state(step=index, num_inference_steps=step.num_steps, timestep=torch.tensor(600))
        ref = guider.forward(pred_cond=p["cond"].velocity().float(), pred_uncond=p["uncond"].velocity().float()).pred
        ours = g(p if index else {"cond": p["cond"]}, step, x).velocity()
        assert torch.allclose(ours.float(), ref, rtol=1e-5, atol=1e-5)


# --- inside the samplers ------------------------------------------------------------------------

def _schedules(n=12):
    from studio.schedules import Schedule

    t = torch.linspace(0.98, 0.05, n, dtype=torch.float64)
    vp = Schedule("vp", t * 1000, torch.cat([torch.cos(math.pi * t / 2), torch.ones(1, dtype=torch.float64)]),
                  torch.cat([torch.sin(math.pi * t / 2), torch.zeros(1, dtype=torch.float64)]))
    s = torch.cat([torch.linspace(1.0, 1.0 / n, n, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    flow = Schedule("flow", s[:-1] * 1000, 1 - s, s)
    return {"ddim": (vp, "epsilon"), "flow_euler": (flow, "flow")}


def _guided(guidance, branches, sched, prediction_type, nfe):
    """The engine's denoise callable in miniature: branches -> predictions -> guidance."""
    def denoise(x, i):
        step = StepInfo(i, len(sched), sched.t(i), float(sched.alpha[i]), float(sched.sigma[i]),
                        alpha_next=float(sched.alpha[i + 1]), sigma_next=float(sched.sigma[i + 1]),
                        prediction_type=prediction_type)
        names = guidance.branches(step)
        assert set(names) <= set(guidance.all_branches)  # the engine encodes all_branches before the run
        nfe.append(len(names))
        return guidance({n: branches[n](x, i) for n in names}, step, x)
    return denoise


@pytest.mark.parametrize("sampler", ["ddim", "flow_euler"])
@pytest.mark.parametrize("name", ALL)
def test_every_method_runs_inside_the_samplers(name, sampler):
    from studio.samplers import SAMPLERS
    from tests.analytic import GaussianDenoiser

    sched, ptype = _schedules()[sampler]
    var = torch.tensor([0.3, 1.0, 0.5, 2.0], dtype=torch.float64)
    dens = {"cond": GaussianDenoiser(sched, [1.0, -0.5, 0.2, 0.8], var),
            "uncond": GaussianDenoiser(sched, [0.0, 0.0, 0.0, 0.0], var * 1.5),
            "negative": GaussianDenoiser(sched, [-1.0, 0.5, 0.0, 0.0], var)}
    params = {"cfg_pp": {"guidance_scale": 0.7}, "adaptive": {"threshold": 0.95}}.get(name, {"guidance_scale": 3.0})
    g = get_guidance(name, **params)
    g.reset()
    nfe = []
    x = torch.randn((16, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = SAMPLERS[sampler](_guided(g, dens, sched, ptype, nfe), x.clone(), sched)
    assert torch.isfinite(out).all()
    n = len(sched)
    expected_nfe = {"negative_term": 3 * n, "beta_cfg": 2 * n - 2, "cfg_zero_star": 2 * n - 1}.get(name, 2 * n)
    if name == "interval":
        assert sum(nfe) < 2 * n and nfe.count(1) > 0
    elif name == "adaptive":
        assert nfe[0] == 2 and nfe[-1] == 1 and sum(nfe) < 2 * n  # the branches agree late in the run
    else:
        assert sum(nfe) == expected_nfe
    if name in ("cfg_pp", "tag"):  # the sampler takes exactly the method's step, x' = alpha' x0 + sigma' eps
        y = x.clone()
        for i in range(n):
            a, s = float(sched.alpha[i]), float(sched.sigma[i])
            a1, s1 = float(sched.alpha[i + 1]), float(sched.sigma[i + 1])
            u, c = dens["uncond"](y, i), dens["cond"](y, i)
            if name == "cfg_pp":
                y = a1 * (u.x0 + 0.7 * (c.x0 - u.x0)) + s1 * u.eps
            else:
                d = a1 * (u.x0 + 3.0 * (c.x0 - u.x0)) + s1 * (u.eps + 3.0 * (c.eps - u.eps)) - y
                unit = y / y.norm(dim=1, keepdim=True)
                par = (d * unit).sum(1, keepdim=True) * unit
                y = y + par + 1.15 * (d - par)
        assert torch.allclose(out, y, rtol=1e-8, atol=1e-8)


def test_cfg_rescale_matches_the_diffusers_pipeline_end_to_end(tiny_sd_dir):
    """guidance_rescale through the engine equals StableDiffusionPipeline(guidance_rescale=...) on the tiny model."""
    import numpy as np
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from studio.engine import generate
    from studio.families import load_bundle
    from studio.requests import GenerateRequest

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a red cat", negative_prompt="a blue dog", num_inference_steps=8, guidance_scale=5.0,
               guidance_rescale=0.7, generator=torch.Generator().manual_seed(3), output_type="np").images
    bundle = load_bundle(tiny_sd_dir)

    def run(**params):
        req = GenerateRequest("a red cat", negative_prompt="a blue dog", sampler="ddim", steps=8, guidance_scale=5.0,
                              guidance_params=params, seed=3)
        return np.asarray(generate(bundle, req).unit, dtype=np.float64)

    rel = lambda a: float(np.linalg.norm(a - ref) / np.linalg.norm(ref))  # noqa: E731
    assert rel(run(guidance_rescale=0.7)) < 1e-5
    assert rel(run()) > 1e-4  # plain CFG is measurably different


def test_adaptive_guidance_ignores_degenerate_steps():
    """At alpha = 0 (zero terminal SNR) eps equals x_t for every prompt: gamma_t = 1 must not end guidance."""
    step = vp_step()
    x, p = make(step)
    first = StepInfo(index=0, num_steps=10, t=1.0, alpha=0.0, sigma=1.0)
    same = {"uncond": Prediction(p["uncond"].x0, x.clone()), "cond": Prediction(p["cond"].x0, x.clone())}
    g = get_guidance("adaptive", guidance_scale=5.0)
    out = g(same, first, x)
    assert close(out.x0, same["uncond"].x0 + 5.0 * (same["cond"].x0 - same["uncond"].x0))
    assert g.branches(vp_step(index=1)) == ("uncond", "cond")
    literal = get_guidance("adaptive", guidance_scale=5.0, min_signal=0.0)  # the survey's rule as written
    literal(same, first, x)
    assert literal.branches(vp_step(index=1)) == ("cond",)
