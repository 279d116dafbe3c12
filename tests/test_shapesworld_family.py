"""The ShapesWorld families load through the same from_pretrained path as a user's folder and generate
through the engine; the flow twin matches diffusers' FlowMatchEulerDiscreteScheduler stepping."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from studio.engine import generate
from studio.families import load_bundle
from studio.requests import GenerateRequest
from studio.toyworld.codec import PixelUnshuffleCodec
from studio.toyworld.text import build_tokenizer
from tests import tiny

PROMPT = "a large red circle on the left on a gray background"


def save_folder(path: str, flow: bool) -> None:
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    tok = build_tokenizer(os.path.join(path, "tokenizer"))
    tiny.text_encoder(len(tok), hidden=32, max_len=32).save_pretrained(os.path.join(path, "text_encoder"))
    tiny.unet(channels=(32, 64), cross_dim=32, sample_size=8, in_channels=48).save_pretrained(os.path.join(path, "unet"))
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0) if flow else DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True,
        prediction_type="v_prediction", timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
    sched.save_pretrained(os.path.join(path, "scheduler"))
    PixelUnshuffleCodec().save_pretrained(os.path.join(path, "codec"))
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump({"_class_name": "ShapesWorldPipeline", "family": "shapesworld-flow" if flow else "shapesworld"}, f)


@pytest.mark.parametrize("flow", [False, True], ids=["diffusion", "flow"])
def test_tiny_shapesworld_folder_generates(tmp_path, flow):
    save_folder(str(tmp_path), flow)
    bundle = load_bundle(str(tmp_path))
    assert bundle.family == ("shapesworld-flow" if flow else "shapesworld")
    assert bundle.kind == ("flow" if flow else "vp") and bundle.default_size == (32, 32)
    res = generate(bundle, GenerateRequest(PROMPT, steps=4, seed=1, guidance_scale=4.0))
    assert res.images[0].shape == (32, 32, 3) and res.metadata["sampler"] == ("flow_euler" if flow else "ddim")
    if flow:
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler.from_pretrained(str(tmp_path), subfolder="scheduler")
        sched.set_timesteps(4)
        with torch.no_grad():
            cond = bundle.encode_prompt([PROMPT]).tensors["encoder_hidden_states"]
            unc = bundle.encode_prompt([""]).tensors["encoder_hidden_states"]
            z = torch.randn((1, 48, 8, 8), generator=torch.Generator().manual_seed(1))
            for t in sched.timesteps:
                out = bundle.modules["unet"](torch.cat([z, z]), t, encoder_hidden_states=torch.cat([unc, cond])).sample
                u, c = out.chunk(2)
                z = sched.step(u + 4.0 * (c - u), t, z).prev_sample
            ref = ((PixelUnshuffleCodec().decode(z) / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy()
        err = np.linalg.norm(res.unit - ref) / np.linalg.norm(ref)
        assert err < 1e-4, err


def test_training_note_names_the_step_and_size_of_its_adherence_figure(tmp_path):
    """The header's adherence figure says which weights and how many prompts it was measured on."""
    from studio.registry import ModelSpec, training_note

    info = {"step": 500, "elapsed": 7200.0,
            "history": [{"step": 300, "eval": {"all_correct": 0.5, "n": 64.0, "step": 300}}]}
    (tmp_path / "training.json").write_text(json.dumps(info))
    spec = ModelSpec("m", "asset", str(tmp_path))
    assert training_note(spec) == ("trained 500 steps (2.0 h of training); prompt adherence 50% all-correct "
                                   "at CFG 5 (EMA at step 300, 64 prompts)")
    info["history"].append({"step": 500, "eval": {"all_correct": 0.75, "n": 256.0, "step": 500}})
    (tmp_path / "training.json").write_text(json.dumps(info))
    assert training_note(spec).endswith("75% all-correct at CFG 5 (EMA, 256 prompts)")
    assert training_note(ModelSpec("m", "local", str(tmp_path))) == ""
