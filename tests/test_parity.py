"""Our sampling loop against diffusers' own pipeline and scheduler stepping on the same tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from studio.engine import generate
from studio.families import load_bundle
from studio.requests import GenerateRequest

PROMPT = "a photo of a red cat"
NEGATIVE = "a blue dog"


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _pipe(path, scheduler_cls):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("sampler,scheduler_name,steps", [("ddim", "DDIMScheduler", 10), ("euler", "EulerDiscreteScheduler", 8)])
def test_matches_stable_diffusion_pipeline(tiny_sd_dir, sampler, scheduler_name, steps):
    import diffusers

    pipe = _pipe(tiny_sd_dir, getattr(diffusers, scheduler_name))
    ref = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(3), output_type="np").images
    bundle = load_bundle(tiny_sd_dir)
    ours = generate(bundle, GenerateRequest(PROMPT, negative_prompt=NEGATIVE, sampler=sampler, steps=steps,
                                            guidance_scale=5.0, seed=3))
    assert ours.unit.shape == ref.shape
    err = rel_err(ours.unit, ref)
    print(f"{sampler}: relative error {err:.2e}")
    assert err <= 1e-4
    # a different seed gives a different image: the comparison above is not vacuous
    other = generate(bundle, GenerateRequest(PROMPT, negative_prompt=NEGATIVE, sampler=sampler, steps=steps, seed=4))
    assert rel_err(other.unit, ref) > 1e-3
    assert ours.nfe == 2 * steps


def test_flow_euler_matches_flow_match_scheduler(tiny_flow_dir):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_flow_dir, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False, local_files_only=True)
    steps, w = 12, 4.0
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    with torch.no_grad():
        cond, unc = pipe.encode_prompt(PROMPT, "cpu", 1, True, negative_prompt=NEGATIVE)
        ctx = torch.cat([unc, cond])
        g = torch.Generator().manual_seed(7)
        lat = torch.randn((1, 4, 16, 16), generator=g)
        for t in sched.timesteps:
            out = pipe.unet(torch.cat([lat, lat]), t, encoder_hidden_states=ctx).sample
            u, c = out.chunk(2)
            lat = sched.step(u + w * (c - u), t, lat).prev_sample
        ref = pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample
        ref = (ref / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    bundle = load_bundle(tiny_flow_dir)
    assert bundle.kind == "flow" and bundle.prediction_type == "flow"
    ours = generate(bundle, GenerateRequest(PROMPT, negative_prompt=NEGATIVE, steps=steps, guidance_scale=w, seed=7))
    assert ours.metadata["sampler"] == "flow_euler"
    err = rel_err(ours.unit, ref)
    print(f"flow_euler: relative error {err:.2e}")
    assert err <= 1e-4


def test_same_request_same_pixels(tiny_sd_dir):
    bundle = load_bundle(tiny_sd_dir)
    req = GenerateRequest(PROMPT, sampler="euler_a", steps=6, seed=11)
    a = generate(bundle, req).images[0]
    b = generate(bundle, req).images[0]
    assert np.array_equal(a, b)
    c = generate(bundle, GenerateRequest(PROMPT, sampler="euler_a", steps=6, seed=12)).images[0]
    assert not np.array_equal(a, c)
