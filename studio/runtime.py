"""Device and dtype choice, and an optional ZeroGPU decorator (a no-op off Hugging Face Spaces)."""

from __future__ import annotations

import os

import torch


def pick_device() -> str:
    forced = os.environ.get("STUDIO_DEVICE")
    if forced:
        return forced
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(device: str) -> torch.dtype:
    forced = os.environ.get("STUDIO_DTYPE")
    if forced:
        return getattr(torch, forced)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.float32


def gpu(duration: int = 60):
    """Wrap with `spaces.GPU(duration=...)` when running on a ZeroGPU Space; otherwise return the function."""

    def deco(fn):
        try:
            import spaces  # type: ignore
        except ImportError:
            return fn
        return spaces.GPU(duration=duration)(fn)

    return deco
