"""Model specs: what can be loaded, from where (shipped asset, local folder, hub id)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .safety import UnsafeModelError, check_under_roots

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


@dataclass
class Policy:
    """Which sources a session may load from.

    Local (default): registered models, any local folder (or only those under `model_roots` when some
    are configured), any hub id. Hosted (`hosted=True`, e.g. a public Space): registered models and the
    configured hub ids only; local paths only under `model_roots`. Pickle checkpoints are refused
    unless `allow_pickle` (a local setting; never honoured when hosted).
    """

    hosted: bool = False
    allowed_hub_ids: tuple[str, ...] = ()
    model_roots: tuple[str, ...] = ()
    allow_pickle: bool = False

    @staticmethod
    def from_env() -> "Policy":
        split = lambda v: tuple(x for x in (os.environ.get(v) or "").split(os.pathsep if v == "STUDIO_MODEL_ROOTS" else ",") if x)  # noqa: E731
        hosted = os.environ.get("STUDIO_HOSTED", "").lower() in ("1", "true", "yes")
        return Policy(hosted=hosted, allowed_hub_ids=split("STUDIO_HUB_IDS"), model_roots=split("STUDIO_MODEL_ROOTS"),
                      allow_pickle=(not hosted) and os.environ.get("STUDIO_ALLOW_PICKLE", "").lower() in ("1", "true", "yes"))

    def check_local_path(self, path: str) -> None:
        roots = list(self.model_roots)
        if self.hosted or roots:
            check_under_roots(path, roots + [ASSETS])

    def check_input_file(self, path: str) -> None:
        """Input images named by a request. Hosted: only uploads (the temp folder) or the model roots."""
        if not self.hosted:
            return
        import tempfile

        uploads = [os.environ.get("GRADIO_TEMP_DIR") or os.path.join(tempfile.gettempdir(), "gradio"), tempfile.gettempdir()]
        check_under_roots(path, list(self.model_roots) + uploads)

    def check(self, spec: "ModelSpec") -> None:
        if self.hosted and self.allow_pickle:
            raise UnsafeModelError("pickle checkpoints cannot be allowed on a hosted deployment")
        if spec.source == "asset":
            return
        if spec.source == "hub":
            if self.hosted and spec.location not in self.allowed_hub_ids:
                raise UnsafeModelError(f"{spec.location} is not one of the models this deployment offers")
            return
        self.check_local_path(spec.location)


def training_note(spec: ModelSpec) -> str:
    """For a shipped model, how far its recipe has trained (from its training.json), else ''."""
    import json

    path = os.path.join(spec.location, "training.json")
    if spec.source != "asset" or not os.path.exists(path):
        return ""
    with open(path) as f:
        info = json.load(f)
    evals = [h["eval"] for h in info.get("history", []) if "eval" in h]
    note = f"trained {info.get('step', 0)} steps ({info.get('elapsed', 0) / 3600:.1f} h of training)"
    if evals:
        last = evals[-1]
        at = "" if last.get("step", info.get("step")) == info.get("step") else f" at step {last['step']}"
        n = f", {int(last['n'])} prompts" if "n" in last else ""
        note += f"; prompt adherence {last.get('all_correct', 0):.0%} all-correct at CFG 5 (EMA{at}{n})"
    return note


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
