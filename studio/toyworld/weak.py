"""AutoGuidance's weak UNet (survey §5.2.5) beside a ShapesWorld model: where it lives and whether it fits.

AutoGuidance needs the weak model to take the same conditioning as the main one (L843). The recipe's
`weak` stage trains it against the shipped text encoder and records that encoder file's SHA-256 in
`unet_weak/weak.json`; the family loader refuses a weak UNet whose recorded encoder is not the model's.
"""

from __future__ import annotations

import hashlib
import json
import os

WEAK_DIR = "unet_weak"
WEAK_META = "weak.json"


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weak_unet_mismatch(model_dir: str) -> str | None:
    """Why the weak UNet in `model_dir` cannot guide this model's UNet (None when it can): AutoGuidance
    needs the weak model to take the same conditioning (survey §5.2.5, L843), so weak.json must name
    the SHA-256 of this model's text encoder file."""
    meta = os.path.join(model_dir, WEAK_DIR, WEAK_META)
    if not os.path.exists(meta):
        return f"{WEAK_DIR}/ has no {WEAK_META} naming the text encoder it was trained against"
    with open(meta) as f:
        want = json.load(f).get("text_encoder_sha256")
    te = os.path.join(model_dir, "text_encoder", "model.safetensors")
    if not os.path.exists(te) or want != file_sha256(te):
        return f"{WEAK_DIR}/ was trained against another text encoder than this model's"
    return None
