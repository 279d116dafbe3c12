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


# --- SDXL, SD3 and FLUX: tiny seeded components (text encoders of width 32, 2x VAE, one block)

T5_TOKENIZER_DIR = os.path.join(FIXTURES, "tiny-t5-tokenizer")
T5_WORDS = "photo of the red green blue cat dog tree house".split()


def make_t5_tokenizer_fixture(path: str = T5_TOKENIZER_DIR):
    """Write the tiny T5 (Unigram) tokenizer fixture: specials, a few words, '▁'+letter and single characters."""
    import string

    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -4.0 - 0.1 * i) for i, w in enumerate(T5_WORDS)]
    vocab += [("▁" + c, -8.0) for c in string.ascii_lowercase]
    vocab += [(c, -10.0) for c in string.ascii_lowercase + string.digits + ".,!?-"]
    tok = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)
    tok.save_pretrained(path)
    return tok


def t5_tokenizer():
    from transformers import T5TokenizerFast

    if not os.path.exists(os.path.join(T5_TOKENIZER_DIR, "tokenizer.json")):
        raise FileNotFoundError(f"missing test fixture {T5_TOKENIZER_DIR} (build it with make_t5_tokenizer_fixture())")
    return T5TokenizerFast.from_pretrained(T5_TOKENIZER_DIR)


def clip_with_projection(vocab_size: int, hidden: int = 32, projection: int = 32, max_len: int = 16, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=max_len, bos_token_id=vocab_size - 2,
                         eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1, projection_dim=projection)
    return CLIPTextModelWithProjection(cfg).eval()


def t5_encoder(vocab_size: int, d_model: int = 32, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(cfg).eval()


def vae_shifted(seed: int = 0, scaling_factor: float = 1.5305, shift_factor: float = 0.0609):
    """The tiny VAE with the scaling and shift factors that SD3 and FLUX latents use."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=32, sample_size=32, scaling_factor=scaling_factor,
                         shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False).eval()


def sdxl_unet(seed: int = 0, sample_size: int = 16):
    """UNet with SDXL's 'text_time' added conditioning: 6 time ids x 8 + the 32-wide pooled embedding."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64, norm_num_groups=32).eval()


def euler_scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  steps_offset=1, timestep_spacing="leading")


def build_sdxl_pipeline(seed: int = 0):
    from diffusers import StableDiffusionXLPipeline

    tok = tokenizer()
    return StableDiffusionXLPipeline(
        vae=vae(seed), text_encoder=text_encoder(len(tok), seed=seed), tokenizer=tok,
        text_encoder_2=clip_with_projection(len(tok), seed=seed + 1), tokenizer_2=tokenizer(), unet=sdxl_unet(seed),
        scheduler=euler_scheduler(), force_zeros_for_empty_prompt=True, add_watermarker=False)


def sd3_transformer(seed: int = 0, sample_size: int = 16, patch_size: int = 2):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=sample_size, patch_size=patch_size, in_channels=4, out_channels=4,
                                 num_layers=1, attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                                 caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=32).eval()


def build_sd3_pipeline(seed: int = 0, with_t5: bool = True):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    tok = tokenizer()
    t5_tok = t5_tokenizer() if with_t5 else None
    return StableDiffusion3Pipeline(
        transformer=sd3_transformer(seed), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae_shifted(seed),
        text_encoder=clip_with_projection(len(tok), seed=seed), tokenizer=tok,
        text_encoder_2=clip_with_projection(len(tok), seed=seed + 1), tokenizer_2=tokenizer(),
        text_encoder_3=t5_encoder(len(t5_tok), seed=seed + 2) if with_t5 else None, tokenizer_3=t5_tok)


def flux_transformer(seed: int = 0, guidance_embeds: bool = True):
    """Packed 2x2 patches of 4 latent channels: 16 input channels."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=guidance_embeds,
                                  axes_dims_rope=(4, 4, 8)).eval()


def flux_scheduler():
    """The FLUX scheduler config: shift 3 and resolution-dependent (dynamic) shifting."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)


def build_flux_pipeline(seed: int = 0):
    from diffusers import FluxPipeline

    tok = tokenizer()
    t5_tok = t5_tokenizer()
    return FluxPipeline(
        scheduler=flux_scheduler(), vae=vae_shifted(seed, scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=text_encoder(len(tok), seed=seed), tokenizer=tok,
        text_encoder_2=t5_encoder(len(t5_tok), seed=seed + 1), tokenizer_2=t5_tok,
        transformer=flux_transformer(seed))


def make_lora(model_dir: str, out_dir: str, seed: int = 0, rank: int = 4, scale: float = 0.3) -> str:
    """A random LoRA for the UNet of `model_dir`, saved in diffusers' format (safetensors); returns its file."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(out_dir, unet_lora_layers=sd, safe_serialization=True)
    return os.path.join(out_dir, "pytorch_lora_weights.safetensors")


# --- plug-in adapters: textual-inversion embeddings, ControlNets, IP-Adapters (tiny, seeded, safetensors)

def make_embedding(out_file: str, token: str | None = "<cat-toy>", vectors: int = 1, dim: int = 32, seed: int = 0,
                   key: str | None = None) -> str:
    """A random textual-inversion embedding saved as safetensors.

    key None: diffusers' format `{token: (vectors, dim)}`; key "emb_params": the A1111 layout, whose
    token must be passed when loading.
    """
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    save_file({key or token: torch.randn(vectors, dim, generator=g)}, out_file)
    return out_file


def make_controlnet(model_dir: str, out_dir: str, seed: int = 0, scale: float = 0.05,
                    conditioning_channels=(16, 32)) -> str:
    """A ControlNet made from the UNet of `model_dir` (diffusers' `from_unet`), its zero convs randomised.

    A fresh ControlNet has zero-initialised output convolutions (it adds nothing); random ones make
    it change the output, as diffusers' tests do. Saved with save_pretrained (safetensors).
    `conditioning_channels` sets how far the control image is downsampled: 2^(len - 1), which must be
    the model's latent factor (2 for the tiny SD, 4 for ShapesWorld).
    """
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=tuple(conditioning_channels))
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for m in list(net.controlnet_down_blocks) + [net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    net.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def image_encoder(seed: int = 0):
    """A tiny CLIPVisionModelWithProjection: hidden 32, 32x32 images in 4x4 patches, projection 32, 2 layers."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=32, image_size=32, patch_size=4, projection_dim=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=37)
    return CLIPVisionModelWithProjection(cfg).eval()


def make_ip_adapter(model_dir: str, out_dir: str, seed: int = 0, scale: float = 0.3) -> str:
    """A random IP-Adapter for the UNet of `model_dir` in diffusers' safetensors layout; returns the folder.

    The folder holds `ip-adapter.safetensors` ("image_proj.proj.*", "image_proj.norm.*" for an
    ImageProjection with 4 tokens; "ip_adapter.<n>.to_k_ip.weight" / "to_v_ip.weight" with n = 1, 3,
    5, ... over the cross-attention layers in `attn_processors` order, as `load_ip_adapter` numbers
    them) and `image_encoder/` (the tiny CLIP vision model).
    """
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    enc = image_encoder(seed)
    enc.save_pretrained(os.path.join(out_dir, "image_encoder"), safe_serialization=True)
    g = torch.Generator().manual_seed(seed + 2000)
    cross, emb = unet.config.cross_attention_dim, enc.config.projection_dim
    rand = lambda *shape: torch.randn(*shape, generator=g) * scale  # noqa: E731
    sd = {"image_proj.proj.weight": rand(4 * cross, emb), "image_proj.proj.bias": rand(4 * cross),
          "image_proj.norm.weight": 1 + rand(cross), "image_proj.norm.bias": rand(cross)}
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        block = name.split(".")[0]
        if block == "mid_block":
            hidden = unet.config.block_out_channels[-1]
        elif block == "up_blocks":
            hidden = list(reversed(unet.config.block_out_channels))[int(name.split(".")[1])]
        else:
            hidden = unet.config.block_out_channels[int(name.split(".")[1])]
        sd[f"ip_adapter.{key_id}.to_k_ip.weight"] = rand(hidden, cross)
        sd[f"ip_adapter.{key_id}.to_v_ip.weight"] = rand(hidden, cross)
        key_id += 2
    save_file(sd, os.path.join(out_dir, "ip-adapter.safetensors"))
    return out_dir


def make_image(out_file: str, size=(40, 48), mode: str = "RGB", seed: int = 0) -> str:
    """A random image file (width, height) = size in `mode`: a control or reference image for the tests."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    # smooth structure (blocks) so resizing keeps a signal
    arr[: size[1] // 2, : size[0] // 2] = [230, 30, 30]
    Image.fromarray(arr).convert(mode).save(out_file)
    return out_file
