"""Strict attribute reader and scorer for ShapesWorld images.

`read_image` reads back, from a 64x64 RGB image, the background and every object (shape,
colour, size, position, texture) that the ShapesWorld renderer (`world.py`) could have
drawn; `score` compares a reading with a `Scene` (the prompt's ground truth) and
`evaluate` averages the scores over a batch.  `saturation` measures colour saturation
(over-saturation under strong guidance), `accuracy_report` measures the reader itself.

The reader is deliberately strict: "correct" means the image shows the prompted scene
and nothing else.  A missing, extra, ambiguous or malformed object makes the image wrong.

* Background: the border pixels must be one colour (90 % of them within
  `BORDER_AGREE_DIST` of their median) lying within `BG_MATCH_DIST` of a palette
  background (palette backgrounds are >= 104 apart, so at most one can match); else the
  background reads as None and the image fails.
* Objects: pixels farther than `FG_DIST` from the background are foreground; every
  8-connected foreground component of `MIN_OBJECT_AREA` pixels or more is an object.
  Smaller specks are ignored unless together they exceed `MAX_SPECK_AREA` (clutter).
* Colour: the interior colour (median of the interior half farthest from the
  background) must be within `COLOR_MATCH_DIST`
  of a palette colour and at most `COLOR_RATIO` times as far from it as from the second
  nearest palette colour (a colour halfway between two palette colours is ambiguous);
  `UNIFORM_FRAC` of the interior pixels must be explained better by a blend of the
  background with the object's colour than with any other palette colour.
* Shape, size and texture: each pixel is unmixed into background + object colour
  (+ the light stripe colour), giving a soft coverage map that is compared by soft IoU
  with the coverage of every shape x size x texture rendered by `world.object_coverage`
  at the object's centroid.  The best template must reach `IOU_MIN` (0.80; 0.74 for the
  small star) and beat the best template of any *other* shape by `SHAPE_MARGIN`; an
  ellipse, a random polygon or two touching objects fail.  The held-out shape (heart)
  and texture (striped) are read like the others; on the white background, where the
  light stripes vanish, the pieces of a striped object are re-read as one object.
* Position: the template's centre must lie within `POSITION_TOL` pixels of a position
  anchor (anchors are 16 px apart; scenes jitter objects by at most 2 px per axis).

A component that fails a test is still reported as an object, with the unreadable
attributes set to None and a line in `Reading.problems`: it makes the count wrong when
it is extra and the attribute wrong when it stands in for a prompted object, and any
problem makes `all_correct` False.

Measured with `accuracy_report(1000)` (one or two objects, every attribute stated):
all_correct on 1.000 of clean renders, 1.000 after Gaussian blur (sigma 0.6), 1.000
after Gaussian noise (std 6) and 0.999 after JPEG at quality 75.  The held-out heart
reads as well as the base shapes.  Striped objects read correctly on ~99 % of clean
renders (the misses are small striped stars) but only ~60 % after JPEG (the stripes do
not survive it).  JPEG misses otherwise come from small shapes whose colour
differs from the background mostly in hue (green on gray, yellow on beige).
"""

from __future__ import annotations

import io
import itertools
import math
from dataclasses import dataclass, field
from functools import lru_cache

import cv2
import numpy as np
from PIL import Image

from . import world

# ----------------------------------------------------------------------------- thresholds

BORDER_AGREE_DIST = 30.0  # a border pixel agrees with the border median within this RGB distance ...
BORDER_AGREE_FRAC = 0.90  # ... and this fraction of the border must agree
BG_MATCH_DIST = 30.0  # border colour vs palette background (palette backgrounds are >= 104 apart)
FG_DIST = 35.0  # foreground: farther than this from the background (object/background pairs are >= 90 apart)
MIN_OBJECT_AREA = 16  # smaller components are specks (the smallest object, a small star, covers ~60 px)
MAX_SPECK_AREA = 48  # more speck pixels than this in all is clutter
COLOR_MATCH_DIST = 40.0  # interior colour vs nearest palette colour (closest palette pair, orange/yellow: 81) ...
COLOR_RATIO = 0.5  # ... and at most this fraction of its distance to the second nearest palette colour
UNIFORM_FRAC = 0.85  # this fraction of the interior must be explained by the object's colour (blended with
UNIFORM_SLACK = 15.0  # the background) within this RGB distance of the best other palette colour's blend;
UNIFORM_MIN_COVER = 0.5  # interior pixels that are more background than colour are left out
IOU_MIN = 0.80  # soft IoU the best template must reach ...
IOU_MIN_TEMPLATE = {("star", "small"): 0.74}  # ... except the small star (3 px arms; JPEG halves chroma resolution)
SHAPE_MARGIN = 0.05  # best IoU minus best IoU of any other shape
POSITION_TOL = 6.0  # template centre to nearest position anchor, pixels
LIGHT = (250.0, 250.0, 250.0)  # light stripe colour of the 'striped' texture (see world.render)
LIGHT_DIST = 45.0  # an interior pixel this close to LIGHT is a light stripe pixel ...
LIGHT_MIN_FRAC = 0.08  # ... and objects with this fraction of them are unmixed with LIGHT too
COVERAGE_FLOOR = 0.15  # coverage below this reads as empty (bleeding, ringing), above 1 - this as full
CHROMA_WEIGHTS = (0.1, 1.0)  # chroma scales of the two unmixings tried (luma-dominated, full colour)
MERGE_GAP = 2  # on a light background, pieces of one striped object lie within 2 * MERGE_GAP px
STRIPED_SEARCH = 2.0  # ... and their template is searched within this many px of their centroid

ALL_SHAPES = world.SHAPES + world.HELD_OUT_SHAPES
ALL_TEXTURES = world.TEXTURES + world.HELD_OUT_TEXTURES
_HYPS = [(s, z) for s in ALL_SHAPES for z in world.SIZES]  # template order
_WIN = 40  # template window (pixels) around the object's centroid
_HALF = _WIN // 2
_QUANT = 4  # centroids are quantised to 1/_QUANT pixel for the template cache
_PAD = _HALF + 4
_KERNEL = np.ones((3, 3), np.uint8)
# RGB -> YCbCr (BT.601 without offsets)
_YCC = np.array([[0.299, 0.587, 0.114],
                 [-0.168736, -0.331264, 0.5],
                 [0.5, -0.418688, -0.081312]])
_LIGHT = np.array(LIGHT, np.float32)


# ----------------------------------------------------------------------------- results

@dataclass
class DetectedObject:
    shape: str | None  # None when the component matches no shape (malformed / ambiguous)
    color: str | None  # None when the colour is ambiguous or not a palette colour
    size: str | None
    position: str | None  # None when the centre is off the position anchors
    texture: str | None
    centroid: tuple[float, float]  # (x, y) coverage-weighted centroid, pixels (where the best template was placed)
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
    """The background colour measured on the 1 px border (None when the border is not one
    colour) and its palette name (None when it is no palette background)."""
    border = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]]).astype(np.float64)
    med = np.median(border, axis=0)
    agree = np.linalg.norm(border - med, axis=1) <= BORDER_AGREE_DIST
    if agree.mean() < BORDER_AGREE_FRAC:
        problems.append(f"background: border is not uniform ({agree.mean():.0%} agree)")
        return None, None
    bg = border[agree].mean(axis=0)
    name, d, _ = _nearest2(bg, world.BACKGROUNDS)
    if d > BG_MATCH_DIST:
        problems.append(f"background: colour {tuple(int(x) for x in bg)} is no palette background")
        return bg, None
    return bg, name


def _match_templates(ac: np.ndarray, al: np.ndarray, cx: float, cy: float, light_visible: bool):
    """Soft IoU of every shape x size x texture template against the observed coverage of the
    object colour `ac` and of the light stripe colour `al` (both padded by _PAD), with the
    template's centroid at (cx, cy).  Returns [(iou, shape, size, texture)], best first."""
    ix, iy = int(math.floor(cx)), int(math.floor(cy))
    qx, qy = int(round((cx - ix) * _QUANT)), int(round((cy - iy) * _QUANT))
    if qx == _QUANT:
        ix, qx = ix + 1, 0
    if qy == _QUANT:
        iy, qy = iy + 1, 0
    lo, hi = _HALF - _PAD, world.IMAGE_SIZE + _PAD - _HALF
    if not (lo <= ix <= hi and lo <= iy <= hi):
        return []
    cov = _coverage_stack(qx, qy)
    ys, xs = slice(iy - _HALF + _PAD, iy + _HALF + _PAD), slice(ix - _HALF + _PAD, ix + _HALF + _PAD)
    ac_w, al_w = ac[ys, xs], al[ys, xs]
    union = np.maximum(cov, ac_w + al_w).sum((1, 2))
    # plain: the whole object is the colour (light pixels are misses)
    plain = np.minimum(cov, ac_w).sum((1, 2)) / np.maximum(union, 1e-6)
    # striped: dark stripes are the colour and light stripes are LIGHT; on a light background
    # the light stripes are invisible, and only the dark stripes are compared
    s_w = _STRIPES_PADDED[ys, xs]
    tc = cov * (1.0 - s_w)
    if light_visible:
        hit = np.minimum(tc, ac_w).sum((1, 2)) + np.minimum(cov * s_w, al_w).sum((1, 2))
        striped = hit / np.maximum(union, 1e-6)
    else:
        striped = np.minimum(tc, ac_w).sum((1, 2)) / np.maximum(np.maximum(tc, ac_w).sum((1, 2)), 1e-6)
    out = []
    for k, (shape, size) in enumerate(_HYPS):
        out.append((float(plain[k]), shape, size, "plain"))
        out.append((float(striped[k]), shape, size, "striped"))
    out.sort(key=lambda t: -t[0])
    return out


def _interior(f: np.ndarray, mask: np.ndarray, drop_light: bool) -> np.ndarray:
    """Colours (N, 3) of the eroded mask (the mask itself when erosion leaves < 4 px),
    without the light stripe pixels when `drop_light`."""
    inner = cv2.erode(mask.astype(np.uint8), _KERNEL).astype(bool)
    px = f[inner if inner.sum() >= 4 else mask]
    if drop_light:
        px = px[np.linalg.norm(px - _LIGHT, axis=1) > LIGHT_DIST]
    return px


def _core_colour(px: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Median colour of the half of the interior pixels farthest from the background (JPEG
    bleeds the background's chroma into the rim of small objects)."""
    d = np.linalg.norm(px - bg, axis=1)
    return np.median(px[d >= np.median(d)], axis=0)


def _blend_fit(q: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each colour of q (N, 3): the weight t in [0, 1] of the blend a * (1 - t) + b * t
    nearest to it, and the distance to that blend."""
    ab = b - a
    t = np.clip(((q - a) @ ab) / max(float(ab @ ab), 1e-6), 0.0, 1.0)
    return t, np.linalg.norm(q - (a[None] + t[:, None] * ab[None]), axis=1)


def _uniformity(px: np.ndarray, bg: np.ndarray, core: np.ndarray, color: str | None, light: bool) -> float:
    """Fraction of the interior pixels `px` best explained as a blend of the background with the
    object's colour `core` (or, when `light`, of the colour with the light stripe colour) rather
    than with any other palette colour.  Pixels that are mostly background whichever colour
    explains them (rims smeared by blur or JPEG) are left out."""
    q, bg, core = px.astype(np.float64), bg.astype(np.float64), core.astype(np.float64)
    t_own, own = _blend_fit(q, bg, core)
    if light:
        own = np.minimum(own, _blend_fit(q, core, _LIGHT.astype(np.float64))[1])
        t_own = np.where(np.linalg.norm(q - _LIGHT, axis=1) < np.linalg.norm(q - bg, axis=1), 1.0, t_own)
    fits = [_blend_fit(q, bg, np.array(c, np.float64)) for n, c in world.COLORS.items() if n != color]
    rival = np.min([d for _, d in fits], axis=0)
    t_rival = np.choose(np.argmin([d for _, d in fits], axis=0), [t for t, _ in fits])
    t_best = np.where(own <= rival, t_own, t_rival)
    keep = t_best >= UNIFORM_MIN_COVER
    if keep.sum() < 4:
        return 0.0
    return float((own[keep] <= rival[keep] + UNIFORM_SLACK).mean())


def _coverages(f: np.ndarray, bg: np.ndarray, col: np.ndarray, light: bool,
               chroma_weight: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel coverage of the object colour and of the light stripe colour (zero unless
    `light`): least-squares unmixing of each pixel into background + colour (+ light) in YCbCr
    with the chroma axes scaled by `chroma_weight`, then stretched so that weak bleeding and
    ringing (< COVERAGE_FLOOR) read as empty and near-full pixels as full."""
    basis = [col - bg] + ([_LIGHT - bg] if light else [])
    ycc = _YCC * np.array([[1.0], [chroma_weight], [chroma_weight]])
    m = ycc @ np.stack(basis, axis=1).astype(np.float64)  # (3, k)
    w = ((f.reshape(-1, 3).astype(np.float64) - bg[None]) @ ycc.T) @ np.linalg.pinv(m).T  # (N, k)
    w = np.clip(w, 0.0, None)
    tot = w.sum(axis=1, keepdims=True)
    w = np.where(tot > 1.0, w / np.maximum(tot, 1e-9), w)
    w = np.clip((w - COVERAGE_FLOOR) / (1.0 - 2.0 * COVERAGE_FLOOR), 0.0, 1.0)
    ac = w[:, 0].reshape(f.shape[:2]).astype(np.float32)
    al = (w[:, 1].reshape(f.shape[:2]) if light else np.zeros(f.shape[:2])).astype(np.float32)
    return ac, al


_GY, _GX = np.mgrid[0: world.IMAGE_SIZE, 0: world.IMAGE_SIZE] + 0.5


def _fit_shape(f, bg, col, light_seen: bool, light_visible: bool, region: np.ndarray, search: float = 0.0):
    """Template-match the object's coverage.  Two unmixings are tried, luma-dominated (robust to
    JPEG's half-resolution chroma) and full-colour (robust to noise where object and background
    differ mostly in hue), and the better fit is kept.  With `search` > 0 the template centroid is
    also searched on a half-pixel grid within `search` px of the coverage centroid (for striped
    objects on a light background, whose visible dark stripes are off-centre).
    Returns (ranked templates, template centroid) or None."""
    best = None
    offsets = np.arange(-search, search + 1e-6, 0.5) if search > 0 else np.zeros(1)
    for cw in CHROMA_WEIGHTS:
        ac, al = _coverages(f, bg, col, light_seen, cw)
        ac[~region] = 0.0
        al[~region] = 0.0
        tot = ac + al
        mass = float(tot.sum())
        if mass < 1.0:
            continue
        cx, cy = float((tot * _GX).sum() / mass), float((tot * _GY).sum() / mass)
        ac_p, al_p = np.pad(ac, _PAD), np.pad(al, _PAD)
        for dx in offsets:
            for dy in offsets:
                ranked = _match_templates(ac_p, al_p, cx + dx, cy + dy, light_visible)
                if ranked and (best is None or ranked[0][0] > best[0][0][0]):
                    best = (ranked, (float(cx + dx), float(cy + dy)))
    return best


def _read_object(f: np.ndarray, bg: np.ndarray, mask: np.ndarray, others: np.ndarray,
                 light_visible: bool, search: float = 0.0) -> tuple[DetectedObject, list[str]]:
    """Read one foreground component; returns the object and its problems."""
    problems: list[str] = []
    area = int(mask.sum())
    ys, xs = np.nonzero(mask)
    rough = (float(xs.mean() + 0.5), float(ys.mean() + 0.5))
    # Unmix with the light stripe colour only where the object shows light pixels.
    light_seen = light_visible and float(
        (np.linalg.norm(_interior(f, mask, False) - _LIGHT, axis=1) <= LIGHT_DIST).mean()) >= LIGHT_MIN_FRAC
    px = px_all = _interior(f, mask, light_visible)
    if len(px) < 4:
        return DetectedObject(None, None, None, None, None, rough, area, 0.0), ["no coloured interior"]
    col = np.median(px, axis=0)
    # Second pass on the pixels that are mostly the object colour: the foreground mask also
    # holds anti-aliased edge pixels, which would dilute the colour.
    ac, _ = _coverages(f, bg, col, light_seen, 1.0)
    px2 = _interior(f, (ac >= 0.5) & mask, light_visible)
    if len(px2) >= 4:
        px = px2
        col = np.median(px, axis=0)
    core = _core_colour(px, bg)
    color, d1, d2 = _nearest2(core, world.COLORS)
    if d1 > COLOR_MATCH_DIST or d1 > COLOR_RATIO * d2:
        problems.append(f"colour {tuple(int(x) for x in core)} is no palette colour "
                        f"({color} is {d1:.0f} away, the next {d2:.0f})")
        color = None
    uniform = _uniformity(px_all, bg, core, color, light_seen)
    if uniform < UNIFORM_FRAC:
        problems.append(f"colour is not uniform ({uniform:.0%} of the interior)")
        color = None

    region = cv2.dilate(mask.astype(np.uint8), _KERNEL, iterations=2).astype(bool) & ~others
    fit = _fit_shape(f, bg, col, light_seen, light_visible, region, search)
    if fit is None:
        return DetectedObject(None, color, None, None, None, rough, area, 0.0), problems + ["no shape fits"]
    ranked, (cx, cy) = fit
    best_iou, shape, size, texture = ranked[0]
    second = max((r[0] for r in ranked if r[1] != shape), default=0.0)
    ok_shape = True
    if best_iou < IOU_MIN_TEMPLATE.get((shape, size), IOU_MIN):
        problems.append(f"malformed (best template {shape}/{size}/{texture} has IoU {best_iou:.2f})")
        ok_shape = False
    elif best_iou - second < SHAPE_MARGIN:
        problems.append(f"ambiguous shape ({shape} IoU {best_iou:.2f} vs other shapes {second:.2f})")
        ok_shape = False
    if ok_shape:
        r = world.SIZES[size] / 2.0
        ox, oy = _CENTROID_OFFSET[shape]
        center = (cx - ox * r, cy - oy * r)
    else:
        center = (cx, cy)
    position, dpos = _nearest_position(center)
    if dpos > POSITION_TOL:
        problems.append(f"centre ({center[0]:.1f}, {center[1]:.1f}) is {dpos:.1f} px from the nearest anchor")
        position = None
    if not ok_shape:
        return DetectedObject(None, color, None, position, None, (cx, cy), area, best_iou, None), problems
    return DetectedObject(shape, color, size, position, texture, (cx, cy), area, best_iou, center), problems


def _merge_striped_pieces(f, bg, labels, comps, specks, reads) -> set[int]:
    """On a light background the light stripes of a striped object vanish into the background
    and the object falls apart into pieces.  Components and specks within 2 * MERGE_GAP px of
    each other are grouped; a group of several pieces (or a single component that fails on its
    own) is re-read as one object, which replaces the pieces when it reads as a flawless striped
    object.  Updates `reads` in place and returns the specks used up."""
    cand = comps + specks
    grown = {k: cv2.dilate((labels == k).astype(np.uint8), _KERNEL, iterations=MERGE_GAP).astype(bool)
             for k in cand}
    parent = {k: k for k in cand}

    def find(k):
        while parent[k] != k:
            k = parent[k]
        return k

    for a_, b_ in itertools.combinations(cand, 2):
        if (grown[a_] & grown[b_]).any():
            parent[find(a_)] = find(b_)
    groups: dict[int, list[int]] = {}
    for k in cand:
        groups.setdefault(find(k), []).append(k)
    used: set[int] = set()
    for members in groups.values():
        pieces = [k for k in members if k in reads]
        if not pieces or (len(members) == 1 and not reads[pieces[0]][1]):
            continue
        union = np.isin(labels, members)
        if union.sum() < MIN_OBJECT_AREA:
            continue
        others = np.isin(labels, [k for k in comps if k not in members])
        obj, probs = _read_object(f, bg, union, others, False, search=STRIPED_SEARCH)
        if not probs and obj.texture == "striped":
            reads[pieces[0]] = (obj, [])
            for k in pieces[1:]:
                reads[k] = None
            used.update(k for k in members if k not in reads)
    return used


def read_image(img) -> Reading:
    """Read the background and objects of a ShapesWorld image (see the module docstring)."""
    a = as_array(img)
    problems: list[str] = []
    bg, bg_name = _read_background(a, problems)
    if bg is None:
        return Reading(None, [], problems)
    f = a.astype(np.float32)
    bg = bg.astype(np.float32)
    fg = (np.linalg.norm(f - bg, axis=2) > FG_DIST).astype(np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    comps = [k for k in range(1, n) if stats[k, cv2.CC_STAT_AREA] >= MIN_OBJECT_AREA]
    specks = [k for k in range(1, n) if stats[k, cv2.CC_STAT_AREA] < MIN_OBJECT_AREA]
    light_visible = float(np.linalg.norm(bg - _LIGHT)) > 2 * LIGHT_DIST
    reads: dict[int, tuple[DetectedObject, list[str]] | None] = {}
    for k in comps:
        others = np.isin(labels, [j for j in comps if j != k])
        reads[k] = _read_object(f, bg, labels == k, others, light_visible)
    used: set[int] = set()
    if not light_visible:
        used = _merge_striped_pieces(f, bg, labels, comps, specks, reads)
    speck_area = sum(int(stats[k, cv2.CC_STAT_AREA]) for k in specks if k not in used)
    if speck_area > MAX_SPECK_AREA:
        problems.append(f"clutter: {speck_area} px of specks")
    found = sorted((r for r in reads.values() if r is not None), key=lambda r: (r[0].centroid[0], r[0].centroid[1]))
    objects = []
    for i, (obj, probs) in enumerate(found):
        objects.append(obj)
        problems += [f"object {i} at ({obj.centroid[0]:.0f}, {obj.centroid[1]:.0f}): {p}" for p in probs]
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
