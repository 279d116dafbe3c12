"""ShapesWorld (diffusion and flow): the SD architecture with the exact pixel-unshuffle codec instead of a VAE."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..toyworld.codec import PixelUnshuffleCodec
from ..toyworld.weak import WEAK_DIR, weak_unet_mismatch
from .base import register_family
from .sd import SDBundle, read_scheduler_config, prediction_type_of


@dataclass
class ShapesWorldBundle(SDBundle):
    def latent_shape(self, batch, height, width):
        f = self.extra["codec"].factor
        return (batch, self.extra["codec"].latent_channels, height // f, width // f)

    def decode(self, latents):
        return self.extra["codec"].decode(latents)

    def encode(self, images):
        return self.extra["codec"].encode(images)

    def weak_unet(self):
        """AutoGuidance's weak model (survey §5.2.5): the same UNet trained briefly against this model's text
        encoder, if shipped and trained against that encoder (else None; extra["weak_unet_refused"] says why)."""
        return self.modules.get("unet_weak")


def _load(path: str, family: str, dtype, allow_pickle: bool) -> ShapesWorldBundle:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    st = not allow_pickle
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, use_safetensors=st)
    te = CLIPTextModel.from_pretrained(os.path.join(path, "text_encoder"), torch_dtype=dtype, use_safetensors=st)
    tok = CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
    codec = PixelUnshuffleCodec.from_pretrained(os.path.join(path, "codec"))
    modules = {"unet": unet, "text_encoder": te}
    extra = {}
    if os.path.isdir(os.path.join(path, WEAK_DIR)):
        why = weak_unet_mismatch(path)
        if why is None:
            modules["unet_weak"] = UNet2DConditionModel.from_pretrained(path, subfolder=WEAK_DIR, torch_dtype=dtype, use_safetensors=st)
        else:  # AutoGuidance with it would guide away from a model that reads other embeddings: refuse it
            extra["weak_unet_refused"] = (f"{why}; retrain it with `python -m studio train shapesworld --stage weak "
                                          "--minutes 60 --export`")
    sched = read_scheduler_config(path)
    size = unet.config.sample_size * codec.factor
    return ShapesWorldBundle(
        name="", family=family, kind="flow" if family == "shapesworld-flow" else "vp",
        prediction_type=prediction_type_of(sched), scheduler_config=sched, modules=modules,
        default_size=(size, size), size_multiple=codec.factor,
        extra={"tokenizer": tok, "codec": codec, "latent_factor": codec.factor, **extra},
    )


@register_family("shapesworld")
def load_shapesworld(path: str, *, dtype=torch.float32, allow_pickle: bool = False):
    return _load(path, "shapesworld", dtype, allow_pickle)


@register_family("shapesworld-flow")
def load_shapesworld_flow(path: str, *, dtype=torch.float32, allow_pickle: bool = False):
    return _load(path, "shapesworld-flow", dtype, allow_pickle)
