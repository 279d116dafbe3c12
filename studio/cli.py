"""`python -m studio ...`: every job of the studio without a browser."""

from __future__ import annotations

import argparse
import os
import sys


def _train(args) -> int:
    if args.model != "shapesworld":
        print(f"error: no training recipe for {args.model!r} (known: shapesworld)", file=sys.stderr)
        return 2
    from .toyworld.train import main

    return main(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m studio", description="Controllable Generation Studio")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a shipped model by its recipe")
    t.add_argument("model", help="shapesworld")
    t.add_argument("--stage", default="text-unet", choices=["text-unet", "flow"])
    t.add_argument("--minutes", type=float, default=None)
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--export", action="store_true", help="write the EMA weights to assets/models/")
    t.add_argument("--eval", type=int, default=0, help="evaluate adherence on N prompts after training")
    t.add_argument("--threads", type=int, default=0)
    t.set_defaults(func=_train)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    args = build_parser().parse_args(argv)
    return args.func(args)
