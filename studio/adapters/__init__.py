"""Plug-in adapters of a loaded model: textual-inversion embeddings, ControlNets and IP-Adapters.

Each technique has its own file (the format it reads, the math it adds); the session manager does
all the loading, caching, budget accounting and device moves, and scopes every per-run change.

`AdapterRefs` is what a request asks for (typed, with its images already opened, so a bad file is a
one-line error before any weights load); `AdapterInputs` is what the engine consumes for one run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from .controlnet import ControlNetRef, ControlUnit
from .ip_adapter import IPAdapterRef
from .textual_inversion import EmbeddingRef

__all__ = ["AdapterRefs", "AdapterInputs", "ControlNetRef", "ControlUnit", "EmbeddingRef", "IPAdapterRef", "open_image"]


def open_image(path: str, what: str):
    """An image file as RGB (any mode converts); one-line errors for a missing or unreadable file."""
    from PIL import Image, UnidentifiedImageError

    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"{what} {path}: cannot read it as an image ({type(e).__name__})") from None


@dataclass
class AdapterRefs:
    """The adapters a request asks for, parsed from `GenerateRequest.embeddings/controlnets/ip_adapter`."""

    embeddings: list[EmbeddingRef] = field(default_factory=list)
    controlnets: list[ControlNetRef] = field(default_factory=list)
    ip_adapter: Optional[IPAdapterRef] = None

    def __bool__(self) -> bool:
        return bool(self.embeddings or self.controlnets or self.ip_adapter)

    @staticmethod
    def from_request(req) -> "AdapterRefs":
        """Typed references; opens the control and reference images (one-line errors for bad files)."""
        embeddings = [EmbeddingRef(path=os.path.abspath(os.path.expanduser(e["path"])), token=e.get("token"))
                      for e in (getattr(req, "embeddings", None) or [])]
        controlnets = [ControlNetRef(model=os.path.abspath(os.path.expanduser(c["model"])),
                                     image=open_image(c["image"], "control image"),
                                     scale=float(c.get("scale", 1.0)), start=float(c.get("start", 0.0)),
                                     stop=float(c.get("stop", 1.0)))
                       for c in (getattr(req, "controlnets", None) or [])]
        ip = getattr(req, "ip_adapter", None)
        ip_ref = None
        if ip:
            encoder = ip.get("image_encoder")
            ip_ref = IPAdapterRef(path=os.path.abspath(os.path.expanduser(ip["path"])),
                                  image_encoder=os.path.abspath(os.path.expanduser(encoder)) if encoder else None,
                                  image=open_image(ip["image"], "IP-Adapter reference image"),
                                  scale=float(ip.get("scale", 1.0)))
        return AdapterRefs(embeddings, controlnets, ip_ref)


@dataclass
class AdapterInputs:
    """Per-run inputs of the engine: ControlNet units and the IP-Adapter's image embeddings.

    `image_embeds` is (cond, uncond), each (1, 1, D) (or (1, 1, tokens, D) for hidden-state variants):
    the reference image's embedding for the prompt branch and the pipeline's "no image" embedding
    for the negative branch.
    """

    controls: list[ControlUnit] = field(default_factory=list)
    image_embeds: Optional[tuple[torch.Tensor, torch.Tensor]] = None
