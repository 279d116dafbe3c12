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


def check_weights_file(path: str, *, allow_pickle: bool = False) -> None:
    """A single weights file (LoRA, embedding, adapter): must exist and be safetensors unless pickle is allowed."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.lower().endswith(PICKLE_SUFFIXES) and not allow_pickle:
        raise UnsafeModelError(f"refusing to load pickle weights {path}: pickle files can run code; convert them to safetensors")
    if not path.lower().endswith(".safetensors") and not allow_pickle:
        raise UnsafeModelError(f"refusing {path}: only .safetensors weights load")


def is_within(path: str, root: str) -> bool:
    """True when `path`, with every symlink resolved, lies inside `root` (also resolved)."""
    p, r = os.path.realpath(path), os.path.realpath(root)
    return p == r or p.startswith(r.rstrip(os.sep) + os.sep)


def check_under_roots(path: str, roots: list[str]) -> None:
    """Refuse a local path outside the allowed roots: no `..` escapes, no symlinks pointing out."""
    ok = [r for r in roots if is_within(path, r)]
    if not ok:
        raise UnsafeModelError(f"{path} is outside the allowed model folders ({', '.join(roots) or 'none configured'})")
    root = ok[0]
    if os.path.isdir(path):
        for dirpath, dirnames, files in os.walk(path):
            for f in files + dirnames:
                full = os.path.join(dirpath, f)
                if os.path.islink(full) and not is_within(full, root):
                    raise UnsafeModelError(f"{full} is a symlink that points outside the allowed model folders")
