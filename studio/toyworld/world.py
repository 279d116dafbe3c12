"""ShapesWorld scenes: deterministic, seeded, anti-aliased 64x64 RGB renders with captions.

A scene is one or two objects (shape, colour, size, position) on a flat background.
Captions come from the same parameters through a small grammar, so every generated
image can be scored against exact ground truth (see `evaluator.py`).

Held-out concepts (`HELD_OUT_SHAPES`, `HELD_OUT_TEXTURES`) never appear in base
training; the personalization tab learns them.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, asdict, replace

import numpy as np

IMAGE_SIZE = 64
SUPERSAMPLE = 4

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
HELD_OUT_SHAPES = ("heart",)
TEXTURES = ("plain",)
HELD_OUT_TEXTURES = ("striped",)

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 170, 60),
    "cyan": (30, 200, 215),
    "blue": (40, 70, 220),
    "purple": (140, 50, 200),
    "pink": (245, 120, 190),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
    "white": (240, 240, 240),
    "beige": (215, 195, 150),
}
# Object extent in pixels (diameter of the bounding circle) for each size word.
SIZES: dict[str, float] = {"small": 14.0, "large": 26.0}
# Object centres (x, y) in pixels for each position word.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (16.0, 32.0),
    "right": (48.0, 32.0),
    "top": (32.0, 16.0),
    "bottom": (32.0, 48.0),
    "center": (32.0, 32.0),
}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# Two-object scenes use opposite positions so that objects of any size never overlap.
POSITION_PAIRS = (("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top"))
JITTER = 2.0  # max centre jitter in pixels


@dataclass(frozen=True)
class ObjectSpec:
    shape: str
    color: str
    size: str
    position: str
    texture: str = "plain"
    dx: float = 0.0  # centre jitter in pixels
    dy: float = 0.0

    @property
    def center(self) -> tuple[float, float]:
        x, y = POSITIONS[self.position]
        return x + self.dx, y + self.dy


@dataclass(frozen=True)
class Scene:
    objects: tuple[ObjectSpec, ...]
    background: str
    # Which attributes the caption states (the others are unconstrained).
    mention_size: tuple[bool, ...] = field(default=())
    mention_position: tuple[bool, ...] = field(default=())
    mention_background: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Scene":
        return Scene(
            objects=tuple(ObjectSpec(**o) for o in d["objects"]),
            background=d["background"],
            mention_size=tuple(d.get("mention_size", ())),
            mention_position=tuple(d.get("mention_position", ())),
            mention_background=d.get("mention_background", True),
        )


# ----------------------------------------------------------------------------- shapes

def _polygon_mask(u: np.ndarray, v: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test for arrays of points (u, v)."""
    inside = np.zeros(u.shape, dtype=bool)
    n = len(poly)
    for i in range(n):
        x1, y1 = poly[i]
        x2, y2 = poly[(i + 1) % n]
        cond = (y1 > v) != (y2 > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            xint = x1 + (v - y1) * (x2 - x1) / (y2 - y1)
        inside ^= cond & (u < xint)
    return inside


def _star_polygon(points: int = 5, inner: float = 0.45) -> np.ndarray:
    verts = []
    for k in range(2 * points):
        r = 1.0 if k % 2 == 0 else inner
        a = -math.pi / 2 + k * math.pi / points
        verts.append((r * math.cos(a), r * math.sin(a)))
    return np.array(verts)


_STAR = _star_polygon()
_TRIANGLE = np.array([(0.0, -1.0), (0.92, 0.72), (-0.92, 0.72)])


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean mask of `shape` in unit coordinates (u right, v down), extent radius 1."""
    if shape == "circle":
        return u * u + v * v <= 0.92**2
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.72
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "cross":
        a = 0.32
        return ((np.abs(u) <= a) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= a) & (np.abs(u) <= 0.95))
    if shape == "triangle":
        return _polygon_mask(u, v, _TRIANGLE)
    if shape == "star":
        return _polygon_mask(u, v, _STAR)
    if shape == "heart":
        x, y = u * 1.15, -(v * 1.15) + 0.15
        return (x * x + y * y - 1.0) ** 3 - x * x * y**3 <= 0.0
    raise ValueError(f"unknown shape {shape!r}")


# ----------------------------------------------------------------------------- rendering

_SS = IMAGE_SIZE * SUPERSAMPLE
_GRID = (np.arange(_SS, dtype=np.float64) + 0.5) / SUPERSAMPLE  # pixel coordinates of subsamples


def object_coverage(obj: ObjectSpec) -> np.ndarray:
    """Anti-aliased coverage (float32 in [0, 1], 64x64) of one object."""
    cx, cy = obj.center
    r = SIZES[obj.size] / 2.0
    # Only evaluate the bounding box on the supersampled grid.
    lo_x, hi_x = max(0, int((cx - r - 1) * SUPERSAMPLE)), min(_SS, int((cx + r + 1) * SUPERSAMPLE) + 1)
    lo_y, hi_y = max(0, int((cy - r - 1) * SUPERSAMPLE)), min(_SS, int((cy + r + 1) * SUPERSAMPLE) + 1)
    # Align the box to whole output pixels.
    lo_x, lo_y = (lo_x // SUPERSAMPLE) * SUPERSAMPLE, (lo_y // SUPERSAMPLE) * SUPERSAMPLE
    hi_x = min(_SS, -(-hi_x // SUPERSAMPLE) * SUPERSAMPLE)
    hi_y = min(_SS, -(-hi_y // SUPERSAMPLE) * SUPERSAMPLE)
    u = (_GRID[None, lo_x:hi_x] - cx) / r
    v = (_GRID[lo_y:hi_y, None] - cy) / r
    u, v = np.broadcast_arrays(u, v)
    m = shape_mask(obj.shape, u, v).astype(np.float32)
    if obj.texture == "striped":
        # Diagonal stripes: the object's colour alternates with white (coverage of colour only;
        # the stripe layer is composited in render()).
        pass
    h, w = m.shape
    small = m.reshape(h // SUPERSAMPLE, SUPERSAMPLE, w // SUPERSAMPLE, SUPERSAMPLE).mean(axis=(1, 3))
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    out[lo_y // SUPERSAMPLE : hi_y // SUPERSAMPLE, lo_x // SUPERSAMPLE : hi_x // SUPERSAMPLE] = small
    return out


def _stripe_layer() -> np.ndarray:
    """Fraction (64x64) of each pixel covered by the light stripes of the 'striped' texture."""
    g = _GRID
    d = (g[None, :] + g[:, None]) / 6.0  # diagonal stripes with a 6 px period along x+y
    light = (np.floor(d) % 2 == 1).astype(np.float32)
    return light.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE).mean(axis=(1, 3))


_STRIPES = _stripe_layer()


def render(scene: Scene) -> np.ndarray:
    """Render a scene to a uint8 array of shape (64, 64, 3)."""
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    img[:] = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    for obj in scene.objects:
        cov = object_coverage(obj)[..., None]
        col = np.array(COLORS[obj.color], dtype=np.float32)
        if obj.texture == "striped":
            light = np.array((250.0, 250.0, 250.0), dtype=np.float32)
            col = col[None, None, :] * (1 - _STRIPES[..., None]) + light * _STRIPES[..., None]
        img = img * (1 - cov) + col * cov
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def object_masks(scene: Scene, threshold: float = 0.5) -> list[np.ndarray]:
    """Boolean ground-truth mask (64x64) of each object, in scene order."""
    return [object_coverage(o) >= threshold for o in scene.objects]


# ----------------------------------------------------------------------------- captions

def describe_object(obj: ObjectSpec, mention_size: bool, mention_position: bool) -> str:
    words = ["a"]
    if mention_size:
        words.append(obj.size)
    if obj.texture != "plain":
        words.append(obj.texture)
    words += [obj.color, obj.shape]
    if mention_position:
        words.append(POSITION_PHRASES[obj.position])
    return " ".join(words)


def caption(scene: Scene) -> str:
    n = len(scene.objects)
    ms = scene.mention_size or (True,) * n
    mp = scene.mention_position or (True,) * n
    parts = [describe_object(o, ms[i], mp[i]) for i, o in enumerate(scene.objects)]
    text = " and ".join(parts)
    if scene.mention_background:
        text += f" on a {scene.background} background"
    return text


# ----------------------------------------------------------------------------- sampling

def sample_scene(
    rng: random.Random,
    *,
    n_objects: int | None = None,
    two_object_prob: float = 0.3,
    drop_prob: float = 0.0,
    shapes: tuple[str, ...] = SHAPES,
    textures: tuple[str, ...] = TEXTURES,
    jitter: bool = True,
) -> Scene:
    """Draw a random scene. `drop_prob` is the chance that the caption leaves out each of
    size, position and background (colour and shape are always stated)."""
    if n_objects is None:
        n_objects = 2 if rng.random() < two_object_prob else 1
    if n_objects == 1:
        positions = [rng.choice(list(POSITIONS))]
    elif n_objects == 2:
        positions = list(rng.choice(POSITION_PAIRS))
    else:
        raise ValueError("ShapesWorld scenes have one or two objects")
    objs = []
    for pos in positions:
        objs.append(
            ObjectSpec(
                shape=rng.choice(shapes),
                color=rng.choice(list(COLORS)),
                size=rng.choice(list(SIZES)),
                position=pos,
                texture=rng.choice(textures),
                dx=rng.uniform(-JITTER, JITTER) if jitter else 0.0,
                dy=rng.uniform(-JITTER, JITTER) if jitter else 0.0,
            )
        )
    bg = rng.choice(list(BACKGROUNDS))
    keep = lambda: rng.random() >= drop_prob  # noqa: E731
    return Scene(
        objects=tuple(objs),
        background=bg,
        mention_size=tuple(keep() for _ in objs),
        mention_position=tuple(keep() for _ in objs),
        mention_background=keep(),
    )


def sample_scenes(n: int, seed: int, **kwargs) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng, **kwargs) for _ in range(n)]


def vocabulary() -> list[str]:
    """Every word the caption grammar can produce (including held-out concepts)."""
    words = {"a", "and", "on", "the", "at", "in", "background"}
    words.update(SHAPES, HELD_OUT_SHAPES, COLORS, BACKGROUNDS, SIZES)
    words.update(t for t in TEXTURES + HELD_OUT_TEXTURES if t != "plain")
    for p in POSITION_PHRASES.values():
        words.update(p.split())
    return sorted(words)


def with_attribute(scene: Scene, index: int, **changes) -> Scene:
    """A copy of `scene` with object `index` changed (used for edits with known answers)."""
    objs = list(scene.objects)
    objs[index] = replace(objs[index], **changes)
    return replace(scene, objects=tuple(objs))


# ----------------------------------------------------------------------------- parsing

_OBJECT_WORDS = {"size": set(SIZES), "color": set(COLORS), "shape": set(SHAPES) | set(HELD_OUT_SHAPES),
                 "texture": {t for t in TEXTURES + HELD_OUT_TEXTURES if t != "plain"}}
_PHRASE_TO_POSITION = {v: k for k, v in POSITION_PHRASES.items()}


def _parse_object(words: list[str]):
    if not words or words[0] not in ("a", "an"):
        return None
    words = words[1:]
    size = texture = position = None
    if words and words[0] in _OBJECT_WORDS["size"]:
        size, words = words[0], words[1:]
    if words and words[0] in _OBJECT_WORDS["texture"]:
        texture, words = words[0], words[1:]
    if len(words) < 2 or words[0] not in _OBJECT_WORDS["color"] or words[1] not in _OBJECT_WORDS["shape"]:
        return None
    color, shape, rest = words[0], words[1], words[2:]
    if rest:
        position = _PHRASE_TO_POSITION.get(" ".join(rest))
        if position is None:
            return None
    return ObjectSpec(shape=shape, color=color, size=size or "small", position=position or "center",
                      texture=texture or "plain"), size is not None, position is not None


def parse_caption(text: str) -> Scene | None:
    """The scene a ShapesWorld caption describes, or None when the text is not in the grammar.

    Attributes the caption leaves out get placeholder values and are marked unmentioned, so the
    evaluator checks only what the prompt asked for."""
    words = text.lower().replace(",", " ").split()
    background, mention_bg = "gray", False
    if len(words) >= 4 and words[-1] == "background" and words[-4:-2] == ["on", "a"] and words[-2] in BACKGROUNDS:
        background, mention_bg, words = words[-2], True, words[:-4]
    parts, cur = [], []
    for w in words:
        if w == "and":
            parts.append(cur)
            cur = []
        else:
            cur.append(w)
    parts.append(cur)
    if not 1 <= len(parts) <= 2:
        return None
    parsed = [_parse_object(p) for p in parts]
    if any(p is None for p in parsed):
        return None
    objs = tuple(p[0] for p in parsed)
    if len(objs) == 2:
        pos = (objs[0].position if parsed[0][2] else None, objs[1].position if parsed[1][2] else None)
        if pos[0] and pos[1] and (pos[0], pos[1]) not in POSITION_PAIRS:
            return None
    return Scene(objects=objs, background=background, mention_size=tuple(p[1] for p in parsed),
                 mention_position=tuple(p[2] for p in parsed), mention_background=mention_bg)
