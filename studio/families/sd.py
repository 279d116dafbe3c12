"""Stable Diffusion 1.x/2.x architecture: UNet2DConditionModel + CLIPTextModel/CLIPTokenizer + AutoencoderKL."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..adapters.textual_inversion import expand_prompt
from .base import Bundle, Conditioning, register_family


@dataclass
class SDBundle(Bundle):
    """SD 1.x/2.x. Takes textual-inversion embeddings, ControlNets and an IP-Adapter (studio/adapters):

    prompts spell multi-vector embedding tokens out before tokenizing (as the pipeline does), a
    conditioning tensor "ip_image_embeds" goes to the UNet as `added_cond_kwargs["image_embeds"]`,
    and ControlNet `residuals` are added to its skip connections and middle block.
    """

    supported_adapters: ClassVar[tuple[str, ...]] = ("embeddings", "controlnets", "ip_adapter")

    def _tokenizer(self):
        return self.extra["tokenizer"]

    def token_table(self):
        return self.extra["tokenizer"], self.modules["text_encoder"]

    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        tok = self._tokenizer()
        te = self.modules["text_encoder"]
        prompts = [expand_prompt(p, tok) for p in prompts]
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        mask = ids.attention_mask.to(self.device) if getattr(te.config, "use_attention_mask", False) else None
        with torch.inference_mode():
            hidden = te(ids.input_ids.to(self.device), attention_mask=mask)[0]
        return Conditioning({"encoder_hidden_states": hidden.to(self.dtype)})

    def model(self, x, timestep, cond: Conditioning, residuals=None):
        kwargs = {}
        if "ip_image_embeds" in cond.tensors:
            kwargs["added_cond_kwargs"] = {"image_embeds": [cond.tensors["ip_image_embeds"]]}
        if residuals is not None:
            kwargs["down_block_additional_residuals"], kwargs["mid_block_additional_residual"] = residuals
        return self.modules["unet"](x, timestep, encoder_hidden_states=cond.tensors["encoder_hidden_states"],
                                    return_dict=False, **kwargs)[0]

    def latent_shape(self, batch, height, width):
        f = self.extra["latent_factor"]
        return (batch, self.modules["unet"].config.in_channels, height // f, width // f)

    def decode(self, latents):
        return vae_decode(self.modules["vae"], latents)

    def encode(self, images):
        return vae_encode(self.modules["vae"], images)


def vae_decode(vae, latents):
    """Latents -> images in [-1, 1] through an AutoencoderKL, undoing its scaling and shift factors."""
    z = latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
    return vae.decode(z.to(vae.dtype), return_dict=False)[0]


def vae_encode(vae, images):
    """Images in [-1, 1] -> latents (the posterior mean), with the VAE's shift and scaling factors."""
    z = vae.encode(images.to(vae.dtype)).latent_dist.mean
    return (z - (getattr(vae.config, "shift_factor", None) or 0.0)) * vae.config.scaling_factor


def read_scheduler_config(path: str) -> dict:
    with open(os.path.join(path, "scheduler", "scheduler_config.json")) as f:
        return json.load(f)


def prediction_type_of(cfg: dict) -> str:
    if cfg.get("_class_name", "").startswith("FlowMatch"):
        return "flow"
    return cfg.get("prediction_type", "epsilon")


@register_family("sd15")
def load_sd(path: str, *, dtype=torch.float32, allow_pickle: bool = False) -> SDBundle:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    st = not allow_pickle
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, use_safetensors=st)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, use_safetensors=st)
    te = CLIPTextModel.from_pretrained(os.path.join(path, "text_encoder"), torch_dtype=dtype, use_safetensors=st)
    tok = CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
    sched = read_scheduler_config(path)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size = unet.config.sample_size * factor
    return SDBundle(
        name="", family="sd15", kind="flow" if prediction_type_of(sched) == "flow" else "vp",
        prediction_type=prediction_type_of(sched), scheduler_config=sched,
        modules={"unet": unet, "vae": vae, "text_encoder": te}, default_size=(size, size), size_multiple=factor,
        extra={"tokenizer": tok, "latent_factor": factor},
    )
