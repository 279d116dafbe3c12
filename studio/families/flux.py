"""FLUX: FluxTransformer2DModel + CLIP (pooled) + T5, rectified flow on 2x2-packed latents, AutoencoderKL.

Prompt encoding follows diffusers' FluxPipeline: the pooled output of the CLIP text model and the
last hidden state of T5 (padded to `max_sequence_length`, 512 by default). The engine's state is
the unpacked latent (B, C, H/f, W/f) (f the VAE factor), so its starting noise is drawn exactly as
the pipeline draws it; `model()` packs it into 2x2 patches, runs the transformer with the image
and text position ids, and unpacks the velocity. The transformer takes time as t / 1000 = sigma.

Noise levels: the pipeline passes its own sigma table linspace(1, 1/N, N) and a shift mu that
grows with the number of image tokens; `schedule_kwargs` supplies both to the schedule.

Guidance: a guidance-distilled checkpoint (`guidance_embeds=True`, FLUX.1-dev) takes a guidance
value as an input embedding; it is the family parameter `bundle.extra["distilled_guidance"]`
(3.5 by default, the pipeline's `guidance_scale`). The request's guidance (CFG with the negative
prompt, the pipeline's `true_cfg_scale`) works on top of it: the engine batches the cond and
uncond branches, and both see the same distilled guidance value. With guidance_scale 1 the engine
runs the conditional branch alone, the usual way to sample a distilled checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from .base import Bundle, Conditioning, register_family
from .sd import read_scheduler_config, vae_decode, vae_encode
from .sd3 import batch_timestep, calculate_shift

DEFAULT_DISTILLED_GUIDANCE = 3.5


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): 2x2 patches as tokens."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack` for a latent of height h and width w."""
    b, _, d = tokens.shape
    x = tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """Position ids (0, row, column) of the h/2 x w/2 packed tokens."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


@dataclass
class FluxBundle(Bundle):
    @property
    def dtype(self) -> torch.dtype:
        return self.modules["transformer"].dtype

    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        tok, te = self.extra["tokenizer"], self.modules["text_encoder"]
        tok2, te2 = self.extra["tokenizer_2"], self.modules["text_encoder_2"]
        with torch.inference_mode():
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt")
            pooled = te(ids.input_ids.to(te.device), output_hidden_states=False).pooler_output
            ids2 = tok2(prompts, padding="max_length", max_length=self.extra["max_sequence_length"], truncation=True,
                        return_tensors="pt")
            embeds = te2(ids2.input_ids.to(te2.device), output_hidden_states=False)[0]
        return Conditioning({"encoder_hidden_states": embeds.to(self.device, self.dtype),
                             "pooled_projections": pooled.to(self.device, self.dtype)})

    def model(self, x, timestep, cond: Conditioning):
        tr = self.modules["transformer"]
        b, _, h, w = x.shape
        ctx = cond.tensors["encoder_hidden_states"]
        guidance = None
        if tr.config.guidance_embeds:
            g = float(self.extra.get("distilled_guidance", DEFAULT_DISTILLED_GUIDANCE))
            guidance = torch.full((b,), g, device=x.device, dtype=torch.float32)
        out = tr(hidden_states=pack(x), timestep=batch_timestep(timestep, x).to(x.dtype) / 1000, guidance=guidance,
                 pooled_projections=cond.tensors["pooled_projections"], encoder_hidden_states=ctx,
                 txt_ids=torch.zeros(ctx.shape[1], 3, device=x.device, dtype=ctx.dtype),
                 img_ids=image_ids(h, w, x.device, x.dtype), return_dict=False)[0]
        return unpack(out, h, w)

    def schedule_kwargs(self, height, width, num_steps):
        cfg = self.scheduler_config
        f = self.extra["latent_factor"]
        seq = (height // (f * 2)) * (width // (f * 2))
        kwargs = {"mu": calculate_shift(seq, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                        cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))}
        if not cfg.get("use_flow_sigmas"):
            kwargs["sigmas"] = np.linspace(1.0, 1 / num_steps, num_steps)
        return kwargs

    def latent_shape(self, batch, height, width):
        f = self.extra["latent_factor"]
        c = self.modules["transformer"].config.in_channels // 4
        return (batch, c, 2 * (height // (f * 2)), 2 * (width // (f * 2)))

    def decode(self, latents):
        return vae_decode(self.modules["vae"], latents)

    def encode(self, images):
        return vae_encode(self.modules["vae"], images)


@register_family("flux")
def load_flux(path: str, *, dtype=torch.float32, allow_pickle: bool = False) -> FluxBundle:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    st = not allow_pickle
    transformer = FluxTransformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dtype,
                                                         use_safetensors=st)
    if transformer.config.patch_size != 1:
        raise ValueError(f"{path}: FLUX transformers take 2x2-packed latents with patch_size 1 "
                         f"(got {transformer.config.patch_size})")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, use_safetensors=st)
    te = CLIPTextModel.from_pretrained(os.path.join(path, "text_encoder"), torch_dtype=dtype, use_safetensors=st)
    te2 = T5EncoderModel.from_pretrained(os.path.join(path, "text_encoder_2"), torch_dtype=dtype, use_safetensors=st)
    extra = {
        "tokenizer": CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer")),
        "tokenizer_2": T5TokenizerFast.from_pretrained(os.path.join(path, "tokenizer_2")),
        "max_sequence_length": 512,
        "distilled_guidance": DEFAULT_DISTILLED_GUIDANCE,
    }
    sched = read_scheduler_config(path)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size = 128 * factor  # the pipeline's default_sample_size
    extra["latent_factor"] = factor
    return FluxBundle(
        name="", family="flux", kind="flow", prediction_type="flow", scheduler_config=sched,
        modules={"transformer": transformer, "vae": vae, "text_encoder": te, "text_encoder_2": te2},
        default_size=(size, size), size_multiple=factor * 2, extra=extra,
    )
