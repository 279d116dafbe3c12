"""Model specs: what can be loaded, from where (shipped asset, local folder, hub id)."""

from __future__ import annotations

import os
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSETS = os.path.join(ROOT, "assets", "models")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str  # "asset" | "local" | "hub"
    location: str  # folder path or hub id
    family: str | None = None  # None: read from model_index.json
    label: str = ""

    @property
    def key(self) -> str:
        return f"{self.source}:{self.location}"


BUILTIN = {
    "shapesworld": ModelSpec("shapesworld", "asset", os.path.join(ASSETS, "shapesworld"), "shapesworld",
                             "ShapesWorld diffusion (shipped, 64x64)"),
    "shapesworld-flow": ModelSpec("shapesworld-flow", "asset", os.path.join(ASSETS, "shapesworld-flow"), "shapesworld-flow",
                                  "ShapesWorld flow matching (shipped, 64x64)"),
}
DEFAULT_MODEL = "shapesworld"


def _looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~")) and not os.path.exists(s)


def resolve(model: str) -> ModelSpec:
    """A registry name, a local folder, or a hub id -> ModelSpec. Raises ValueError with one clear line."""
    if not model or not str(model).strip():
        raise ValueError("no model given")
    model = str(model).strip()
    if model in BUILTIN:
        return BUILTIN[model]
    path = os.path.abspath(os.path.expanduser(model))
    if os.path.exists(path):
        return ModelSpec(os.path.basename(os.path.normpath(path)), "local", path)
    if _looks_like_hub_id(model):
        return ModelSpec(model, "hub", model)
    raise FileNotFoundError(f"model not found: {model} (not a registered name, a local folder or a hub id)")


def fetch_hub_model(repo_id: str) -> str:
    """Download (or find in the local cache) the safetensors files of a diffusers repo; returns the folder."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"])
    except Exception as e:  # offline, unknown repo, gated repo
        raise FileNotFoundError(f"cannot fetch {repo_id} from the model hub: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
