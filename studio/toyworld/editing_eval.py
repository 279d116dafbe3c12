"""Edits with known answers on held-out real ShapesWorld scenes (survey §7), scored by the evaluator.

    python -m studio eval editing [--model shapesworld] [--n 16] [--methods sdedit,p2p_swap,...] [--json]

Every task takes a held-out real scene (rendered, never generated), inverts it (default:
negative-prompt inversion, §8.3) with its caption, and asks each method for one change whose result
the renderer knows exactly:

    color     the object's colour word swapped ("red" -> "blue"); shape, size, position kept;
    shape     the shape word swapped ("circle" -> "square"); the rest kept;
    size      "small" <-> "large" with the position kept (the evaluator checks it stays put).

Success: the evaluator reads the target scene in the result (strict: every attribute, nothing
extra). Preservation: PSNR between the result and the source image outside the edited object's
ground-truth region (the union of the source and target objects' masks, dilated by 2 px). Methods
that need a mask (blended, kv_reuse) get that ground-truth region: their rows measure the edit given
an oracle mask. One row per method: success rate per task and overall, mean preservation (dB), seconds
per edit.
"""

from __future__ import annotations

import dataclasses
import random
import time
from typing import Callable, Optional, Sequence

import numpy as np

from .. import metrics
from . import evaluator, world
from .inversion_eval import HELD_OUT_SEED

TASKS = ("color", "shape", "size")


def _object_mask(scene) -> np.ndarray:
    """Where the scene's objects are (HxW bool), from the renderer: pixels that differ from the bare background."""
    bare = dataclasses.replace(scene, objects=())
    return np.abs(world.render(scene).astype(int) - world.render(bare).astype(int)).sum(-1) > 0


def _dilate(m: np.ndarray, r: int = 2) -> np.ndarray:
    out = m.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= np.roll(np.roll(m, dy, 0), dx, 1)
    return out


def make_task(rng: random.Random, task: str):
    """(source scene, target scene) for one edit of kind `task`: one object, every attribute stated."""
    while True:
        src = world.sample_scene(rng, n_objects=1)
        o = src.objects[0]
        if task == "color":
            o2 = dataclasses.replace(o, color=rng.choice([c for c in world.COLORS if c != o.color]))
        elif task == "shape":
            o2 = dataclasses.replace(o, shape=rng.choice([s for s in world.SHAPES if s != o.shape]))
        elif task == "size":
            o2 = dataclasses.replace(o, size="large" if o.size == "small" else "small")
        else:
            raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
        tgt = dataclasses.replace(src, objects=(o2,))
        if evaluator.score(world.render(tgt), tgt)["all_correct"]:  # e.g. the colour must contrast the background
            return src, tgt


def evaluate_editing(session, *, model: str = "shapesworld", methods: Sequence[str] = (), n: int = 16, seed: int = 0,
                     steps: int = 25, scale: float = 5.0, inversion: str = "negative_prompt",
                     params: Optional[dict] = None,
                     callback: Optional[Callable[[str, int, int], None]] = None) -> list[dict]:
    from ..editing import METHODS, EditSource, edit
    from ..inversion import invert

    methods = list(methods) or list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown editing method(s) {', '.join(unknown)}; available: {', '.join(METHODS)}")
    rng = random.Random(HELD_OUT_SEED + 7919 + seed)
    cases = [(task, *make_task(rng, task)) for task in TASKS for _ in range(n)]
    stats = {m: {"ok": {t: [] for t in TASKS}, "pres": [], "sec": []} for m in methods}
    with session.job():
        for k, (task, src, tgt) in enumerate(cases):
            image = world.render(src)
            region = _dilate(_object_mask(src) | _object_mask(tgt))
            with session.run_scope(model) as bundle:
                res = invert(bundle, image, world.caption(src), inversion, steps=steps, guidance_scale=scale,
                             should_stop=session.should_stop)
                source = EditSource.from_inversion(res, image=image)
                for m in methods:
                    t0 = time.perf_counter()
                    out = edit(bundle, source, m, world.caption(tgt), params=(params or {}).get(m),
                               mask=region.astype(np.float32) if METHODS[m].needs_mask else None,
                               should_stop=session.should_stop)
                    stats[m]["sec"].append(time.perf_counter() - t0)
                    stats[m]["ok"][task].append(bool(evaluator.score(out.image, tgt)["all_correct"]))
                    stats[m]["pres"].append(metrics.psnr(out.image, image, mask=~region))
            if callback is not None:
                callback(task, k + 1, len(cases))
    rows = []
    for m in methods:
        s = stats[m]
        pres = [p for p in s["pres"] if np.isfinite(p)]
        row = {"method": m, "success": round(float(np.mean([v for t in TASKS for v in s["ok"][t]])), 4)}
        row.update({f"success_{t}": round(float(np.mean(s["ok"][t])), 4) for t in TASKS})
        row.update({"preservation_db": round(float(np.mean(pres)), 2) if pres else float("inf"),
                    "seconds": round(float(np.mean(s["sec"])), 3), "n": len(cases), "inversion": inversion,
                    "oracle_mask": METHODS[m].needs_mask})
        rows.append(row)
    return rows
