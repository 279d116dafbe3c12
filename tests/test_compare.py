"""Side-by-side comparisons through the session and the Guidance tab's API."""

from __future__ import annotations

import numpy as np
import pytest

from studio.compare import describe, run_compare
from studio.engine import Interrupted
from studio.requests import CompareRequest, GenerateRequest, MethodSpec
from studio.session import SessionManager


def base(**kw):
    return GenerateRequest("a large red circle on the left on a gray background", model="shapesworld", steps=3, seed=5, **kw)


def test_same_seed_cells_match_single_runs():
    s = SessionManager(device="cpu")
    req = CompareRequest(base(), [MethodSpec("cfg"), MethodSpec("cfg_pp", {"guidance_scale": 0.6})],
                         sweep_param=None)
    cells = list(run_compare(s, req))
    assert [c.method for c in cells] == ["cfg", "cfg_pp"]
    single = s.generate(GenerateRequest(**{**base().__dict__, "guidance": "cfg_pp", "guidance_scale": 0.6}))
    assert np.array_equal(cells[1].result.images[0], single.images[0])
    assert cells[0].scores is not None and set(cells[0].scores) >= {"all_correct", "color", "saturation"}
    text = describe(cells[0])
    assert "cfg" in text and "seed 5" in text and "NFE" in text and "[color" in text


def test_sweep_layout_and_limits():
    req = CompareRequest(base(), [MethodSpec("cfg"), MethodSpec("apg")], sweep_param="guidance_scale", sweep_values=[1, 3])
    cells = req.cells()
    assert [(m.name, p["guidance_scale"]) for m, p in cells] == [("cfg", 1), ("cfg", 3), ("apg", 1), ("apg", 3)]
    with pytest.raises(ValueError, match="at least one guidance method"):
        CompareRequest(base(), []).validate()
    with pytest.raises(ValueError, match="at most"):
        CompareRequest(base(), [MethodSpec("cfg")] * 10, sweep_param="guidance_scale", sweep_values=list(range(10))).validate()


def test_stop_ends_the_whole_comparison():
    s = SessionManager(device="cpu")
    req = CompareRequest(base(), [MethodSpec("cfg"), MethodSpec("apg"), MethodSpec("tcfg")])
    got = []
    with pytest.raises(Interrupted):
        for cell in run_compare(s, req):
            got.append(cell.method)
            s.stop()
    assert got == ["cfg"]
    # the next job starts clean
    assert len(list(run_compare(s, CompareRequest(base(), [MethodSpec("cfg")])))) == 1


def test_out_of_range_scale_is_a_clear_error():
    s = SessionManager(device="cpu")
    with pytest.raises(ValueError, match="guidance_scale"):
        list(run_compare(s, CompareRequest(base(), [MethodSpec("cfg_pp", {"guidance_scale": 5.0})])))
