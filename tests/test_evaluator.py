"""Tests for the ShapesWorld evaluator: accuracy on held-out renders (clean and mildly
corrupted) and strictness on images that must not pass."""

from __future__ import annotations

import itertools
import math
import random

import cv2
import numpy as np
import pytest
from PIL import Image

from studio.toyworld import evaluator as E
from studio.toyworld import world as W

HELD_OUT_SEED = 970_531  # not a training seed
N_HELD_OUT = 600
MIN_ACCURACY = 0.98


# ----------------------------------------------------------------------------- helpers

def obj(shape="circle", color="red", size="large", position="center", **kw) -> W.ObjectSpec:
    return W.ObjectSpec(shape=shape, color=color, size=size, position=position, **kw)


def scene(*objects: W.ObjectSpec, background="gray", **kw) -> W.Scene:
    return W.Scene(objects=tuple(objects), background=background, **kw)


def flat(color) -> np.ndarray:
    img = np.empty((W.IMAGE_SIZE, W.IMAGE_SIZE, 3), np.uint8)
    img[:] = color
    return img


def paint(img: np.ndarray, coverage: np.ndarray, color) -> np.ndarray:
    """Composite a colour over `img` with the given coverage (64x64 floats in [0, 1])."""
    cov = coverage.astype(np.float32)[..., None]
    out = img.astype(np.float32) * (1 - cov) + np.array(color, np.float32) * cov
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def supersampled(draw) -> np.ndarray:
    """Anti-aliased coverage of a shape drawn by `draw(mask)` on a 4x supersampled canvas
    (coordinates are pixel coordinates times 4)."""
    s = W.SUPERSAMPLE
    m = np.zeros((W.IMAGE_SIZE * s, W.IMAGE_SIZE * s), np.uint8)
    draw(m)
    return m.reshape(W.IMAGE_SIZE, s, W.IMAGE_SIZE, s).mean(axis=(1, 3)) / 255.0


def assert_wrong(img, sc: W.Scene) -> dict:
    s = E.score(img, sc)
    assert not s["all_correct"], (s, E.read_image(img))
    return s


# ----------------------------------------------------------------------------- accuracy on held-out renders

@pytest.fixture(scope="module")
def held_out():
    scenes = W.sample_scenes(N_HELD_OUT, HELD_OUT_SEED, two_object_prob=0.5, drop_prob=0.0)
    counts = {len(s.objects) for s in scenes}
    assert counts == {1, 2}
    return scenes, [W.render(s) for s in scenes]


@pytest.mark.parametrize("kind", E.CORRUPTIONS)
def test_all_correct_accuracy_on_held_out_scenes(held_out, kind):
    scenes, images = held_out
    ok = [E.score(E.corrupt(img, kind, seed=i), sc)["all_correct"] for i, (img, sc) in enumerate(zip(images, scenes))]
    acc = float(np.mean(ok))
    print(f"\nall_correct accuracy ({kind}, n={len(ok)}): {acc:.4f}")
    assert acc >= MIN_ACCURACY


def test_corruptions_are_mild_but_real(held_out):
    _, images = held_out
    img = images[0]
    for kind in ("blur", "noise", "jpeg"):
        out = E.corrupt(img, kind, seed=1)
        assert out.shape == img.shape and out.dtype == np.uint8
        diff = np.abs(out.astype(int) - img.astype(int))
        assert 0 < diff.mean() < 8, kind
    assert np.array_equal(E.corrupt(img, "clean"), img)


def test_reading_of_a_clean_render_is_exact():
    sc = scene(obj("triangle", "purple", "small", "top", dx=1.5, dy=-1.2),
               obj("star", "yellow", "large", "bottom", dx=-1.8, dy=0.7), background="black")
    r = E.read_image(W.render(sc))
    assert r.background == "black" and r.problems == []
    got = sorted((o.shape, o.color, o.size, o.position, o.texture) for o in r.objects)
    assert got == [("star", "yellow", "large", "bottom", "plain"), ("triangle", "purple", "small", "top", "plain")]
    for o in r.objects:
        want = next(s for s in sc.objects if s.position == o.position)
        assert math.dist(o.center, want.center) < 0.5
        assert o.iou > 0.9


def test_held_out_shape_and_texture_are_read():
    heart = scene(obj("heart", "pink", "large", "left"), background="white")
    assert E.score(W.render(heart), heart)["all_correct"]
    for bg in W.BACKGROUNDS:
        striped = scene(obj("square", "blue", "large", "center", texture="striped"), background=bg)
        img = W.render(striped)
        assert E.score(img, striped)["all_correct"], (bg, E.read_image(img))
        # the same object asked for without stripes is wrong
        plain = scene(obj("square", "blue", "large", "center"), background=bg)
        s = E.score(img, plain)
        assert not s["texture"] and not s["all_correct"] and s["shape"] and s["color"]


def test_pil_and_float_inputs():
    sc = scene(obj("cross", "green", "large", "right"), background="beige")
    img = W.render(sc)
    assert E.score(Image.fromarray(img), sc)["all_correct"]
    assert E.score(img.astype(np.float32) / 255.0, sc)["all_correct"]


# ----------------------------------------------------------------------------- strictness

@pytest.mark.parametrize("seed", range(5))
def test_uniform_noise_is_wrong(seed):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    r = E.read_image(img)
    assert r.background is None and r.problems
    s = assert_wrong(img, scene(obj(), background="gray"))
    assert not any(s.values())


def test_blank_images_are_wrong():
    sc = scene(obj("square", "red", "large", "center"), background="white")
    blank = flat(W.BACKGROUNDS["white"])
    r = E.read_image(blank)
    assert r.background == "white" and r.objects == []
    s = assert_wrong(blank, sc)
    assert not s["count"] and not s["color"] and not s["shape"]

    off_palette = flat((90, 160, 200))
    r = E.read_image(off_palette)
    assert r.background is None and r.objects == [] and r.problems
    assert_wrong(off_palette, sc)


BASE = scene(obj("circle", "red", "large", "left", dx=1.0, dy=-0.5),
             obj("square", "blue", "small", "right", dx=-1.5, dy=1.0), background="gray")


def test_correct_render_passes_every_key():
    s = E.score(W.render(BASE), BASE)
    assert all(s.values()), s


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(color="green"), "color"),
        (dict(color="orange"), "color"),
        (dict(shape="diamond"), "shape"),
        (dict(shape="heart"), "shape"),
        (dict(size="small"), "size"),
        (dict(texture="striped"), "texture"),
    ],
)
def test_one_wrong_attribute_flips_only_its_key(change, key):
    img = W.render(W.with_attribute(BASE, 0, **change))
    s = assert_wrong(img, BASE)
    assert not s[key]
    for k in ("color", "shape", "size", "position", "background", "texture", "count"):
        if k != key:
            assert s[k], (k, s)


def test_wrong_position_and_background():
    one = scene(obj("star", "cyan", "large", "left"), background="black")
    s = assert_wrong(W.render(W.with_attribute(one, 0, position="top")), one)
    assert not s["position"] and s["shape"] and s["color"] and s["size"] and s["count"]
    s = assert_wrong(W.render(W.Scene(one.objects, "beige")), one)
    assert not s["background"] and s["shape"] and s["color"] and s["position"]
    # swapped objects: matched by position, so both colours and shapes are wrong
    swapped = W.Scene((W.with_attribute(BASE, 0, position="right").objects[0],
                       W.with_attribute(BASE, 1, position="left").objects[1]), "gray")
    s = assert_wrong(W.render(swapped), BASE)
    assert not s["color"] and not s["shape"]


def test_extra_and_missing_objects_are_wrong():
    one = W.Scene(BASE.objects[:1], BASE.background)
    s = assert_wrong(W.render(BASE), one)  # an extra object
    assert not s["count"] and not any(s.values())
    s = assert_wrong(W.render(one), BASE)  # a missing object
    assert not s["count"] and not any(s.values())
    # an extra small object of a colour the prompt does not have
    extra = paint(W.render(one), W.object_coverage(obj("triangle", "yellow", "small", "right")), W.COLORS["yellow"])
    assert not E.score(extra, one)["count"]


def test_off_anchor_position_is_wrong():
    ok = scene(obj("square", "green", "small", "left", dx=2.0, dy=-2.0))
    assert E.score(W.render(ok), ok)["all_correct"]  # full jitter is fine
    far = scene(obj("square", "green", "small", "left", dx=8.0, dy=0.0))  # halfway to the centre
    r = E.read_image(W.render(far))
    assert r.objects[0].position is None and r.problems
    assert_wrong(W.render(far), scene(obj("square", "green", "small", "left")))


def test_unstated_attributes_are_not_checked_but_shape_and_colour_are():
    prompt = scene(obj("diamond", "pink", "large", "top"), background="white",
                   mention_size=(False,), mention_position=(False,), mention_background=False)
    img = W.render(scene(obj("diamond", "pink", "small", "bottom"), background="black"))
    assert E.score(img, prompt)["all_correct"]
    assert not E.score(img, scene(obj("diamond", "pink", "large", "top"), background="white"))["all_correct"]
    s = E.score(W.render(scene(obj("circle", "pink", "small", "bottom"))), prompt)
    assert not s["shape"] and not s["all_correct"]
    s = E.score(W.render(scene(obj("diamond", "red", "small", "bottom"))), prompt)
    assert not s["color"] and not s["all_correct"]


def _farthest_background(color) -> str:
    return max(W.BACKGROUNDS, key=lambda b: math.dist(W.BACKGROUNDS[b], color))


@pytest.mark.parametrize("pair", list(itertools.combinations(W.COLORS, 2)))
def test_colour_halfway_between_two_palette_colours_is_ambiguous(pair):
    a, b = pair
    mid = tuple((x + y) / 2 for x, y in zip(W.COLORS[a], W.COLORS[b]))
    bg = _farthest_background(mid)
    o = obj("square", a, "large", "center")
    img = paint(flat(W.BACKGROUNDS[bg]), W.object_coverage(o), mid)
    r = E.read_image(img)
    assert len(r.objects) == 1
    # never read as either of the two colours it blends ...
    assert r.objects[0].color not in (a, b), r
    for c in (a, b):
        s = assert_wrong(img, scene(W.ObjectSpec("square", c, "large", "center"), background=bg))
        assert not s["color"] and s["shape"]
    # ... and ambiguous unless it lands on a third palette colour (red + yellow = orange)
    nearest = sorted(W.COLORS, key=lambda c: math.dist(W.COLORS[c], mid))
    if set(nearest[:2]) == {a, b}:
        assert r.objects[0].color is None and r.problems, r


def test_slightly_off_palette_colour_still_reads():
    # a quarter of the way from orange to yellow is still orange
    c = tuple(0.75 * x + 0.25 * y for x, y in zip(W.COLORS["orange"], W.COLORS["yellow"]))
    o = obj("circle", "orange", "large", "center")
    img = paint(flat(W.BACKGROUNDS["black"]), W.object_coverage(o), c)
    assert E.score(img, scene(o, background="black"))["all_correct"]


def _all_candidate_scenes(color, bg, position="center"):
    return [scene(W.ObjectSpec(sh, color, sz, position), background=bg)
            for sh in E.ALL_SHAPES for sz in W.SIZES]


@pytest.mark.parametrize("aspect, angle", [(1.5, 0.0), (1.7, 30.0), (2.0, 90.0), (1.4, 60.0)])
def test_ellipse_is_malformed(aspect, angle):
    s, (cx, cy) = W.SUPERSAMPLE, W.POSITIONS["center"]
    d = 26 * 0.92 * s
    cov = supersampled(lambda m: cv2.ellipse(m, ((cx * s, cy * s), (d, d / aspect), angle), 255, -1))
    img = paint(flat(W.BACKGROUNDS["gray"]), cov, W.COLORS["blue"])
    r = E.read_image(img)
    assert len(r.objects) == 1 and r.objects[0].shape is None and r.problems, r
    for sc in _all_candidate_scenes("blue", "gray"):
        assert not E.score(img, sc, reading=r)["all_correct"]


@pytest.mark.parametrize("seed", range(8))
def test_random_polygon_is_malformed(seed):
    rng = random.Random(seed)
    s, (cx, cy) = W.SUPERSAMPLE, W.POSITIONS["center"]
    pts = []
    for k in range(7):
        ang = 2 * math.pi * k / 7 + rng.uniform(-0.3, 0.3)
        rad = 13 * s * (1.0 if k % 2 == 0 else 0.35) * rng.uniform(0.8, 1.0)
        pts.append((cx * s + rad * math.cos(ang), cy * s + rad * math.sin(ang)))
    cov = supersampled(lambda m: cv2.fillPoly(m, [np.array(pts, np.int32)], 255))
    img = paint(flat(W.BACKGROUNDS["white"]), cov, W.COLORS["green"])
    r = E.read_image(img)
    assert r.problems and all(o.shape is None for o in r.objects), r
    for sc in _all_candidate_scenes("green", "white"):
        assert not E.score(img, sc, reading=r)["all_correct"]


def test_touching_objects_are_malformed():
    # two objects drawn over each other form one component that matches no template
    a, b = obj("square", "red", "large", "center"), obj("circle", "red", "large", "center", dx=7.0)
    img = paint(paint(flat(W.BACKGROUNDS["black"]), W.object_coverage(a), W.COLORS["red"]),
                W.object_coverage(b), W.COLORS["red"])
    r = E.read_image(img)
    assert len(r.objects) == 1 and r.objects[0].shape is None and r.problems
    assert_wrong(img, scene(a, background="black"))


@pytest.mark.parametrize("a, b, bg", [("red", "orange", "white"), ("orange", "yellow", "black"),
                                      ("blue", "purple", "gray"), ("purple", "pink", "beige"),
                                      ("green", "cyan", "white"), ("red", "blue", "gray")])
@pytest.mark.parametrize("cut", [32, 36])  # half / about a third of the square in the second colour
def test_two_tone_object_is_wrong(a, b, bg, cut):
    sq = W.object_coverage(obj("square", a, "large", "center"))
    part = sq.copy()
    part[:, cut:] = 0
    img = paint(paint(flat(W.BACKGROUNDS[bg]), part, W.COLORS[a]), sq - part, W.COLORS[b])
    r = E.read_image(img)
    assert r.problems and r.objects[0].color is None, r
    for c in (a, b):
        s = assert_wrong(img, scene(obj("square", c, "large", "center"), background=bg))
        assert not s["color"]


def test_clutter_and_faint_ghosts_are_wrong():
    sc = scene(obj("diamond", "cyan", "large", "top"), background="black")
    img = W.render(sc)
    rng = np.random.default_rng(0)
    specks = img.copy()
    for _ in range(20):  # 20 isolated 2x2 specks of colour
        y, x = rng.integers(36, 60), rng.integers(4, 60)
        specks[y: y + 2, x: x + 2] = W.COLORS["yellow"]
    assert_wrong(specks, sc)
    # a second, half-transparent object
    ghost = paint(img, 0.5 * W.object_coverage(obj("circle", "red", "large", "bottom")), W.COLORS["red"])
    assert_wrong(ghost, sc)


# ----------------------------------------------------------------------------- saturation and batch API

def test_saturation():
    assert E.saturation(flat((128, 128, 128))) == pytest.approx(0.0, abs=1e-6)
    assert E.saturation(flat((0, 0, 0))) == pytest.approx(0.0, abs=1e-6)
    img = W.render(scene(obj("square", "red", "large", "center"), background="white"))
    s = E.saturation(img)
    assert 0.05 < s <= 1.0
    full = E.saturation(flat(W.COLORS["blue"]))
    assert full > 0.7
    washed = (0.5 * flat(W.COLORS["blue"]) + 0.5 * 128).astype(np.uint8)
    assert E.saturation(washed) < full


def test_evaluate_batch():
    scenes = W.sample_scenes(40, HELD_OUT_SEED + 1, drop_prob=0.0)
    images = [W.render(s) for s in scenes]
    out = E.evaluate(images, scenes)
    for k in ("color", "shape", "size", "position", "background", "all_correct"):
        assert out[k] == 1.0, (k, out)
    assert out["n"] == 40 and 0.0 < out["saturation"] < 1.0
    shuffled = E.evaluate(images, scenes[1:] + scenes[:1])
    assert shuffled["all_correct"] < 0.2
    with pytest.raises(ValueError):
        E.evaluate(images, scenes[:-1])


def test_accuracy_report_shape():
    rep = E.accuracy_report(n=20, seed=5)
    assert set(rep) == {"clean", "blur", "noise", "jpeg", "n"} and rep["n"] == 20
    assert all(0.0 <= rep[k] <= 1.0 for k in ("clean", "blur", "noise", "jpeg"))
