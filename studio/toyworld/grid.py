"""A contact sheet of generated ShapesWorld images with their prompts and the evaluator's verdict.

    python -m studio.toyworld.grid --model shapesworld --out assets/examples/shapesworld-grid.png --n 16 --seed 0

Prompts alternate between one- and two-object scenes with every attribute stated; images are drawn in
one batched run (a noise seed per image, as the adherence evaluation does), upscaled with nearest
neighbour so single pixels stay visible, and captioned with the prompt and a check mark (green) or a
cross (red) from the evaluator's `all_correct`.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from . import adherence, evaluator, world

PAD = 8  # pixels around and between cells
LINE_GAP = 2
MARK_SIZE = 12
BACKGROUND = (255, 255, 255)
TEXT = (30, 30, 30)
GOOD = (30, 150, 60)
BAD = (200, 40, 40)


def mixed_scenes(n: int, seed: int) -> list[world.Scene]:
    """n scenes, one object and two objects in turn, every attribute stated in the caption."""
    rng = random.Random(adherence.derived_seed(seed, 2))
    return [world.sample_scene(rng, n_objects=1 + i % 2, drop_prob=0.0, jitter=False) for i in range(n)]


def wrap_text(text: str, font, width: int, draw: ImageDraw.ImageDraw) -> list[str]:
    """Greedy word wrap so that every line fits in `width` pixels (a too-long word gets a line of its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def draw_mark(draw: ImageDraw.ImageDraw, x: int, y: int, correct: bool) -> None:
    """A check mark or a cross drawn with lines (no font needs to hold the glyph)."""
    s = MARK_SIZE
    if correct:
        draw.line([(x + 1, y + s * 0.55), (x + s * 0.4, y + s - 1), (x + s - 1, y + 1)], fill=GOOD, width=3)
    else:
        draw.line([(x + 1, y + 1), (x + s - 1, y + s - 1)], fill=BAD, width=3)
        draw.line([(x + 1, y + s - 1), (x + s - 1, y + 1)], fill=BAD, width=3)


def make_grid(images: Sequence[np.ndarray], prompts: Sequence[str], correct: Sequence[bool], *, scale: int = 3,
              columns: int | None = None) -> Image.Image:
    """Lay images out in a grid, each upscaled x`scale` (nearest) over its mark and wrapped prompt."""
    if not (len(images) == len(prompts) == len(correct)) or not images:
        raise ValueError("need as many prompts and verdicts as images, and at least one image")
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    h, w = images[0].shape[:2]
    cell_w, img_h = w * scale, h * scale
    line_h = int(font.getbbox("Ag")[3]) + LINE_GAP
    text_w = cell_w - MARK_SIZE - 4
    wrapped = [wrap_text(p, font, text_w, measure) for p in prompts]
    text_h = max(MARK_SIZE, max(len(lines) for lines in wrapped) * line_h)
    cols = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    cell_h = img_h + 4 + text_h
    sheet = Image.new("RGB", (PAD + cols * (cell_w + PAD), PAD + rows * (cell_h + PAD)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for k, (img, lines, ok) in enumerate(zip(images, wrapped, correct)):
        x = PAD + (k % cols) * (cell_w + PAD)
        y = PAD + (k // cols) * (cell_h + PAD)
        sheet.paste(Image.fromarray(np.asarray(img, dtype=np.uint8)).resize((cell_w, img_h), Image.NEAREST), (x, y))
        draw_mark(draw, x, y + img_h + 4, bool(ok))
        for j, line in enumerate(lines):
            draw.text((x + MARK_SIZE + 4, y + img_h + 4 + j * line_h), line, fill=TEXT, font=font)
    return sheet


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m studio.toyworld.grid", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="shapesworld")
    p.add_argument("--out", default="assets/examples/shapesworld-grid.png")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", default="cfg")
    p.add_argument("--scale", type=float, default=5.0, help="guidance scale")
    p.add_argument("--sampler", default=None)
    p.add_argument("--upscale", type=int, default=3, help="nearest-neighbour upscaling factor")
    args = p.parse_args(argv)

    from ..cli import quiet_environment

    quiet_environment()
    try:
        if not 1 <= args.n <= 64:
            raise ValueError(f"--n must be between 1 and 64 (got {args.n})")
        if not args.out.lower().endswith(".png"):
            raise ValueError(f"--out must be a .png file (got {args.out})")
        if args.upscale < 1:
            raise ValueError(f"--upscale must be at least 1 (got {args.upscale})")
        from ..session import SessionManager

        bundle = SessionManager().get(args.model)
        scenes = mixed_scenes(args.n, args.seed)
        prompts = [world.caption(s) for s in scenes]
        run = adherence.generate_for_prompts(bundle, prompts, adherence.image_seeds(args.seed, args.n),
                                             guidance=args.guidance, scale=args.scale, steps=args.steps,
                                             sampler=args.sampler)
        correct = [evaluator.score(img, s)["all_correct"] for img, s in zip(run.images, scenes)]
        sheet = make_grid(run.images, prompts, correct, scale=args.upscale)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        sheet.save(args.out)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({sum(correct)}/{args.n} all correct, {run.seconds:.2f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
