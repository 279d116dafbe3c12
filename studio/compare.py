"""Side-by-side comparisons: one prompt and one seed, one image per method or per swept setting,
each with its settings, wall time, network evaluations and (on ShapesWorld) measured scores."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Iterator, Optional

import numpy as np

from .requests import CompareRequest, GenerateRequest


@dataclass
class Cell:
    method: str
    params: dict
    request: GenerateRequest
    result: object  # engine.RunResult
    scores: dict | None


def shapesworld_scores(bundle, prompt: str, image: np.ndarray) -> dict | None:
    """Evaluator scores of an image for a ShapesWorld prompt (None for other models or free text)."""
    if not bundle.family.startswith("shapesworld"):
        return None
    from .toyworld import evaluator, world

    scene = world.parse_caption(prompt)
    if scene is None:
        return None
    s = evaluator.score(image, scene)
    s["saturation"] = evaluator.saturation(image)
    return s


def run_compare(session, req: CompareRequest, *, on_cell: Optional[Callable[[Cell, int, int], None]] = None) -> Iterator[Cell]:
    """Run every cell of a comparison in order, yielding each as it finishes."""
    req.validate()
    cells = req.cells()
    with session.job():
        yield from _run_cells(session, req, cells, on_cell)


def _run_cells(session, req, cells, on_cell):
    from .engine import Interrupted

    for k, (method, params) in enumerate(cells):
        if session.should_stop():
            raise Interrupted(f"stopped after {k} of {len(cells)} images")
        scale = params.pop("guidance_scale", req.base.guidance_scale)
        sub = replace(req.base, guidance=method.name, guidance_scale=float(scale), guidance_params=params, num_images=1)
        res = session.generate(sub)
        bundle = session.get(sub.model)
        cell = Cell(method.name, {"guidance_scale": scale, **params}, sub, res,
                    shapesworld_scores(bundle, sub.prompt, res.images[0]))
        if on_cell is not None:
            on_cell(cell, k, len(cells))
        yield cell


def describe(cell: Cell) -> str:
    """The caption under a picture: method, its parameters, seed, time, NFE, scores."""
    p = ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}" for k, v in cell.params.items())
    r, res = cell.request, cell.result
    text = f"{cell.method} ({p}) · seed {r.seed} · {res.metadata['sampler']} {r.steps} · {res.seconds:.2f} s · {res.nfe} NFE"
    if "psnr" in res.metadata:
        text += f" · PSNR {res.metadata['psnr']:.1f} dB (measurement {res.metadata['measurement_psnr']:.1f} dB)"
    if cell.scores is not None:
        s = cell.scores
        marks = " ".join(f"{k}{'✓' if s[k] else '✗'}" for k in ("color", "shape", "size", "position", "background"))
        text += f" · {'ALL CORRECT' if s['all_correct'] else 'wrong'} [{marks}] · sat {s['saturation']:.2f}"
    return text
