"""Stable Diffusion 3: SD3Transformer2DModel (MMDiT) + CLIP L/G + optional T5, rectified flow, AutoencoderKL.

Prompt encoding follows diffusers' StableDiffusion3Pipeline: the penultimate hidden states of the
two CLIP encoders (with projection) are concatenated along features, zero-padded to the T5 width
and stacked in front of the T5 sequence; the pooled projection is the two CLIP text embeddings
side by side. A folder saved without T5 (`text_encoder_3` null in model_index.json) uses a zero
T5 sequence of `max_sequence_length` tokens, as the pipeline does. The transformer predicts the
flow velocity eps - x0 at time t = sigma (timestep = 1000 sigma). Latents are
(z - shift_factor) * scaling_factor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .base import Bundle, Conditioning, register_family
from .sd import read_scheduler_config, vae_decode, vae_encode
from .sdxl import has_component, read_model_index


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Resolution-dependent shift mu of flow schedules (linear in the number of image tokens)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


def batch_timestep(timestep, x: torch.Tensor) -> torch.Tensor:
    """The scalar time of a step as a (B,) tensor, as the transformers expect."""
    t = torch.as_tensor(timestep, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


@dataclass
class SD3Bundle(Bundle):
    @property
    def dtype(self) -> torch.dtype:
        return self.modules["transformer"].dtype

    def _clip(self, prompts, tok, te, max_length):
        ids = tok(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        out = te(ids.input_ids.to(te.device), output_hidden_states=True)
        return out.hidden_states[-2], out[0]

    def _t5(self, prompts):
        n = self.extra["max_sequence_length"]
        te1 = self.modules["text_encoder"]
        if "text_encoder_3" not in self.modules:
            dim = self.modules["transformer"].config.joint_attention_dim
            return torch.zeros((len(prompts), n, dim), device=self.device, dtype=te1.dtype)
        tok, te = self.extra["tokenizer_3"], self.modules["text_encoder_3"]
        ids = tok(prompts, padding="max_length", max_length=n, truncation=True, add_special_tokens=True,
                  return_tensors="pt")
        return te(ids.input_ids.to(te.device))[0].to(self.device, te.dtype)

    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        te1 = self.modules["text_encoder"]
        max_length = self.extra["tokenizer"].model_max_length  # the pipeline uses the first tokenizer's length for both
        with torch.inference_mode():
            h1, p1 = self._clip(prompts, self.extra["tokenizer"], te1, max_length)
            h2, p2 = self._clip(prompts, self.extra["tokenizer_2"], self.modules["text_encoder_2"], max_length)
            clip = torch.cat([h1, h2], dim=-1).to(self.device, te1.dtype)
            t5 = self._t5(prompts)
            clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
            embeds = torch.cat([clip, t5], dim=-2)
            pooled = torch.cat([p1, p2], dim=-1)
        return Conditioning({"encoder_hidden_states": embeds.to(self.device, self.dtype),
                             "pooled_projections": pooled.to(self.device, self.dtype)})

    def model(self, x, timestep, cond: Conditioning):
        return self.modules["transformer"](
            hidden_states=x, timestep=batch_timestep(timestep, x),
            encoder_hidden_states=cond.tensors["encoder_hidden_states"],
            pooled_projections=cond.tensors["pooled_projections"], return_dict=False)[0]

    def schedule_kwargs(self, height, width, num_steps):
        cfg = self.scheduler_config
        if not cfg.get("use_dynamic_shifting"):
            return {}
        f, p = self.extra["latent_factor"], self.modules["transformer"].config.patch_size
        seq = (height // f // p) * (width // f // p)
        return {"mu": calculate_shift(seq, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                      cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))}

    def latent_shape(self, batch, height, width):
        f = self.extra["latent_factor"]
        return (batch, self.modules["transformer"].config.in_channels, height // f, width // f)

    def decode(self, latents):
        return vae_decode(self.modules["vae"], latents)

    def encode(self, images):
        return vae_encode(self.modules["vae"], images)


@register_family("sd3")
def load_sd3(path: str, *, dtype=torch.float32, allow_pickle: bool = False) -> SD3Bundle:
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    st = not allow_pickle
    index = read_model_index(path)
    transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dtype,
                                                        use_safetensors=st)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, use_safetensors=st)
    modules = {"transformer": transformer, "vae": vae}
    extra = {"max_sequence_length": 256}
    for i, suffix in enumerate(("", "_2")):
        modules["text_encoder" + suffix] = CLIPTextModelWithProjection.from_pretrained(
            os.path.join(path, "text_encoder" + suffix), torch_dtype=dtype, use_safetensors=st)
        extra["tokenizer" + suffix] = CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer" + suffix))
    if has_component(index, "text_encoder_3"):
        modules["text_encoder_3"] = T5EncoderModel.from_pretrained(os.path.join(path, "text_encoder_3"),
                                                                   torch_dtype=dtype, use_safetensors=st)
        extra["tokenizer_3"] = T5TokenizerFast.from_pretrained(os.path.join(path, "tokenizer_3"))
    sched = read_scheduler_config(path)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size = transformer.config.sample_size * factor
    extra["latent_factor"] = factor
    return SD3Bundle(
        name="", family="sd3", kind="flow", prediction_type="flow", scheduler_config=sched, modules=modules,
        default_size=(size, size), size_multiple=factor * transformer.config.patch_size, extra=extra,
    )
