"""The family contract: what the engine needs from any model."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..safety import check_model_folder


@dataclass
class Conditioning:
    """Batch-first tensors that the network takes besides x and t (e.g. encoder_hidden_states)."""

    tensors: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        keys = items[0].tensors.keys()
        return Conditioning({k: torch.cat([c.tensors[k] for c in items]) for k in keys})

    def repeat(self, n: int) -> "Conditioning":
        return Conditioning({k: v.repeat_interleave(n, dim=0) if v.shape[0] == 1 else v for k, v in self.tensors.items()})


@dataclass
class Bundle:
    """A loaded model, as the engine sees it. Subclasses fill in the methods."""

    name: str
    family: str
    kind: str  # "vp" or "flow"
    prediction_type: str  # epsilon | v_prediction | sample | flow
    scheduler_config: dict
    modules: dict[str, torch.nn.Module]
    default_size: tuple[int, int] = (512, 512)  # (height, width)
    size_multiple: int = 8
    source: str = ""
    label: str = ""  # shown in the UI next to the model name
    extra: dict[str, Any] = field(default_factory=dict)

    # plug-in adapters the family takes (studio/adapters): "embeddings", "controlnets", "ip_adapter"
    supported_adapters: ClassVar[tuple[str, ...]] = ()

    @property
    def device(self) -> torch.device:
        return next(iter(self.modules.values())).device if self.modules else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return self.modules["unet"].dtype if "unet" in self.modules else torch.float32

    @property
    def default_sampler(self) -> str:
        return "flow_euler" if self.kind == "flow" else "ddim"

    # --- to implement per family
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        raise NotImplementedError

    def encode_negative_prompt(self, prompts: list[str]) -> Conditioning:
        """Conditioning of the negative (unconditional) branch; "" when the request has no negative prompt.

        The same as `encode_prompt` unless a family treats the empty negative prompt specially
        (SDXL's `force_zeros_for_empty_prompt` uses zero embeddings).
        """
        return self.encode_prompt(prompts)

    def model(self, x: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The network's output for x at `timestep`; families that take ControlNets also accept
        `residuals=(down, mid)` to add to the UNet's skip connections and middle block."""
        raise NotImplementedError

    def token_table(self):
        """(tokenizer, text encoder) that textual-inversion tokens are added to (families with "embeddings")."""
        raise NotImplementedError

    def schedule_kwargs(self, height: int, width: int, num_steps: int) -> dict[str, Any]:
        """Extra inputs of `schedules.make_schedule` (`sigmas`, `mu`) for this model at this image size.

        Empty unless the family's pipeline builds its noise levels from more than the scheduler
        config (FLUX: a custom sigma table and a resolution-dependent shift).
        """
        return {}

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1], (B, 3, H, W)."""
        raise NotImplementedError

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> latents (deterministic: the mean of a VAE posterior)."""
        raise NotImplementedError

    def check_size(self, height: int, width: int) -> None:
        m = self.size_multiple
        if height <= 0 or width <= 0 or height % m or width % m:
            raise ValueError(f"width and height must be positive multiples of {m} for {self.name} (got {width}x{height})")

    def memory_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for m in self.modules.values() for p in m.parameters()) + \
            sum(b.numel() * b.element_size() for m in self.modules.values() for b in m.buffers())


FAMILIES: dict[str, Any] = {}


def register_family(name: str):
    def deco(fn):
        FAMILIES[name] = fn
        return fn

    return deco


def detect_family(path: str) -> str:
    """Family of a diffusers folder, from its model_index.json."""
    index = os.path.join(path, "model_index.json")
    if not os.path.exists(index):
        raise FileNotFoundError(f"{path}: not a diffusers model folder (no model_index.json)")
    with open(index) as f:
        mi = json.load(f)
    if "family" in mi:
        return mi["family"]
    cls = mi.get("_class_name", "")
    if "XL" in cls:
        return "sdxl"
    if "StableDiffusion3" in cls:
        return "sd3"
    if "Flux" in cls:
        return "flux"
    if "StableDiffusion" in cls:
        return "sd15"
    raise ValueError(f"{path}: unsupported pipeline class {cls!r}")


def load_bundle(path: str, *, name: str | None = None, family: str | None = None,
                dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                allow_pickle: bool = False) -> Bundle:
    """Load a diffusers folder as a Bundle. Only the session manager should call this."""
    from . import flux, sd, sd3, sdxl, shapesworld  # noqa: F401  (register the families)

    check_model_folder(path, allow_pickle=allow_pickle)
    family = family or detect_family(path)
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(sorted(FAMILIES))}")
    bundle = FAMILIES[family](path, dtype=dtype, allow_pickle=allow_pickle)
    bundle.name = name or os.path.basename(os.path.normpath(path))
    bundle.source = path
    for m in bundle.modules.values():
        m.to(device)
        m.eval()
        m.requires_grad_(False)
    return bundle
