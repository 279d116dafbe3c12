"""Tiny seeded components of the real architectures, as diffusers' own tests build them."""

from __future__ import annotations

import os

import torch

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
TOKENIZER_DIR = os.path.join(FIXTURES, "tiny-clip-tokenizer")


def tokenizer():
    from transformers import CLIPTokenizer

    if not os.path.exists(os.path.join(TOKENIZER_DIR, "tokenizer.json")):
        raise FileNotFoundError(f"missing test fixture {TOKENIZER_DIR}")
    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR)


def text_encoder(vocab_size: int, hidden: int = 32, max_len: int = 16, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=max_len, bos_token_id=vocab_size - 2,
                         eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, projection_dim=hidden)
    return CLIPTextModel(cfg).eval()


def unet(seed: int = 0, channels=(32, 64), cross_dim: int = 32, sample_size: int = 16, in_channels: int = 4):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels, block_out_channels=channels,
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_dim,
        attention_head_dim=4, norm_num_groups=32).eval()


def vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=32, sample_size=32).eval()


def ddim_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def build_sd_pipeline(flow: bool = False, seed: int = 0):
    from diffusers import StableDiffusionPipeline

    tok = tokenizer()
    return StableDiffusionPipeline(
        vae=vae(seed), text_encoder=text_encoder(len(tok), seed=seed), tokenizer=tok, unet=unet(seed),
        scheduler=flow_scheduler() if flow else ddim_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
