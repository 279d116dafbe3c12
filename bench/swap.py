"""Model load time against LoRA swap time, measured in one run.

    python -m bench.swap            # SD 1.5-sized UNet (860 M parameters, random weights)
    python -m bench.swap --small    # a 12.5 M-parameter UNet, for a quick check

Builds an SD-architecture model with random weights (load cost does not depend on the values) and
rank-8 LoRAs on every attention projection in diffusers' format, then measures through the session
manager:
  - base load: a model folder from disk to ready on the device (median of 3),
  - LoRA swap: change the active LoRA of a loaded model (what a user does between runs: another
    LoRA already loaded, or another weight); nothing reloads,
  - first use of a LoRA file: read it, inject it, activate it (printed, not in the ratio).
The last line is `swap_ratio=<LoRA swap / base load>` (target <= 0.05).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from studio.cli import quiet_environment  # noqa: E402

quiet_environment()


def build_sd15_sized(path: str) -> None:
    """SD 1.5's UNet architecture (random weights, float16 on disk) with a small text encoder and VAE."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from tests import tiny

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768).to(torch.float16)  # diffusers' defaults = SD 1.5
    vae = AutoencoderKL(block_out_channels=(16, 16, 16, 16), latent_channels=4, norm_num_groups=16,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4).to(torch.float16)
    tok = tiny.tokenizer()
    te = tiny.text_encoder(len(tok), hidden=768).to(torch.float16)
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(path)


def main(argv=None) -> int:
    import argparse

    from bench.sampling import build_model
    from studio.session import LoraRef, SessionManager
    from tests import tiny

    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        model = os.path.join(d, "model")
        (build_model if args.small else build_sd15_sized)(model)
        loras = [tiny.make_lora(model, os.path.join(d, f"lora{i}"), seed=i, rank=8) for i in range(4)]
        loads, cold, warm = [], [], []
        for rep in range(3):
            s = SessionManager(device="cpu")
            t = time.perf_counter()
            bundle = s.get(model)
            loads.append(time.perf_counter() - t)
            net = bundle.modules["unet"]
            for i, path in enumerate(loras[:2] if rep else loras[:2]):
                t = time.perf_counter()
                with s.patched(bundle, [LoraRef(path, 1.0)]):
                    pass
                cold.append(time.perf_counter() - t)
            for i in range(6):
                t = time.perf_counter()
                with s.patched(bundle, [LoraRef(loras[i % 2], 0.8)]):
                    pass
                warm.append(time.perf_counter() - t)
            del s, bundle, net
        load, c, w = statistics.median(loads), statistics.median(cold), statistics.median(warm)
        n_params = sum(p.numel() for p in SessionManager(device="cpu").get(model).modules["unet"].parameters())
    print(f"unet_params={n_params / 1e6:.1f}M lora_rank=8")
    print(f"base_load_s={load:.4f}")
    print(f"lora_first_use_s={c:.4f} (read file, inject, activate)")
    print(f"lora_swap_s={w:.5f} (switch the active LoRA of the loaded model)")
    print(f"first_use_ratio={c / load:.4f}")
    print(f"swap_ratio={w / load:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
