"""Stable Diffusion XL: UNet2DConditionModel with 'text_time' added conditioning, two CLIP text encoders, AutoencoderKL.

Prompt encoding follows diffusers' StableDiffusionXLPipeline: the penultimate hidden states of
both encoders are concatenated along the feature axis, the pooled embedding comes from the second
(projection) encoder, and the UNet's added conditioning is (pooled text embedding, time ids) with
time ids (original_size, crops_coords_top_left, target_size) = ((H, W), (0, 0), (H, W)). The time
ids depend on the image size, so `model()` builds them from the latent it is given.

Empty negative prompt: with the folder's `force_zeros_for_empty_prompt` (True for the SDXL base
model) the pipeline uses zero embeddings for the unconditional branch when no negative prompt is
given (`negative_prompt=None`). Our requests carry "" for "no negative prompt", so
`encode_negative_prompt` maps "" to zeros: this equals the pipeline with `negative_prompt=None`.
(The pipeline called with an explicit `negative_prompt=""` encodes the empty string instead; a
request cannot tell the two apart.) A non-empty negative prompt, and every positive prompt,
including "", are encoded as the pipeline encodes them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .base import Bundle, Conditioning, register_family
from .sd import prediction_type_of, read_scheduler_config


@dataclass
class SDXLBundle(Bundle):
    def _encoders(self):
        """(tokenizer, text encoder) pairs in the pipeline's order; the refiner layout has only the second."""
        pairs = []
        if "text_encoder" in self.modules:
            pairs.append((self.extra["tokenizer"], self.modules["text_encoder"]))
        pairs.append((self.extra["tokenizer_2"], self.modules["text_encoder_2"]))
        return pairs

    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        hidden, pooled = [], None
        with torch.inference_mode():
            for tok, te in self._encoders():
                ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                          return_tensors="pt")
                out = te(ids.input_ids.to(te.device), output_hidden_states=True)
                if pooled is None and out[0].ndim == 2:  # the projection encoder's text_embeds
                    pooled = out[0]
                hidden.append(out.hidden_states[-2])
        te2 = self.modules["text_encoder_2"]
        embeds = torch.cat(hidden, dim=-1).to(device=self.device, dtype=te2.dtype)
        return Conditioning({"encoder_hidden_states": embeds.to(self.dtype), "text_embeds": pooled.to(self.device, self.dtype)})

    def encode_negative_prompt(self, prompts: list[str]) -> Conditioning:
        cond = self.encode_prompt(prompts)
        if not self.extra.get("force_zeros_for_empty_prompt", False):
            return cond
        empty = torch.tensor([p == "" for p in prompts], device=self.device)
        return Conditioning({k: torch.where(empty.view(-1, *([1] * (v.ndim - 1))), torch.zeros_like(v), v)
                             for k, v in cond.tensors.items()})

    def time_ids(self, batch: int, height: int, width: int) -> torch.Tensor:
        """(original_size, crops_coords_top_left, target_size) = ((H, W), (0, 0), (H, W)) per image."""
        ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=self.dtype, device=self.device)
        return ids.repeat(batch, 1)

    def model(self, x, timestep, cond: Conditioning):
        f = self.extra["latent_factor"]
        added = {"text_embeds": cond.tensors["text_embeds"],
                 "time_ids": self.time_ids(x.shape[0], x.shape[-2] * f, x.shape[-1] * f)}
        return self.modules["unet"](x, timestep, encoder_hidden_states=cond.tensors["encoder_hidden_states"],
                                    added_cond_kwargs=added, return_dict=False)[0]

    def latent_shape(self, batch, height, width):
        f = self.extra["latent_factor"]
        return (batch, self.modules["unet"].config.in_channels, height // f, width // f)

    def _latent_stats(self, latents):
        cfg = self.modules["vae"].config
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if mean is None or std is None:
            return None
        c = latents.shape[1]
        return (torch.tensor(mean).view(1, c, 1, 1).to(latents.device, latents.dtype),
                torch.tensor(std).view(1, c, 1, 1).to(latents.device, latents.dtype))

    def decode(self, latents):
        vae = self.modules["vae"]
        stats = self._latent_stats(latents)
        z = latents * stats[1] / vae.config.scaling_factor + stats[0] if stats else latents / vae.config.scaling_factor
        if vae.dtype == torch.float16 and vae.config.force_upcast:
            # the SDXL VAE overflows in float16; the pipeline decodes in float32
            vae.to(torch.float32)
            try:
                return vae.decode(z.float(), return_dict=False)[0]
            finally:
                vae.to(torch.float16)
        return vae.decode(z.to(vae.dtype), return_dict=False)[0]

    def encode(self, images):
        vae = self.modules["vae"]
        z = vae.encode(images.to(vae.dtype)).latent_dist.mean
        stats = self._latent_stats(z)
        return (z - stats[0]) * vae.config.scaling_factor / stats[1] if stats else z * vae.config.scaling_factor


def read_model_index(path: str) -> dict:
    import json

    with open(os.path.join(path, "model_index.json")) as f:
        return json.load(f)


def has_component(index: dict, name: str) -> bool:
    """Whether model_index.json lists `name` with a class (a [null, null] entry means absent)."""
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None


@register_family("sdxl")
def load_sdxl(path: str, *, dtype=torch.float32, allow_pickle: bool = False) -> SDXLBundle:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    st = not allow_pickle
    index = read_model_index(path)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, use_safetensors=st)
    if unet.config.addition_embed_type != "text_time":
        raise ValueError(f"{path}: an SDXL UNet needs addition_embed_type 'text_time' (got {unet.config.addition_embed_type!r})")
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, use_safetensors=st)
    modules = {"unet": unet, "vae": vae}
    extra = {}
    if has_component(index, "text_encoder"):
        modules["text_encoder"] = CLIPTextModel.from_pretrained(os.path.join(path, "text_encoder"), torch_dtype=dtype,
                                                                use_safetensors=st)
        extra["tokenizer"] = CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
    modules["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
        os.path.join(path, "text_encoder_2"), torch_dtype=dtype, use_safetensors=st)
    extra["tokenizer_2"] = CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer_2"))
    expected = unet.add_embedding.linear_1.in_features
    passed = unet.config.addition_time_embed_dim * 6 + modules["text_encoder_2"].config.projection_dim
    if expected != passed:
        raise ValueError(f"{path}: the UNet expects an added embedding of {expected} features but the time ids and "
                         f"pooled text embedding give {passed}")
    sched = read_scheduler_config(path)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size = unet.config.sample_size * factor
    extra.update(latent_factor=factor, force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)))
    return SDXLBundle(
        name="", family="sdxl", kind="flow" if prediction_type_of(sched) == "flow" else "vp",
        prediction_type=prediction_type_of(sched), scheduler_config=sched, modules=modules,
        default_size=(size, size), size_multiple=factor, extra=extra,
    )
