"""Strict attribute reader and scorer for ShapesWorld images.

`read_image` reads back, from a 64x64 RGB image, the background and every object
(shape, colour, size, position, texture) that the ShapesWorld renderer could have
drawn; `score` compares such a reading with a `Scene` (the prompt's ground truth),
and `evaluate` averages the scores over a batch.

The reader is deliberately strict, so that a score of "correct" means the image
really shows the prompted scene and nothing else:

* Background: the border pixels must be one uniform colour (90 % of them within
  `BORDER_AGREE_DIST` of their median) and that colour must lie within
  `BG_MATCH_DIST` of exactly one palette background, else the background reads as
  unknown and the image fails.
* Objects: pixels farther than `FG_DIST` from the background colour are foreground;
  each 8-connected foreground component of at least `MIN_OBJECT_AREA` pixels is an
  object (smaller specks are ignored, unless together they exceed `MAX_SPECK_AREA`).
  Every such component must be explained by exactly one palette object: its interior
  colour must be uniform and within `COLOR_MATCH_DIST` of a palette colour (a colour
  halfway between two palette colours is ambiguous), and its mask must match a
  rendered template of some shape x size x texture with IoU >= `IOU_MIN`, beating the
  best template of any other shape by `SHAPE_MARGIN` (an ellipse, a random polygon or
  two merged objects are malformed).  Its centre must lie within `POSITION_TOL`
  pixels of a position anchor.  A component that fails any test is still counted as
  an object (with the unreadable attributes set to None), so it makes the count wrong
  when it is extra and the attribute wrong when it replaces a prompted object.
* Any problem found makes `all_correct` False.

On clean renders the reader is right on >= 99 % of scenes and stays >= 98 % under
mild blur (sigma 0.6), Gaussian noise (std 6) and JPEG (quality 75); see
`accuracy_report`.  Colour / template thresholds are set from the palette: the
closest two palette colours (orange, yellow) are 81 apart, so `COLOR_MATCH_DIST`
(28) leaves their midpoint ambiguous.
"""

from __future__ import annotations

import io
import itertools
import math
import random
from dataclasses import dataclass, field
from functools import lru_cache

import cv2
import numpy as np
from PIL import Image

from . import world

# ----------------------------------------------------------------------------- thresholds

BORDER_AGREE_DIST = 30.0  # a border pixel agrees with the border median within this RGB distance
BORDER_AGREE_FRAC = 0.90  # fraction of border pixels that must agree
BG_MATCH_DIST = 30.0  # measured background vs palette background (palette backgrounds are >= 104 apart)
FG_DIST = 35.0  # foreground = farther than this from the background (object/background pairs are >= 90 apart)
MIN_OBJECT_AREA = 16  # components smaller than this are specks (the smallest object covers ~60 px)
MAX_SPECK_AREA = 48  # more speck pixels than this in total is clutter
COLOR_MATCH_DIST = 45.0  # interior colour vs nearest palette colour (closest palette pair: 81 apart) ...
COLOR_RATIO = 0.6  # ... and at most this fraction of the distance to the second nearest palette colour
UNIFORM_DIST = 40.0  # interior pixels within this of the background-to-colour blend count as uniform ...
UNIFORM_FRAC = 0.85  # ... and this fraction of the interior must be uniform
UNIFORM_CHROMA = 0.5  # chroma scale (YCbCr) for the uniformity test
IOU_MIN = 0.80  # best template (soft) IoU needed ...
# ... except for the small star, whose ~3 px arms are below JPEG's chroma resolution.
IOU_MIN_TEMPLATE = {("star", "small"): 0.74}
SHAPE_MARGIN = 0.05  # best IoU must beat the best template of any other shape by this much
POSITION_TOL = 6.0  # object centre within this many pixels of a position anchor (anchors are 16 px apart)
LIGHT = (250.0, 250.0, 250.0)  # light stripe colour of the 'striped' texture
LIGHT_DIST = 45.0  # a pixel this close to LIGHT is a light stripe pixel (when LIGHT differs from the background)
LIGHT_MIN_FRAC = 0.08  # an object is unmixed with LIGHT only when this fraction of its interior is light

ALL_SHAPES = world.SHAPES + world.HELD_OUT_SHAPES
ALL_TEXTURES = world.TEXTURES + world.HELD_OUT_TEXTURES
_HYPS = [(s, z) for s in ALL_SHAPES for z in world.SIZES]  # template order: shape-major
_WIN = 40  # template window (pixels), centred on the object's centroid
_HALF = _WIN // 2
_QUANT = 4  # centroids are quantised to 1/_QUANT pixel for the template cache
_PAD = _HALF + 2
_KERNEL = np.ones((3, 3), np.uint8)
COVERAGE_FLOOR = 0.15  # coverage below this reads as empty (JPEG bleeding/ringing), above 1 - this as full
_CHROMA_WEIGHTS = (float(__import__('os').environ.get('CM', 0.1)), 1.0)  # chroma scales of the two unmixings
# RGB -> YCbCr (BT.601), for unmixing.
_YCC = np.array([[0.299, 0.587, 0.114],
                 [-0.168736, -0.331264, 0.5],
                 [0.5, -0.418688, -0.081312]])


# ----------------------------------------------------------------------------- results

@dataclass
class DetectedObject:
    shape: str | None  # None when the component matches no shape (malformed / ambiguous)
    color: str | None  # None when the colour is ambiguous or not a palette colour
    size: str | None
    position: str | None  # None when the centre is off the position anchors
    texture: str | None
    centroid: tuple[float, float]  # (x, y) centroid of the object's mask, pixels
    area: int  # foreground pixels of the component
    iou: float  # IoU of the best template
    center: tuple[float, float] | None = None  # (x, y) centre implied by the best template


@dataclass
class Reading:
    background: str | None  # None when the background is not (uniformly) a palette background
    objects: list[DetectedObject] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


# ----------------------------------------------------------------------------- templates

def _centroid_offsets() -> dict[str, tuple[float, float]]:
    """Centroid of each shape's mask, in unit coordinates (extent radius 1)."""
    g = (np.arange(512) + 0.5) / 256.0 - 1.0
    u, v = np.meshgrid(g, g)
    out = {}
    for s in ALL_SHAPES:
        m = world.shape_mask(s, u, v)
        out[s] = (float(u[m].mean()), float(v[m].mean()))
    return out


_CENTROID_OFFSET = _centroid_offsets()


@lru_cache(maxsize=None)
def _coverage_stack(qx: int, qy: int) -> np.ndarray:
    """Coverage (len(_HYPS), _WIN, _WIN) of every shape x size, each placed so that its
    centroid sits at continuous position (_HALF + qx/_QUANT, _HALF + qy/_QUANT) of the window."""
    fx, fy = qx / _QUANT, qy / _QUANT
    c = world.IMAGE_SIZE // 2
    x0, y0 = world.POSITIONS["center"]
    out = np.empty((len(_HYPS), _WIN, _WIN), np.float32)
    for k, (shape, size) in enumerate(_HYPS):
        r = world.SIZES[size] / 2.0
        ox, oy = _CENTROID_OFFSET[shape]
        spec = world.ObjectSpec(shape, "red", size, "center",
                                dx=c + fx - ox * r - x0, dy=c + fy - oy * r - y0)
        out[k] = world.object_coverage(spec)[c - _HALF: c + _HALF, c - _HALF: c + _HALF]
    return out


_STRIPES_PADDED = np.pad(world._STRIPES, _PAD)


# ----------------------------------------------------------------------------- helpers

def as_array(img) -> np.ndarray:
    """A uint8 (64, 64, 3) RGB array from a numpy array or PIL image (other sizes are resized;
    float arrays are taken as [0, 1] when their maximum is <= 1, else as [0, 255])."""
    if isinstance(img, Image.Image):
        a = np.asarray(img.convert("RGB"))
    else:
        a = np.asarray(img)
        if a.dtype != np.uint8:
            a = a.astype(np.float64)
            if a.size and np.nanmax(a) <= 1.0:
                a = a * 255.0
            a = np.clip(np.rint(np.nan_to_num(a)), 0, 255).astype(np.uint8)
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        if a.ndim != 3 or a.shape[2] not in (3, 4):
            raise ValueError(f"expected an HxWx3 image, got shape {a.shape}")
        a = a[..., :3]
    if a.shape[:2] != (world.IMAGE_SIZE, world.IMAGE_SIZE):
        a = cv2.resize(np.ascontiguousarray(a), (world.IMAGE_SIZE, world.IMAGE_SIZE), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(a)


def _nearest(color: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> tuple[str, float]:
    names = list(palette)
    d = np.linalg.norm(np.array([palette[n] for n in names], np.float64) - color[None], axis=1)
    k = int(np.argmin(d))
    return names[k], float(d[k])


def _nearest2(color: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> tuple[str, float, float]:
    """Nearest palette entry, its distance and the distance of the second nearest."""
    names = list(palette)
    d = np.linalg.norm(np.array([palette[n] for n in names], np.float64) - color[None], axis=1)
    order = np.argsort(d)
    return names[order[0]], float(d[order[0]]), float(d[order[1]])


def _nearest_position(center: tuple[float, float]) -> tuple[str, float]:
    best = min(world.POSITIONS, key=lambda p: math.dist(center, world.POSITIONS[p]))
    return best, math.dist(center, world.POSITIONS[best])


# ----------------------------------------------------------------------------- reading

def _read_background(a: np.ndarray, problems: list[str]) -> tuple[np.ndarray | None, str | None]:
    border = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]]).astype(np.float64)
    med = np.median(border, axis=0)
    agree = np.linalg.norm(border - med, axis=1) <= BORDER_AGREE_DIST
    if agree.mean() < BORDER_AGREE_FRAC:
        problems.append(f"background: border is not uniform ({agree.mean():.0%} agree)")
        return None, None
    bg = border[agree].mean(axis=0)
    name, d = _nearest(bg, world.BACKGROUNDS)
    if d > BG_MATCH_DIST:
        problems.append(f"background: colour {tuple(int(x) for x in bg)} is no palette background")
        return bg, None
    return bg, name


def _match_templates(ac: np.ndarray, al: np.ndarray, cx: float, cy: float, light_visible: bool):
    """Soft IoU of every shape x size x texture template against the observed coverage of the
    object colour `ac` and of the light stripe colour `al` (both padded by _PAD), with the
    template's centroid at (cx, cy).  Returns a list of (iou, shape, size, texture), best first."""
    ix, iy = int(math.floor(cx)), int(math.floor(cy))
    qx, qy = int(round((cx - ix) * _QUANT)), int(round((cy - iy) * _QUANT))
    if qx == _QUANT:
        ix, qx = ix + 1, 0
    if qy == _QUANT:
        iy, qy = iy + 1, 0
    if not (_HALF - _PAD <= ix <= world.IMAGE_SIZE + _PAD - _HALF
            and _HALF - _PAD <= iy <= world.IMAGE_SIZE + _PAD - _HALF):
        return []
    cov = _coverage_stack(qx, qy)
    ys, xs = slice(iy - _HALF + _PAD, iy + _HALF + _PAD), slice(ix - _HALF + _PAD, ix + _HALF + _PAD)
    ac_w, al_w = ac[ys, xs], al[ys, xs]
    a_w = ac_w + al_w
    axes = (1, 2)
    # plain: the whole object is the colour; light pixels are misses
    plain = np.minimum(cov, ac_w).sum(axes) / np.maximum(np.maximum(cov, a_w).sum(axes), 1e-6)
    # striped: dark stripes are the colour, light stripes are LIGHT (invisible on a light background,
    # where the template keeps only its dark stripes)
    s_w = _STRIPES_PADDED[ys, xs]
    tc = cov * (1.0 - s_w)
    if light_visible:
        tl = cov * s_w
        hit = np.minimum(tc, ac_w).sum(axes) + np.minimum(tl, al_w).sum(axes)
        striped = hit / np.maximum(np.maximum(cov, a_w).sum(axes), 1e-6)
    else:
        striped = np.minimum(tc, ac_w).sum(axes) / np.maximum(np.maximum(tc, ac_w).sum(axes), 1e-6)
    out = []
    for k, (shape, size) in enumerate(_HYPS):
        out.append((float(plain[k]), shape, size, "plain"))
        out.append((float(striped[k]), shape, size, "striped"))
    out.sort(key=lambda t_: -t_[0])
    return out


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance of colours p (N, 3) from the segment a-b in RGB space."""
    ab = b - a
    t = np.clip(((p - a) @ ab) / max(float(ab @ ab), 1e-6), 0.0, 1.0)
    return np.linalg.norm(p - (a[None] + t[:, None] * ab[None]), axis=1)


def _interior_colour(f: np.ndarray, mask: np.ndarray, light_visible: bool) -> np.ndarray:
    """Interior pixels (eroded mask, light stripe pixels left out) as an (N, 3) array."""
    interior = cv2.erode(mask.astype(np.uint8), _KERNEL).astype(bool)
    if interior.sum() < 4:
        interior = mask
    px = f[interior]
    if light_visible:
        px = px[np.linalg.norm(px - np.array(LIGHT, np.float32), axis=1) > LIGHT_DIST]
    return px


def _coverages(f: np.ndarray, bg: np.ndarray, col: np.ndarray, light: bool,
               chroma_weight: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel coverage of the object colour and of the light stripe colour (when `light`),
    from a least-squares unmixing of each pixel into background + colour (+ light) in YCbCr
    space with the chroma axes scaled by `chroma_weight`.  Coverages are stretched so that weak
    bleeding and ringing (< COVERAGE_FLOOR) read as empty and near-full pixels as full."""
    basis = [col - bg] + ([np.array(LIGHT, np.float32) - bg] if light else [])
    ycc = _YCC * np.array([[1.0], [chroma_weight], [chroma_weight]])
    m = ycc @ np.stack(basis, axis=1).astype(np.float64)  # (3, k)
    w_ = ((f.reshape(-1, 3).astype(np.float64) - bg[None]) @ ycc.T) @ np.linalg.pinv(m).T  # (N, k)
    w_ = np.clip(w_, 0.0, None)
    tot = w_.sum(axis=1, keepdims=True)
    w_ = np.where(tot > 1.0, w_ / np.maximum(tot, 1e-9), w_)
    w_ = np.clip((w_ - COVERAGE_FLOOR) / (1.0 - 2.0 * COVERAGE_FLOOR), 0.0, 1.0)
    ac = w_[:, 0].reshape(f.shape[:2]).astype(np.float32)
    al = (w_[:, 1].reshape(f.shape[:2]) if light else np.zeros(f.shape[:2])).astype(np.float32)
    return ac, al


_GY, _GX = np.mgrid[0: world.IMAGE_SIZE, 0: world.IMAGE_SIZE] + 0.5


def _fit_shape(f, bg, col, light_seen, light_visible, region):
    """Template-match the object's coverage maps; returns (ranked, centroid).  Two unmixings are
    tried, luma-dominated (robust to JPEG's half-resolution chroma) and full-colour (robust to
    noise when the object and background differ mostly in hue); the better fit is kept."""
    best = None
    for cw in _CHROMA_WEIGHTS:
        ac, al = _coverages(f, bg, col, light_seen, cw)
        ac[~region] = 0.0
        al[~region] = 0.0
        tot = ac + al
        mass = float(tot.sum())
        if mass < 1.0:
            continue
        c = (float((tot * _GX).sum() / mass), float((tot * _GY).sum() / mass))
        ranked = _match_templates(np.pad(ac, _PAD), np.pad(al, _PAD), c[0], c[1], light_visible)
        if ranked and (best is None or ranked[0][0] > best[0][0][0]):
            best = (ranked, c)
    return best


def _read_object(a: np.ndarray, bg: np.ndarray, mask: np.ndarray, others: np.ndarray,
                 light_visible: bool, problems: list[str], tag: str) -> DetectedObject:
    f = a.astype(np.float32)
    bg = bg.astype(np.float32)
    area = int(mask.sum())
    ys, xs = np.nonzero(mask)
    rough = (float(xs.mean() + 0.5), float(ys.mean() + 0.5))
    px = _interior_colour(f, mask, light_visible)
    # Unmix with the light stripe colour only where the object shows some light pixels.
    px_all = _interior_colour(f, mask, False)
    light_seen = light_visible and float(
        (np.linalg.norm(px_all - np.array(LIGHT, np.float32), axis=1) <= LIGHT_DIST).mean()) >= LIGHT_MIN_FRAC
    if len(px) < 4:
        problems.append(f"{tag}: no coloured interior")
        return DetectedObject(None, None, None, None, None, rough, area, 0.0)
    col = np.median(px, axis=0)
    # Second pass: the interior of the pixels that are mostly the object colour (the foreground
    # mask also holds anti-aliased edge pixels, which would dilute the colour).
    region = cv2.dilate(mask.astype(np.uint8), _KERNEL, iterations=2).astype(bool) & ~others
    ac, _ = _coverages(f, bg, col, light_seen, 1.0)
    px2 = _interior_colour(f, (ac >= 0.5) & mask, light_visible)
    if len(px2) >= 4:
        px = px2
        col = np.median(px, axis=0)
    color, d1, d2 = _nearest2(col, world.COLORS)
    if d1 > COLOR_MATCH_DIST or d1 > COLOR_RATIO * d2:
        problems.append(f"{tag}: colour {tuple(int(x) for x in col)} is no palette colour "
                        f"({color} off by {d1:.0f}, next {d2:.0f})")
        color = None
    # Uniformity is measured in YCbCr with the chroma halved: JPEG smears chroma, not luma.
    to_u = (_YCC * np.array([[1.0], [UNIFORM_CHROMA], [UNIFORM_CHROMA]])).T
    pu, bgu, colu = px @ to_u, bg @ to_u, col @ to_u
    dev = _segment_distance(pu, bgu, colu)
    if light_seen:
        dev = np.minimum(dev, _segment_distance(pu, colu, np.array(LIGHT) @ to_u))
    uniform = float((dev <= UNIFORM_DIST).mean())
    if uniform < UNIFORM_FRAC or __import__('os').environ.get('UDBG'):
        problems.append(f"{tag}: colour is not uniform ({uniform:.0%})")
        color = None

    fit = _fit_shape(f, bg, col, light_seen, light_visible, region)
    if fit is None:
        problems.append(f"{tag}: no shape fits")
        return DetectedObject(None, color, None, None, None, rough, area, 0.0)
    ranked, (cx, cy) = fit
    best_iou, shape, size, texture = ranked[0]
    second = max((r[0] for r in ranked if r[1] != shape), default=0.0)
    ok_shape = True
    if best_iou < IOU_MIN_TEMPLATE.get((shape, size), IOU_MIN):
        problems.append(f"{tag}: malformed (best template {shape}/{size} IoU {best_iou:.2f})")
        ok_shape = False
    elif best_iou - second < SHAPE_MARGIN:
        problems.append(f"{tag}: ambiguous shape ({shape} IoU {best_iou:.2f} vs {second:.2f})")
        ok_shape = False
    if ok_shape:
        r = world.SIZES[size] / 2.0
        ox, oy = _CENTROID_OFFSET[shape]
        center = (cx - ox * r, cy - oy * r)
    else:
        center = (cx, cy)
    position, dpos = _nearest_position(center)
    if dpos > POSITION_TOL:
        problems.append(f"{tag}: centre ({center[0]:.1f}, {center[1]:.1f}) is {dpos:.1f} px from the nearest anchor")
        position = None
    if not ok_shape:
        return DetectedObject(None, color, None, position, None, (cx, cy), area, best_iou, None)
    return DetectedObject(shape, color, size, position, texture, (cx, cy), area, best_iou, center)


def read_image(img) -> Reading:
    """Read the background and objects of a ShapesWorld image (see the module docstring)."""
    a = as_array(img)
    problems: list[str] = []
    bg, bg_name = _read_background(a, problems)
    if bg is None:
        return Reading(None, [], problems)
    f = a.astype(np.float32)
    dist_bg = np.linalg.norm(f - bg.astype(np.float32), axis=2)
    fg = (dist_bg > FG_DIST).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    big = [k for k in range(1, n) if stats[k, cv2.CC_STAT_AREA] >= MIN_OBJECT_AREA]
    specks = sum(int(stats[k, cv2.CC_STAT_AREA]) for k in range(1, n) if k not in big)
    if specks > MAX_SPECK_AREA:
        problems.append(f"clutter: {specks} px of specks")
    light_visible = float(np.linalg.norm(bg - np.array(LIGHT))) > 2 * LIGHT_DIST
    masks = [labels == k for k in big]
    objects = []
    for i, m in enumerate(masks):
        others = np.zeros_like(m)
        for j, m2 in enumerate(masks):
            if j != i:
                others |= m2
        objects.append(_read_object(a, bg, m, others, light_visible, problems, f"object {i}"))
    # Order objects left-to-right, top-to-bottom for a stable reading.
    objects.sort(key=lambda o: (o.centroid[0], o.centroid[1]))
    return Reading(bg_name, objects, problems)


# ----------------------------------------------------------------------------- scoring

KEYS = ("color", "shape", "size", "position", "background", "texture", "count", "all_correct")


def match_objects(reading: Reading, scene: world.Scene) -> list[tuple[DetectedObject, world.ObjectSpec]] | None:
    """Pair detected with scene objects (optimal assignment by centroid distance to the scene's
    object centres); None when the counts differ."""
    dets, specs = reading.objects, scene.objects
    if len(dets) != len(specs):
        return None
    best, best_cost = None, math.inf
    for perm in itertools.permutations(range(len(dets))):
        cost = sum(math.dist(dets[p].center or dets[p].centroid, specs[i].center) for i, p in enumerate(perm))
        if cost < best_cost:
            best, best_cost = perm, cost
    return [(dets[p], specs[i]) for i, p in enumerate(best)]


def score(img, scene: world.Scene, reading: Reading | None = None) -> dict:
    """Per-attribute correctness of `img` for `scene` (see the module docstring).

    Each attribute key is True when that attribute matches for every object of the scene.
    Size, position and background count as correct when the caption does not state them;
    shape, colour and texture are always checked.  With a wrong object count every key is
    False.  `all_correct` also needs a reading without problems."""
    r = reading if reading is not None else read_image(img)
    pairs = match_objects(r, scene)
    if pairs is None:
        return {k: False for k in KEYS}
    n = len(scene.objects)
    ms = scene.mention_size or (True,) * n
    mp = scene.mention_position or (True,) * n
    out = {
        "color": all(d.color == s.color for d, s in pairs),
        "shape": all(d.shape == s.shape for d, s in pairs),
        "size": all(d.size == s.size or not ms[i] for i, (d, s) in enumerate(pairs)),
        "position": all(d.position == s.position or not mp[i] for i, (d, s) in enumerate(pairs)),
        "background": r.background == scene.background or not scene.mention_background,
        "texture": all(d.texture == s.texture for d, s in pairs),
        "count": True,
    }
    out["all_correct"] = all(out.values()) and not r.problems
    return out


def saturation(img) -> float:
    """Mean HSV saturation of the image in [0, 1]."""
    f = as_array(img).astype(np.float64)
    mx, mn = f.max(axis=2), f.min(axis=2)
    s = np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-9), 0.0)
    return float(s.mean())


def evaluate(images, scenes) -> dict:
    """Fraction of images correct for each attribute, plus mean saturation and `n`."""
    images, scenes = list(images), list(scenes)
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images for {len(scenes)} scenes")
    totals = {k: 0 for k in KEYS}
    sat = 0.0
    for img, sc in zip(images, scenes):
        s = score(img, sc)
        for k in KEYS:
            totals[k] += bool(s[k])
        sat += saturation(img)
    n = len(images)
    out = {k: totals[k] / max(n, 1) for k in KEYS}
    out["saturation"] = sat / max(n, 1)
    out["n"] = n
    return out


# ----------------------------------------------------------------------------- robustness

def corrupt(img, kind: str, seed: int = 0) -> np.ndarray:
    """Mild corruptions used to check the reader's robustness: 'blur' (Gaussian, sigma 0.6),
    'noise' (additive Gaussian, std 6), 'jpeg' (quality 75), or 'clean'."""
    a = as_array(img)
    if kind == "clean":
        return a.copy()
    if kind == "blur":
        return cv2.GaussianBlur(a, (5, 5), sigmaX=0.6, sigmaY=0.6, borderType=cv2.BORDER_REFLECT)
    if kind == "noise":
        rng = np.random.default_rng(seed)
        return np.clip(np.rint(a + rng.normal(0.0, 6.0, a.shape)), 0, 255).astype(np.uint8)
    if kind == "jpeg":
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=75)
        buf.seek(0)
        return np.asarray(Image.open(buf).convert("RGB")).copy()
    raise ValueError(f"unknown corruption {kind!r}")


CORRUPTIONS = ("clean", "blur", "noise", "jpeg")


def accuracy_report(n: int = 1000, seed: int = 1234, two_object_prob: float = 0.5) -> dict:
    """`all_correct` accuracy of the reader on `n` rendered held-out scenes (all attributes
    stated), clean and under each corruption of `corrupt`."""
    scenes = world.sample_scenes(n, seed, two_object_prob=two_object_prob, drop_prob=0.0)
    images = [world.render(s) for s in scenes]
    out = {}
    for kind in CORRUPTIONS:
        ok = sum(score(corrupt(img, kind, seed=seed * 100003 + i), sc)["all_correct"]
                 for i, (img, sc) in enumerate(zip(images, scenes)))
        out[kind] = ok / n
    out["n"] = n
    return out
