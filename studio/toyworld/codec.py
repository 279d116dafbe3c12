"""The exact latent codec of ShapesWorld: pixel-unshuffle by 4 (64x64x3 <-> 16x16x48).

It sits where the SD families put their VAE. It has no parameters, costs no training and
reconstructs exactly, so inversion and editing scores measure the method, not a codec.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

CONFIG_NAME = "codec_config.json"


class PixelUnshuffleCodec(torch.nn.Module):
    """images in [-1, 1], (B, 3, H, W)  <->  latents (B, 3*f*f, H/f, W/f), multiplied by `scaling_factor`."""

    def __init__(self, factor: int = 4, in_channels: int = 3, scaling_factor: float = 1.0):
        super().__init__()
        self.factor = int(factor)
        self.in_channels = int(in_channels)
        self.scaling_factor = float(scaling_factor)

    @property
    def latent_channels(self) -> int:
        return self.in_channels * self.factor * self.factor

    @property
    def config(self) -> dict:
        return {"factor": self.factor, "in_channels": self.in_channels, "scaling_factor": self.scaling_factor}

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] % self.factor or images.shape[-2] % self.factor:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of {self.factor}")
        return F.pixel_unshuffle(images, self.factor) * self.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents / self.scaling_factor, self.factor)

    def save_pretrained(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, CONFIG_NAME), "w") as f:
            json.dump({"_class_name": type(self).__name__, **self.config}, f, indent=2)

    @classmethod
    def from_pretrained(cls, path: str) -> "PixelUnshuffleCodec":
        with open(os.path.join(path, CONFIG_NAME)) as f:
            cfg = json.load(f)
        cfg.pop("_class_name", None)
        return cls(**cfg)
