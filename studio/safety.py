"""Safe model sources: pickle checkpoints are code execution, so they are refused by default."""

from __future__ import annotations

import os

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl", ".pickle")


class UnsafeModelError(ValueError):
    pass


def check_model_folder(path: str, *, allow_pickle: bool = False) -> None:
    """Raise a one-line error when `path` is missing, is a pickle file, or holds only pickle weights."""
    if os.path.isfile(path):
        if path.lower().endswith(PICKLE_SUFFIXES):
            raise UnsafeModelError(
                f"refusing to load pickle checkpoint {path}: pickle files can run code; "
                "convert it to safetensors (or allow pickle checkpoints in the local settings)")
        raise ValueError(f"{path}: expected a diffusers model folder, got a file")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model folder not found: {path}")
    if allow_pickle:
        return
    for root, _, files in os.walk(path):
        weights = [f for f in files if f.endswith(".safetensors")]
        pickles = [f for f in files if f.lower().endswith(PICKLE_SUFFIXES)]
        if pickles and not weights:
            raise UnsafeModelError(
                f"refusing to load pickle weights {os.path.join(root, pickles[0])}: pickle files can run code; "
                "convert them to safetensors (or allow pickle checkpoints in the local settings)")
