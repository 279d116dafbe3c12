"""Plug-in adapters through the session against diffusers' pipelines on the same tiny components.

Textual inversion vs `pipe.load_textual_inversion`, one and two ControlNets vs
StableDiffusionControlNetPipeline, IP-Adapter vs `pipe.load_ip_adapter` + `set_ip_adapter_scale`:
relative error <= 1e-4 each, and every adapter must change the output (so the comparison is not
vacuous). Scale 0 and runs without the adapter give the base output exactly; the UNet's weights and
attention processors are the same after a run as before.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from studio.requests import GenerateRequest
from studio.session import OutOfBudget, SessionManager
from tests import tiny

PROMPT = "a photo of a red cat"
NEGATIVE = "a blue dog"
STEPS, SCALE, SEED = 6, 5.0, 3


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def assets(tiny_sd_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    return {
        "cn": [tiny.make_controlnet(tiny_sd_dir, str(d / f"controlnet{s}"), seed=s) for s in range(2)],
        "ip": tiny.make_ip_adapter(tiny_sd_dir, str(d / "ip-adapter")),
        "images": [tiny.make_image(str(d / f"control{s}.png"), seed=s) for s in range(2)],
        "gray": tiny.make_image(str(d / "gray.png"), mode="L", seed=5),
        "reference": tiny.make_image(str(d / "reference.png"), size=(37, 29), seed=7),
        "emb": tiny.make_embedding(str(d / "cat-toy.safetensors"), token="<cat-toy>"),
        "emb_a1111": tiny.make_embedding(str(d / "style.safetensors"), vectors=3, key="emb_params", seed=1),
        "dir": d,
    }


@pytest.fixture(scope="module")
def session(tiny_sd_dir):
    """One session for the module: adapters hot-swap on the same loaded model."""
    s = SessionManager(device="cpu")
    s.get(tiny_sd_dir)
    return s


def req(model, prompt=PROMPT, **kw):
    return GenerateRequest(prompt, model=model, negative_prompt=NEGATIVE, steps=STEPS, guidance_scale=SCALE, seed=SEED,
                           height=32, width=32, **kw)


def pipe_kwargs():
    return dict(negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=SCALE, height=32, width=32,
                generator=torch.Generator().manual_seed(SEED), output_type="np")


def sd_pipe(path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_snapshot(bundle):
    unet = bundle.modules["unet"]
    return ({k: v.clone() for k, v in unet.state_dict().items()},
            {k: (type(v), id(v)) for k, v in unet.attn_processors.items()},
            unet.encoder_hid_proj, unet.config.encoder_hid_dim_type)


def assert_unet_same(a, b):
    assert a[0].keys() == b[0].keys()
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    assert a[1:] == b[1:]


def test_textual_inversion_matches_pipeline(tiny_sd_dir, assets, session):
    s = session
    base = s.generate(req(tiny_sd_dir)).unit
    prompt = "a <cat-toy> in <style>"  # 2 + 1 + 3 tokens: no truncation at 16
    embeddings = [{"path": assets["emb"], "token": "<cat-toy>"}, {"path": assets["emb_a1111"], "token": "<style>"}]
    ours = s.generate(req(tiny_sd_dir, prompt, embeddings=embeddings)).unit

    pipe = sd_pipe(tiny_sd_dir)
    pipe.load_textual_inversion(assets["emb"], token="<cat-toy>")
    pipe.load_textual_inversion(assets["emb_a1111"], token="<style>")  # 3 vectors: <style>, <style>_1, <style>_2
    ref = pipe(prompt, **pipe_kwargs()).images
    err = rel_err(ours, ref)
    print(f"textual inversion: relative error {err:.2e}")
    assert err <= 1e-4
    # the embedding matters: other vectors under the same token give another image
    other = sd_pipe(tiny_sd_dir)
    other.load_textual_inversion(tiny.make_embedding(str(assets["dir"] / "other.safetensors"), seed=9), token="<cat-toy>")
    other.load_textual_inversion(assets["emb_a1111"], token="<style>")
    assert rel_err(other(prompt, **pipe_kwargs()).images, ref) > 1e-3
    # the tokens persist and change nothing for prompts that do not use them
    assert np.array_equal(s.generate(req(tiny_sd_dir)).unit, base)
    assert np.array_equal(s.generate(req(tiny_sd_dir, prompt)).unit, ours)  # loaded once, no request needed
    # the token's file key is used when no token is given; a taken token is a clear error
    s.generate(req(tiny_sd_dir, embeddings=[{"path": assets["emb"]}]))
    with pytest.raises(ValueError, match="already taken"):
        s.generate(req(tiny_sd_dir, embeddings=[{"path": assets["emb_a1111"], "token": "<cat-toy>"}]))
    with pytest.raises(ValueError, match="does not name its token"):
        s.generate(req(tiny_sd_dir, embeddings=[{"path": assets["emb_a1111"]}]))


def controlnet_pipe(path, nets):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    base = sd_pipe(path)
    cns = [ControlNetModel.from_pretrained(n, use_safetensors=True) for n in nets]
    pipe = StableDiffusionControlNetPipeline(**base.components, controlnet=cns[0] if len(cns) == 1 else cns,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_controlnets_match_pipeline(tiny_sd_dir, assets, session):
    from PIL import Image

    s = session
    bundle = s.get(tiny_sd_dir)
    base = s.generate(req(tiny_sd_dir)).unit
    before = unet_snapshot(bundle)
    bytes_before = s.status()[0]["bytes"]
    one = [{"model": assets["cn"][0], "image": assets["images"][0], "scale": 0.8}]
    ours1 = s.generate(req(tiny_sd_dir, controlnets=one)).unit
    assert s.status()[0]["bytes"] > bytes_before  # the ControlNet is counted with the model
    images = [Image.open(p) for p in assets["images"]]
    ref1 = controlnet_pipe(tiny_sd_dir, assets["cn"][:1])(PROMPT, image=images[0], controlnet_conditioning_scale=0.8,
                                                          **pipe_kwargs()).images
    err1 = rel_err(ours1, ref1)

    two = one + [{"model": assets["cn"][1], "image": assets["images"][1], "scale": 0.6, "start": 0.2, "stop": 0.7}]
    ours2 = s.generate(req(tiny_sd_dir, controlnets=two)).unit
    ref2 = controlnet_pipe(tiny_sd_dir, assets["cn"])(
        PROMPT, image=images, controlnet_conditioning_scale=[0.8, 0.6], control_guidance_start=[0.0, 0.2],
        control_guidance_end=[1.0, 0.7], **pipe_kwargs()).images
    err2 = rel_err(ours2, ref2)
    print(f"ControlNet: relative error {err1:.2e} (one), {err2:.2e} (two)")
    assert err1 <= 1e-4 and err2 <= 1e-4
    # each ControlNet changes the output, so the comparisons above can fail
    assert rel_err(ours1, base) > 1e-3 and rel_err(ours2, ours1) > 1e-3
    # scale 0 is the base model exactly; the UNet is unchanged after the runs
    zero = [{"model": assets["cn"][0], "image": assets["images"][0], "scale": 0.0}]
    assert np.array_equal(s.generate(req(tiny_sd_dir, controlnets=zero)).unit, base)
    assert_unet_same(before, unet_snapshot(bundle))
    assert np.array_equal(s.generate(req(tiny_sd_dir)).unit, base)


def test_control_image_errors(tiny_sd_dir, assets, session):
    s = session
    base = s.generate(req(tiny_sd_dir)).unit
    # a grayscale control image is converted to RGB
    gray = s.generate(req(tiny_sd_dir, controlnets=[{"model": assets["cn"][0], "image": assets["gray"]}])).unit
    assert rel_err(gray, base) > 1e-3
    bad = assets["dir"] / "not-an-image.png"
    bad.write_text("hello")
    for image, err, match in ((str(bad), ValueError, "cannot read it as an image"),
                              (str(assets["dir"] / "missing.png"), FileNotFoundError, "not found")):
        with pytest.raises(err, match=match) as info:
            s.generate(req(tiny_sd_dir, controlnets=[{"model": assets["cn"][0], "image": image}]))
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="ControlNetModel"):
        s.generate(req(tiny_sd_dir, controlnets=[{"model": os.path.join(tiny_sd_dir, "unet"), "image": assets["images"][0]}]))
    with pytest.raises(ValueError, match="window"):
        s.generate(req(tiny_sd_dir, controlnets=[{"model": assets["cn"][0], "image": assets["images"][0], "start": 0.5, "stop": 0.5}]))


def test_ip_adapter_matches_pipeline(tiny_sd_dir, assets, session):
    from PIL import Image

    s = session
    bundle = s.get(tiny_sd_dir)
    base = s.generate(req(tiny_sd_dir)).unit
    before = unet_snapshot(bundle)
    ours = s.generate(req(tiny_sd_dir, ip_adapter={"path": assets["ip"], "image": assets["reference"], "scale": 0.7})).unit

    pipe = sd_pipe(tiny_sd_dir)
    pipe.load_ip_adapter(assets["ip"], subfolder="", weight_name="ip-adapter.safetensors",
                         image_encoder_folder="image_encoder", local_files_only=True)
    pipe.set_ip_adapter_scale(0.7)
    ref = pipe(PROMPT, ip_adapter_image=Image.open(assets["reference"]), **pipe_kwargs()).images
    err = rel_err(ours, ref)
    print(f"IP-Adapter: relative error {err:.2e}")
    assert err <= 1e-4
    assert rel_err(ours, base) > 1e-3  # the adapter changes the output
    # the original processors are back after the run; scale 0 and runs without it are the base output
    assert_unet_same(before, unet_snapshot(bundle))
    zero = s.generate(req(tiny_sd_dir, ip_adapter={"path": assets["ip"], "image": assets["reference"], "scale": 0.0})).unit
    assert np.array_equal(zero, base)
    assert np.array_equal(s.generate(req(tiny_sd_dir)).unit, base)
    assert_unet_same(before, unet_snapshot(bundle))
    # all three together run in one request
    both = s.generate(req(tiny_sd_dir, ip_adapter={"path": assets["ip"], "image": assets["reference"], "scale": 0.7},
                          controlnets=[{"model": assets["cn"][0], "image": assets["images"][0]}])).unit
    assert rel_err(both, ours) > 1e-3
    with pytest.raises(FileNotFoundError, match="not found"):
        s.generate(req(tiny_sd_dir, ip_adapter={"path": str(assets["dir"] / "nope"), "image": assets["reference"]}))


def test_adapters_fail_cleanly_and_respect_the_budget(tiny_sd_dir, assets):
    size = SessionManager(device="cpu").get(tiny_sd_dir).memory_bytes()
    s = SessionManager(device="cpu", memory_budget=size + 1000)
    base = s.generate(req(tiny_sd_dir)).unit
    bundle = s.get(tiny_sd_dir)
    before = unet_snapshot(bundle)
    with pytest.raises(OutOfBudget):
        s.generate(req(tiny_sd_dir, controlnets=[{"model": assets["cn"][0], "image": assets["images"][0]}]))
    assert s.accounted() <= s.memory_budget and s.status()[0]["bytes"] == size
    assert_unet_same(before, unet_snapshot(bundle))
    assert np.array_equal(s.generate(req(tiny_sd_dir)).unit, base)
    with pytest.raises(ValueError, match="outside"):
        GenerateRequest("x", ip_adapter={"path": "a", "image": "b", "scale": 9}).validate()


def test_shapesworld_takes_all_three_and_sdxl_says_what_it_lacks(assets, tmp_path):
    from studio.registry import BUILTIN

    sw = BUILTIN["shapesworld"].location
    cn = tiny.make_controlnet(sw, str(tmp_path / "cn"), conditioning_channels=(16, 32, 32))  # latents at 1/4
    ip = tiny.make_ip_adapter(sw, str(tmp_path / "ip"))
    emb = tiny.make_embedding(str(tmp_path / "shape.safetensors"), token="<shape>", dim=64)
    s = SessionManager(device="cpu")
    r = dict(steps=3, seed=1)
    base = s.generate(GenerateRequest("a red circle", **r)).unit
    adapted = s.generate(GenerateRequest("a <shape> circle", embeddings=[{"path": emb}],
                                         controlnets=[{"model": cn, "image": assets["images"][0]}],
                                         ip_adapter={"path": ip, "image": assets["reference"], "scale": 0.8}, **r)).unit
    assert rel_err(adapted, base) > 1e-3
    off = s.generate(GenerateRequest("a red circle", controlnets=[{"model": cn, "image": assets["images"][0], "scale": 0.0}],
                                     ip_adapter={"path": ip, "image": assets["reference"], "scale": 0.0}, **r)).unit
    assert np.array_equal(off, base)
    with pytest.raises(ValueError, match="does not fit the model"):  # a ControlNet of another UNet
        s.generate(GenerateRequest("a red circle", controlnets=[{"model": assets["cn"][0], "image": assets["images"][0]}], **r))
    half = tiny.make_controlnet(sw, str(tmp_path / "cn-half"), conditioning_channels=(16, 32))
    with pytest.raises(ValueError, match="1/2 of the latent"):  # control images at the wrong resolution
        s.generate(GenerateRequest("a red circle", controlnets=[{"model": half, "image": assets["images"][0]}], **r))

    sdxl = tmp_path / "sdxl"
    tiny.build_sdxl_pipeline().save_pretrained(str(sdxl), safe_serialization=True)
    with pytest.raises(ValueError, match="does not take ControlNets"):
        s.generate(GenerateRequest("x", model=str(sdxl), steps=1,
                                   controlnets=[{"model": assets["cn"][0], "image": assets["images"][0]}]))


def test_failure_mid_run_restores_the_unet(tiny_sd_dir, assets, session, tmp_path):
    s = session
    bundle = s.get(tiny_sd_dir)
    base = s.generate(req(tiny_sd_dir)).unit
    lora = tiny.make_lora(tiny_sd_dir, str(tmp_path / "lora"))
    s.generate(req(tiny_sd_dir, loras=[{"path": lora, "weight": 0.5}]))  # the LoRA is now loaded (inactive)
    before = unet_snapshot(bundle)
    seen = {}

    def boom(i, n, x, pred):
        seen["procs"] = {type(p).__name__ for p in bundle.modules["unet"].attn_processors.values()}
        raise RuntimeError("failure in the middle of the run")

    with pytest.raises(RuntimeError, match="middle"):
        s.generate(req(tiny_sd_dir, loras=[{"path": lora, "weight": 1.0}],
                       ip_adapter={"path": assets["ip"], "image": assets["reference"], "scale": 0.7},
                       controlnets=[{"model": assets["cn"][0], "image": assets["images"][0]}]), callback=boom)
    assert "IPAdapterAttnProcessor2_0" in seen["procs"]  # it was installed during the run
    assert_unet_same(before, unet_snapshot(bundle))
    assert np.array_equal(s.generate(req(tiny_sd_dir)).unit, base)
