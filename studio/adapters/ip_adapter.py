"""IP-Adapter: a reference image as a second prompt through decoupled cross-attention (survey §11.3.2).

A frozen image encoder E_img reads the reference image R; a small trained projection turns its
embedding into image-prompt tokens C_img = A_proj(E_img(R)); every cross-attention layer gets its
own image keys and values next to the text ones and adds the two attention outputs:

    Z = Attn(Q, K_text, V_text) + lambda * Attn(Q, W_K^img C_img, W_V^img C_img)      (§11.3.2)

with lambda the IP-Adapter scale. The text path is untouched, so lambda = 0 is the base model.

Files load as diffusers' `load_ip_adapter` reads them (safetensors keys "image_proj.*" and
"ip_adapter.<n>.to_k_ip.weight" / "to_v_ip.weight"), and the UNet's own converters build the
modules: `_convert_ip_adapter_attn_to_diffusers` gives the IP-Adapter attention processors and
`_convert_ip_adapter_image_proj_to_diffusers` the image projection. At run time the negative
branch gets the pipeline's "no image" embedding (zeros for the pooled-embedding adapters; the
encoding of a black image for the hidden-state variants), and the embeddings reach the UNet as
`added_cond_kwargs={"image_embeds": [...]}`, as in StableDiffusionPipeline.

Base state: the adapter's processors and projection are built once per model and cached, installed
only for a run that asks for them (`installed`), and afterwards the UNet's original processors,
`encoder_hid_proj` and `encoder_hid_dim_type` are put back. A run without an IP-Adapter therefore
runs the unmodified UNet (it needs no image embeddings and its output is the base output exactly).
FaceID adapters (which also carry LoRA weights) are refused.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Optional

import torch

IP_PROCESSORS = ("IPAdapterAttnProcessor", "IPAdapterAttnProcessor2_0", "IPAdapterXFormersAttnProcessor")


@dataclass
class IPAdapterRef:
    """A requested IP-Adapter: weights file (or folder holding one), image-encoder folder, reference image, scale."""

    path: str
    image_encoder: Optional[str]
    image: object  # PIL.Image.Image, RGB
    scale: float = 1.0


def weights_file(path: str) -> str:
    """The IP-Adapter safetensors file: `path` itself, or the single .safetensors file in the folder `path`."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"IP-Adapter not found: {path}")
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if len(files) != 1:
        raise ValueError(f"{path}: expected one IP-Adapter .safetensors file in the folder, found "
                         f"{len(files)}{' (' + ', '.join(files) + ')' if files else ''}; give the file's path")
    return os.path.join(path, files[0])


def encoder_folder(ref: IPAdapterRef) -> str:
    """The image-encoder folder: as given, else `image_encoder/` next to the weights."""
    if ref.image_encoder:
        return ref.image_encoder
    base = ref.path if os.path.isdir(ref.path) else os.path.dirname(ref.path)
    folder = os.path.join(base, "image_encoder")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no image encoder for the IP-Adapter {ref.path}: give \"image_encoder\" "
                                f"(a CLIPVisionModelWithProjection folder) or put one in {folder}")
    return folder


def read_state_dict(file: str) -> dict:
    """{"image_proj": {...}, "ip_adapter": {...}} from a safetensors file, as diffusers' `load_ip_adapter` splits it."""
    from safetensors import safe_open

    sd = {"image_proj": {}, "ip_adapter": {}}
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            for key in f.keys():
                if key.startswith("image_proj."):
                    sd["image_proj"][key[len("image_proj."):]] = f.get_tensor(key)
                elif key.startswith("ip_adapter."):
                    sd["ip_adapter"][key[len("ip_adapter."):]] = f.get_tensor(key)
    except Exception as e:  # not safetensors, truncated
        raise ValueError(f"{file}: not a readable safetensors IP-Adapter ({type(e).__name__})") from None
    if not sd["image_proj"] or not sd["ip_adapter"]:
        raise ValueError(f"{file}: not an IP-Adapter (expected keys starting with 'image_proj.' and 'ip_adapter.')")
    if any("lora" in k for k in sd["ip_adapter"]):
        raise ValueError(f"{file}: FaceID IP-Adapters (with LoRA weights) are not supported")
    return sd


class IPAdapter(torch.nn.Module):
    """One IP-Adapter built for one UNet: its attention processors, image projection and image encoder.

    A module so that the session can move it with its model and count its bytes.
    """

    def __init__(self, processors: dict, projection: torch.nn.Module, image_encoder: torch.nn.Module, image_processor):
        super().__init__()
        self.names = list(processors)
        self.processors = torch.nn.ModuleList(processors.values())
        self.projection = projection  # MultiIPAdapterImageProjection with one layer
        self.image_encoder = image_encoder
        self.image_processor = image_processor  # CLIPImageProcessor (no weights)

    @property
    def uses_hidden_states(self) -> bool:
        """Whether the projection reads the encoder's penultimate hidden states (Plus/Full variants)."""
        from diffusers.models.embeddings import ImageProjection

        return not isinstance(self.projection.image_projection_layers[0], ImageProjection)


def build(unet, state_dict: dict, image_encoder, where: str) -> IPAdapter:
    """The IP-Adapter modules for `unet` from a state dict. Only the session manager calls this."""
    from diffusers.models.embeddings import MultiIPAdapterImageProjection
    from transformers import CLIPImageProcessor

    if unet.encoder_hid_proj is not None:
        raise ValueError(f"{where}: this model's UNet already projects its encoder states ({unet.config.encoder_hid_dim_type}); "
                         "IP-Adapters are not supported for it")
    try:
        procs = unet._convert_ip_adapter_attn_to_diffusers([state_dict], low_cpu_mem_usage=False)
        projection = unet._convert_ip_adapter_image_proj_to_diffusers(state_dict["image_proj"], low_cpu_mem_usage=False)
    except (KeyError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{where}: this IP-Adapter does not fit the model ({first[:200]})") from None
    procs = {k: v for k, v in procs.items() if type(v).__name__ in IP_PROCESSORS}
    size = image_encoder.config.image_size
    # the processor diffusers' `load_ip_adapter` creates when the pipeline has no feature extractor
    image_processor = CLIPImageProcessor(size=size, crop_size=size)
    return IPAdapter(procs, MultiIPAdapterImageProjection([projection]), image_encoder, image_processor)


def encode_image(adapter: IPAdapter, image) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) image embeddings of a reference image, each with batch and image axes (1, 1, ...).

    As StableDiffusionPipeline.encode_image: the projected CLIP image embedding and zeros, or, for
    the hidden-state variants, the penultimate hidden states of the image and of a black image.
    """
    enc = adapter.image_encoder
    p = next(enc.parameters())
    pixels = adapter.image_processor(image, return_tensors="pt").pixel_values.to(p.device, p.dtype)
    with torch.inference_mode():
        if adapter.uses_hidden_states:
            cond = enc(pixels, output_hidden_states=True).hidden_states[-2]
            uncond = enc(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
        else:
            cond = enc(pixels).image_embeds
            uncond = torch.zeros_like(cond)
    return cond[None], uncond[None]


@contextlib.contextmanager
def installed(unet, adapter: IPAdapter, scale: float):
    """Install the adapter's processors and projection at `scale` for one run; restore the UNet after."""
    saved_procs = dict(unet.attn_processors)
    saved_proj, saved_type = unet.encoder_hid_proj, unet.config.encoder_hid_dim_type
    procs = dict(saved_procs)
    for name, proc in zip(adapter.names, adapter.processors):
        proc.scale = [float(scale)] * len(proc.scale)
        procs[name] = proc
    try:
        unet.set_attn_processor(procs)
        unet.encoder_hid_proj = adapter.projection
        setattr(unet.config, "encoder_hid_dim_type", "ip_image_proj")  # what `_load_ip_adapter_weights` sets
        yield adapter
    finally:
        unet.set_attn_processor(dict(saved_procs))
        unet.encoder_hid_proj = saved_proj
        setattr(unet.config, "encoder_hid_dim_type", saved_type)
