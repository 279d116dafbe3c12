"""Inversion and Editing tabs through the app's API: invert a real image, hand it over, edit it, view attention."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.test_app import app_url, free_port  # noqa: F401  (the module-scoped app fixture)

PROMPT = "a large red circle on the left on a gray background"


def _path(x):
    return x if isinstance(x, str) else (x.get("path") or x.get("name")) if isinstance(x, dict) else x.path


def _gallery(g):
    return [(np.asarray(Image.open(_path(item["image"] if isinstance(item, dict) else item[0]))),
             item.get("caption") if isinstance(item, dict) else item[1]) for item in g]


def _rows(table):
    return table["data"] if isinstance(table, dict) else table


def test_invert_then_edit_through_the_api(app_url, tmp_path):
    from gradio_client import Client, handle_file

    from studio.toyworld import world

    client = Client(app_url, verbose=False)
    names = client.view_api(return_format="dict")["named_endpoints"]
    for ep in ("/invert", "/invert_stop", "/invert_to_edit", "/edit", "/edit_stop", "/attention_map",
               "/edit_source_generate"):
        assert ep in names, ep
    # a "real" image of an odd size and mode: RGBA, 96x80, the scene in the middle
    scene = world.parse_caption(PROMPT)
    rgba = np.full((80, 96, 4), 255, np.uint8)
    rgba[8:72, 16:80, :3] = world.render(scene)
    path = str(tmp_path / "real.png")
    Image.fromarray(rgba, "RGBA").save(path)

    gallery, table, pick = client.predict("shapesworld", handle_file(path), "crop", PROMPT,
                                          ["ddim", "negative_prompt"], 6, 5.0, 3, True, api_name="/invert")
    items = _gallery(gallery)
    assert len(items) == 3
    assert items[0][0].shape == (64, 64, 3) and "centre-cropped to 80x80" in items[0][1]
    assert "RGBA 96x80" in items[0][1]
    rows = _rows(table)
    assert [r[0] for r in rows] == ["ddim", "negative_prompt"]
    from studio import metrics
    for (img, cap), row in zip(items[1:], rows):  # the PSNR shown is the PSNR of the picture shown
        assert row[1] == pytest.approx(metrics.psnr(img, items[0][0]), abs=0.01)
        assert "PSNR" in cap and "NFE" in cap and row[5] > 0

    out = client.predict("negative_prompt", api_name="/invert_to_edit")
    note = out[-1] if isinstance(out, (list, tuple)) else out
    assert "negative-prompt inversion" in note

    gallery, table = client.predict("a large blue circle on the left on a gray background", ["sdedit", "p2p_swap"],
                                    "", None, api_name="/edit")
    items = _gallery(gallery)
    assert items[0][1].startswith("source replay")
    assert [r[0] for r in _rows(table)] == ["sdedit", "p2p_swap"]
    for img, cap in items[1:]:
        assert img.shape == (64, 64, 3) and "NFE" in cap and "preservation" in cap
    # the edit changed the picture, and the replay is the inversion's reconstruction of the input
    assert np.abs(items[2][0].astype(int) - items[0][0].astype(int)).mean() > 0.5

    amap = client.predict("circle", 0.0, 1.0, "", api_name="/attention_map")
    assert np.asarray(Image.open(_path(amap))).shape[0] >= 256


def test_editing_bad_input_is_clear(app_url):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    with pytest.raises(Exception, match="No source yet"):
        client.predict("a blue circle", ["sdedit"], "", None, api_name="/edit")
    with pytest.raises(Exception, match="at least one editing method"):
        client.predict("a blue circle", [], "", None, api_name="/edit")
    with pytest.raises(Exception, match="source prompt"):
        client.predict("shapesworld", None, "crop", "  ", ["ddim"], 4, 5.0, 3, True, api_name="/invert")
    with pytest.raises(Exception, match="flow"):
        client.predict("shapesworld", None, "crop", PROMPT, ["flow"], 4, 5.0, 3, True, api_name="/invert")
    # the session is still usable: a generated source, then an edit that needs a mask without one
    client.predict("shapesworld", PROMPT, 0, 6, 5.0, api_name="/edit_source_generate")
    with pytest.raises(Exception, match="mask"):
        client.predict("a large blue circle on the left on a gray background", ["blended"], "", None, api_name="/edit")
    gallery, table = client.predict("a large blue circle on the left on a gray background", ["p2p_swap"], "", None,
                                    api_name="/edit")
    assert len(_rows(table)) == 1
