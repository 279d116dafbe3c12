"""Our sampling loop against StableDiffusionPipeline on the same model: loop overhead ratio.

    python -m bench.sampling [--steps 20] [--repeats 7]

Builds an SD-architecture model with seeded random weights (speed does not depend on the values),
big enough that the network dominates (>= 20 ms per forward here), saves it, loads it once through
diffusers and once through our loading path, then times both on the same prompt, seed, steps,
scale and batch, alternating runs, and reports medians. The last line is
`overhead_ratio=<ours / diffusers>`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from studio.cli import quiet_environment  # noqa: E402

quiet_environment()

import torch  # noqa: E402


def build_model(path: str) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from tests import tiny

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, block_out_channels=(64, 128, 256), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
        attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(16, 16, 16, 16), latent_channels=4, norm_num_groups=16,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    tok = tiny.tokenizer()
    te = tiny.text_encoder(len(tok), hidden=64)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--scale", type=float, default=5.0)
    args = ap.parse_args(argv)

    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as dlog

    from studio.engine import generate
    from studio.families import load_bundle
    from studio.requests import GenerateRequest

    dlog.disable_progress_bar()
    with tempfile.TemporaryDirectory() as d:
        build_model(d)
        pipe = StableDiffusionPipeline.from_pretrained(d, safety_checker=None, feature_extractor=None,
                                                       requires_safety_checker=False, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        bundle = load_bundle(d)
    prompt, neg = "a photo of a red cat", "a dog"
    x = torch.randn(2, 4, 32, 32)
    ctx = torch.randn(2, 16, 64)
    with torch.inference_mode():
        bundle.modules["unet"](x, 500, encoder_hidden_states=ctx)
        t0 = time.perf_counter()
        for _ in range(5):
            bundle.modules["unet"](x, 500, encoder_hidden_states=ctx)
        fwd = (time.perf_counter() - t0) / 5
    print(f"unet_forward_ms={fwd * 1000:.1f} (batch 2, latent 32x32)")

    def run_ours():
        t = time.perf_counter()
        r = generate(bundle, GenerateRequest(prompt, model="bench", negative_prompt=neg, sampler="ddim", steps=args.steps,
                                             guidance_scale=args.scale, seed=0, width=256, height=256))
        return time.perf_counter() - t, r.unit

    def run_diffusers():
        t = time.perf_counter()
        out = pipe(prompt, negative_prompt=neg, num_inference_steps=args.steps, guidance_scale=args.scale,
                   generator=torch.Generator().manual_seed(0), output_type="np", height=256, width=256).images
        return time.perf_counter() - t, out

    run_ours(), run_diffusers()  # warm-up
    ours, theirs = [], []
    for _ in range(args.repeats):
        t, a = run_ours()
        ours.append(t)
        t, b = run_diffusers()
        theirs.append(t)
    diff = float(abs(a - b).max())
    mo, md = statistics.median(ours), statistics.median(theirs)
    print(f"steps={args.steps} scale={args.scale} repeats={args.repeats} max_pixel_diff={diff:.2e}")
    print(f"ours_median_s={mo:.4f} diffusers_median_s={md:.4f}")
    print(f"overhead_ratio={mo / md:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
