"""`eval inversion` / `eval editing`: their JSON rows, their tasks' ground truth, and clear errors."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from studio.toyworld import evaluator, world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    p = subprocess.run([sys.executable, "-m", "studio", *args], cwd=ROOT, capture_output=True, text=True, env=env,
                       timeout=600)
    return p.returncode, p.stdout, p.stderr


def test_eval_inversion_json_rows():
    code, out, err = run_cli("eval", "inversion", "--n", "2", "--steps", "3", "--methods", "ddim,negative_prompt",
                             "--json")
    assert code == 0, err
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["method"] for r in rows] == ["ddim", "negative_prompt"]
    for r in rows:
        assert {"method", "psnr", "ssim", "seconds"} <= set(r)
        assert 5.0 < r["psnr"] < 80.0 and 0.0 < r["ssim"] <= 1.0 and r["seconds"] > 0
        assert r["nfe"] == pytest.approx(3 + 3 * 2)  # 3 inversion forwards + 3 CFG steps of 2 branches


def test_eval_inversion_bad_method_is_one_line():
    code, out, err = run_cli("eval", "inversion", "--methods", "ddim,nope")
    assert code == 2 and err.strip().startswith("error:") and "nope" in err and len(err.strip().splitlines()) == 1


def test_held_out_scenes_are_real_images_with_their_captions():
    from studio.toyworld.inversion_eval import held_out_scenes

    scenes = held_out_scenes(16, seed=0)
    assert held_out_scenes(16, seed=0) == scenes and held_out_scenes(16, seed=1) != scenes
    for s in scenes:  # the evaluator reads each rendering as its caption: the reference the PSNR compares to is right
        assert evaluator.score(world.render(s), world.parse_caption(world.caption(s)))["all_correct"]


@pytest.mark.parametrize("task", ["color", "shape", "size"])
def test_edit_tasks_change_exactly_one_attribute(task):
    from studio.toyworld.editing_eval import _object_mask, make_task

    rng = random.Random(3)
    for _ in range(5):
        src, tgt = make_task(rng, task)
        a, b = src.objects[0], tgt.objects[0]
        changed = [k for k in ("color", "shape", "size", "position", "texture") if getattr(a, k) != getattr(b, k)]
        assert changed == [task]
        assert (a.dx, a.dy, src.background) == (b.dx, b.dy, tgt.background)
        # the target is what the evaluator must read; the source is not it
        assert evaluator.score(world.render(tgt), tgt)["all_correct"]
        assert not evaluator.score(world.render(src), tgt)["all_correct"]
        m = _object_mask(src)
        assert 20 < m.sum() < 64 * 64 // 4
        assert (world.render(src)[~m] == world.render(dataclass_bare(src))[~m]).all()


def dataclass_bare(scene):
    import dataclasses

    return dataclasses.replace(scene, objects=())


def test_eval_editing_json_rows_and_preservation_reference():
    """Rows for two methods; blended editing with the oracle mask keeps the latent cells outside it exactly
    (x*_0, exact codec): only the 4x4-pixel cells the mask's edge cuts change outside it, so its preservation
    is far above SDEdit's, which redraws the whole image."""
    code, out, err = run_cli("eval", "editing", "--n", "1", "--steps", "3", "--methods", "sdedit,blended", "--json")
    assert code == 0, err
    rows = {r["method"]: r for r in (json.loads(line) for line in out.strip().splitlines())}
    assert set(rows) == {"sdedit", "blended"}
    for r in rows.values():
        assert {"method", "success", "success_color", "success_shape", "success_size", "preservation_db",
                "seconds"} <= set(r)
        assert 0.0 <= r["success"] <= 1.0 and r["seconds"] > 0 and r["n"] == 3
    assert rows["blended"]["oracle_mask"] and not rows["sdedit"]["oracle_mask"]
    assert rows["blended"]["preservation_db"] > 30
    assert rows["blended"]["preservation_db"] > rows["sdedit"]["preservation_db"] + 5


def test_eval_editing_unknown_method_is_one_line():
    code, out, err = run_cli("eval", "editing", "--methods", "sdedit,nope", "--n", "1")
    assert code == 2 and "nope" in err and len(err.strip().splitlines()) == 1
