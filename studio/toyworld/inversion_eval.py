"""Reconstruction of held-out real ShapesWorld scenes by each inversion method (survey §8).

    python -m studio eval inversion [--model shapesworld] [--n 64] [--seed 0] [--steps 25] [--scale 5] [--json]

The scenes are rendered (with position jitter) from a seed range the training data never uses, so
they are real images the model never generated; each is inverted with its caption as the source
prompt and reconstructed with the method's recipe at CFG `scale`. ShapesWorld's codec is exact, so
PSNR and SSIM against the input measure the inversion alone. One row per method: mean PSNR (dB),
mean SSIM, seconds per image (inversion + reconstruction) and network forwards per image.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional, Sequence

import numpy as np

from .. import metrics
from . import world

HELD_OUT_SEED = 50_000  # scene seeds from here on are never training data (training draws from its own stream)


def held_out_scenes(n: int, seed: int = 0, two_object_prob: float = 0.0) -> list:
    import random

    rng = random.Random(HELD_OUT_SEED + seed)
    return [world.sample_scene(rng, two_object_prob=two_object_prob) for _ in range(n)]


def evaluate_inversion(session, *, model: str = "shapesworld", methods: Sequence[str] = ("ddim", "null_text", "negative_prompt"),
                       n: int = 64, seed: int = 0, steps: int = 25, scale: float = 5.0, batch: int = 16,
                       callback: Optional[Callable[[str, int, int], None]] = None) -> list[dict]:
    from ..inversion import invert, reconstruct

    if n < 1:
        raise ValueError(f"n must be at least 1 (got {n})")
    scenes = held_out_scenes(n, seed)
    images = np.stack([world.render(s) for s in scenes])
    prompts = [world.caption(s) for s in scenes]
    rows = []
    with session.job():
        for method in methods:
            psnrs, ssims, seconds, nfe = [], [], 0.0, 0
            for i in range(0, n, batch):
                with session.run_scope(model) as bundle:
                    t0 = time.perf_counter()
                    res = invert(bundle, images[i:i + batch], prompts[i:i + batch], method, steps=steps,
                                 guidance_scale=scale, should_stop=session.should_stop)
                    rec = reconstruct(bundle, res, should_stop=session.should_stop)
                    seconds += time.perf_counter() - t0
                    nfe += res.nfe + rec.nfe
                for out, ref in zip(rec.images, images[i:i + batch]):
                    psnrs.append(metrics.psnr(out, ref))
                    ssims.append(metrics.ssim(out, ref))
                if callback is not None:
                    callback(method, min(i + batch, n), n)
            finite = [p for p in psnrs if np.isfinite(p)]
            rows.append({"method": method, "psnr": round(float(np.mean(finite)) if finite else float("inf"), 3),
                         "ssim": round(float(np.mean(ssims)), 4), "seconds": round(seconds / n, 4),
                         "nfe": round(nfe / math.ceil(n / batch), 1), "n": n, "steps": steps,
                         "scale": scale})
    return rows
