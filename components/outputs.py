"""Per-image captions and PNG files with their parameters, shared by every tab."""

from __future__ import annotations

import os
import tempfile
import uuid

from studio.pngmeta import save_png


def caption_for(result, label: str = "") -> str:
    r = result.request
    m = result.metadata
    head = f"{label} · " if label else ""
    return (f"{head}seed {r.seed} · {m['sampler']} {r.steps} steps · {r.guidance} {r.guidance_scale:g} · "
            f"{m['width']}x{m['height']} · {result.seconds:.2f} s · {result.nfe} NFE")


def write_pngs(result, folder: str | None = None) -> list[str]:
    """Save each image of a run as a PNG carrying its request; returns the paths."""
    folder = folder or tempfile.mkdtemp(prefix="studio-")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for img in result.images:
        p = os.path.join(folder, f"{uuid.uuid4().hex[:10]}.png")
        save_png(p, img, result.request.to_json(), result.metadata)
        paths.append(p)
    return paths
