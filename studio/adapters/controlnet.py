"""ControlNet: a trainable copy of the UNet encoder adds spatial control through residuals.

A plug-in module trained next to a frozen generator (survey §2.1, Axis I, "plug-in module
training"), injecting its condition through "residual feature injection" and "ControlNet-style
side branches" (§11.1.3, Stage III: condition injection). The ControlNet reads the noisy latent, the timestep, the text conditioning and a control
image c (edges, depth, pose ...), and returns one residual per UNet skip connection plus one for the
middle block. The UNet adds them:

    h_k <- h_k + sum_j s_j(i) * r_{j,k}(x_t, t, y, c_j)        for every skip k and the middle block,

with s_j(i) = scale_j while step i lies in the ControlNet's window [start, stop] (as fractions of
the run) and 0 outside. Several ControlNets sum their residuals (diffusers' MultiControlNetModel).

Everything follows diffusers' StableDiffusionControlNetPipeline so a ControlNet folder gives the
same pixels here: the control image is converted to RGB, resized (Lanczos) to the output size,
scaled to [0, 1] and repeated over the batch and the guidance branches; the keep rule of the
window is the pipeline's `1 - (i/N < start or (i+1)/N > stop)`. A ControlNet whose scale is 0 at a
step is skipped, which equals adding its zero residuals exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass
class ControlNetRef:
    """One requested ControlNet: its diffusers folder, the opened control image, scale and window."""

    model: str
    image: object  # PIL.Image.Image, RGB
    scale: float = 1.0
    start: float = 0.0
    stop: float = 1.0


@dataclass
class ControlUnit:
    """A loaded ControlNet with its control image and schedule, as the engine uses it for one run."""

    net: torch.nn.Module
    image: object  # PIL.Image.Image (RGB), resized by `prepared`
    scale: float = 1.0
    start: float = 0.0
    stop: float = 1.0
    cond: Optional[torch.Tensor] = None  # (1, 3, H, W) in [0, 1] once prepared

    def prepared(self, height: int, width: int) -> "ControlUnit":
        """A copy holding the control image as a (1, 3, height, width) tensor in [0, 1]."""
        p = next(self.net.parameters())
        cond = control_image_tensor(self.image, height, width).to(p.device, p.dtype)
        return ControlUnit(self.net, self.image, self.scale, self.start, self.stop, cond)

    def keep(self, i: int, num_steps: int) -> float:
        """1 while step i lies in [start, stop] (diffusers' controlnet_keep), else 0."""
        return 1.0 - float(i / num_steps < self.start or (i + 1) / num_steps > self.stop)


def control_image_tensor(image, height: int, width: int) -> torch.Tensor:
    """RGB image -> (1, 3, height, width) in [0, 1], as the ControlNet pipeline's image processor makes it."""
    from diffusers.image_processor import VaeImageProcessor

    # vae_scale_factor=1: the size is already one the model accepts; the processor must not round it down
    proc = VaeImageProcessor(vae_scale_factor=1, do_convert_rgb=True, do_normalize=False)
    return proc.preprocess(image, height=height, width=width).to(dtype=torch.float32)


def check_fits(net, unet, latent_factor: int, where: str) -> None:
    """One-line error when a ControlNet's residuals or control-image size cannot match this UNet."""
    c, u = net.config, unet.config
    if tuple(c.block_out_channels) != tuple(u.block_out_channels) or c.cross_attention_dim != u.cross_attention_dim \
            or c.in_channels != u.in_channels:
        raise ValueError(f"{where}: this ControlNet does not fit the model (channels {tuple(c.block_out_channels)}, "
                         f"cross-attention {c.cross_attention_dim}, in {c.in_channels} vs the UNet's "
                         f"{tuple(u.block_out_channels)}, {u.cross_attention_dim}, {u.in_channels})")
    factor = 2 ** (len(c.conditioning_embedding_out_channels) - 1)
    if factor != latent_factor:
        raise ValueError(f"{where}: this ControlNet reads control images at 1/{factor} of the latent resolution "
                         f"but the model's latents are 1/{latent_factor} of the image")
    if getattr(c, "global_pool_conditions", False):
        raise ValueError(f"{where}: ControlNets with global_pool_conditions (guess mode) are not supported")
    if getattr(c, "addition_embed_type", None) is not None:
        raise ValueError(f"{where}: ControlNets with added conditioning ({c.addition_embed_type}, e.g. SDXL) are not supported")


def load_controlnet(path: str, dtype: torch.dtype):
    """A diffusers ControlNetModel folder (safetensors). Only the session manager calls this."""
    import json

    from diffusers import ControlNetModel

    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"ControlNet folder not found or without config.json: {path}")
    with open(cfg_file) as f:
        cls = json.load(f).get("_class_name", "")
    if cls != "ControlNetModel":
        raise ValueError(f"{path}: expected a diffusers ControlNetModel folder, found {cls or 'no _class_name'}")
    return ControlNetModel.from_pretrained(path, torch_dtype=dtype, use_safetensors=True)


def residuals(units: Sequence[ControlUnit], x: torch.Tensor, t, encoder_hidden_states: torch.Tensor,
              i: int, num_steps: int):
    """Summed (down residuals, mid residual) of the ControlNets active at step i; None when none is.

    `x` and `encoder_hidden_states` are the batched guidance branches of the model call; the control
    image is repeated over that batch (every branch sees the same control, as in the pipeline).
    """
    down, mid = None, None
    for u in units:
        scale = u.scale * u.keep(min(i, num_steps - 1), num_steps)
        if scale == 0.0:
            continue
        cond = u.cond.repeat(x.shape[0], 1, 1, 1)
        d, m = u.net(x, t, encoder_hidden_states=encoder_hidden_states, controlnet_cond=cond,
                     conditioning_scale=scale, guess_mode=False, return_dict=False)
        if down is None:
            down, mid = list(d), m
        else:
            down = [a + b for a, b in zip(down, d)]
            mid = mid + m
    return None if down is None else (down, mid)
