"""`python -m studio ...`: every job of the studio without a browser."""

from __future__ import annotations

import argparse
import os
import sys


def _train(args) -> int:
    if args.model == "classifier":  # the noise-aware attribute classifier of classifier guidance (survey §3.1)
        from .toyworld.classifier import main as train_classifier

        return train_classifier(args)
    if args.model != "shapesworld":
        print(f"error: no training recipe for {args.model!r} (known: shapesworld, classifier)", file=sys.stderr)
        return 2
    from .toyworld.train import main

    return main(args)


def quiet_environment() -> None:
    """No network lookups, no progress bars or warnings from the libraries on our output."""
    for k, v in {"HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1",
                 "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
                 "HF_HUB_DISABLE_PROGRESS_BARS": "1"}.items():
        os.environ.setdefault(k, v)
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("transformers").setLevel(logging.ERROR)


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _generate(args) -> int:
    from .pngmeta import read_parameters, save_png
    from .requests import GenerateRequest
    from .session import SessionManager

    if args.from_png:
        params = read_parameters(args.from_png)
        if params.get("type", "generate") != "generate":
            raise CLIError(f"{args.from_png} holds a {params.get('type')!r} request, not a generate request")
        req = GenerateRequest.from_dict(params)
    else:
        if args.prompt is None:
            raise CLIError("--prompt is required (or --from a studio PNG)")
        req = GenerateRequest(
            prompt=args.prompt, model=args.model, negative_prompt=args.negative or "", sampler=args.sampler,
            steps=args.steps, guidance=args.guidance, guidance_scale=args.scale, seed=args.seed,
            width=args.width, height=args.height, eta=args.eta, num_images=args.num_images)
    req.validate()
    out = args.out
    if not out.lower().endswith(".png"):
        raise CLIError(f"--out must be a .png file (got {out})")
    session = SessionManager(allow_pickle=args.allow_pickle)
    res = session.generate(req)
    result = {k: v for k, v in res.metadata.items()}
    paths = [out] if len(res.images) == 1 else [out[:-4] + f"-{i}.png" for i in range(len(res.images))]
    for p, img in zip(paths, res.images):
        save_png(p, img, req.to_json(), result)
    print(f"wrote {', '.join(paths)} ({res.seconds:.2f} s, {res.nfe} network evaluations)")
    return 0


def _eval_adherence(args) -> int:
    import json

    from .session import SessionManager
    from .toyworld.adherence import adherence

    if args.n < 1:
        raise CLIError(f"--n must be at least 1 (got {args.n})")
    if args.steps < 1:
        raise CLIError(f"--steps must be at least 1 (got {args.steps})")
    session = SessionManager(allow_pickle=args.allow_pickle)
    result = adherence(session, model=args.model, guidance=args.guidance, scale=args.scale, n=args.n, seed=args.seed,
                       two_objects=args.two_objects, steps=args.steps, sampler=args.sampler, batch=args.batch)
    print(json.dumps(result))
    return 0


def _eval_guidance(args) -> int:
    """One row per guidance method at its default settings: adherence, saturation, NFE and time per image."""
    import dataclasses
    import json

    from .guidance.base import GUIDANCE_METHODS, guidance_names
    from .session import SessionManager
    from .toyworld.adherence import adherence

    names = guidance_names()
    needs_image = {n for n in names if n.startswith("measurement_")}  # inverse problems: scored by PSNR instead
    chosen = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else \
        [n for n in names if n not in needs_image]
    unknown = [m for m in chosen if m not in names]
    if unknown:
        raise CLIError(f"unknown method(s) {', '.join(unknown)}; available: {', '.join(names)}")
    session = SessionManager(allow_pickle=args.allow_pickle)
    rows = []
    for m in chosen:
        default_scale = {f.name: f.default for f in dataclasses.fields(GUIDANCE_METHODS[m])}["guidance_scale"]
        try:
            r = adherence(session, model=args.model, guidance=m, scale=default_scale, n=args.n, seed=args.seed,
                          two_objects=args.two_objects, steps=args.steps, sampler=args.sampler, batch=args.batch)
        except ValueError as e:  # a method this model cannot run (e.g. no weak checkpoint): say so in its row
            rows.append({"method": m, "error": str(e)})
            continue
        rows.append({"method": m, "scale": default_scale, "all_correct": r["all_correct"], "color": r["color"],
                     "shape": r["shape"], "size": r["size"], "position": r["position"], "background": r["background"],
                     "saturation": r["saturation"], "nfe": r["nfe_per_image"], "seconds": r["seconds_per_image"]})
        if args.json:
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        for r in rows:
            if "error" in r:
                print(json.dumps(r))
        return 0
    cols = ["method", "scale", "all_correct", "color", "shape", "size", "position", "background", "saturation", "nfe", "seconds"]
    print(" | ".join(cols))
    print(" | ".join("---" for _ in cols))
    for r in rows:
        if "error" in r:
            print(f"{r['method']} | error: {r['error']}")
        else:
            print(" | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) and c != "scale" else str(r[c]) for c in cols))
    return 0


def _print_table(rows: list[dict], cols: list[str]) -> None:
    print(" | ".join(cols))
    print(" | ".join("---" for _ in cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols))


def _eval_inversion(args) -> int:
    """Reconstruction PSNR / SSIM / time of each inversion on held-out real ShapesWorld scenes."""
    import json

    from .inversion import METHODS
    from .session import SessionManager
    from .toyworld.inversion_eval import evaluate_inversion

    chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METHODS]
    if unknown:
        raise CLIError(f"unknown inversion method(s) {', '.join(unknown)}; available: {', '.join(METHODS)}")
    if args.n < 1 or args.steps < 1 or args.batch < 1:
        raise CLIError("--n, --steps and --batch must be at least 1")
    session = SessionManager(allow_pickle=args.allow_pickle)
    progress = None if args.json else (lambda m, i, n: print(f"  {m}: {i}/{n}", file=sys.stderr, flush=True))
    rows = evaluate_inversion(session, model=args.model, methods=chosen, n=args.n, seed=args.seed, steps=args.steps,
                              scale=args.scale, batch=args.batch, callback=progress)
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        _print_table(rows, ["method", "psnr", "ssim", "seconds", "nfe"])
    return 0


def _eval_editing(args) -> int:
    """Edits with known answers on held-out real ShapesWorld scenes: success, preservation, time per method."""
    import json

    from .session import SessionManager
    from .toyworld.editing_eval import evaluate_editing

    if args.n < 1 or args.steps < 1:
        raise CLIError("--n and --steps must be at least 1")
    chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        params = json.loads(args.params) if args.params else {}
    except json.JSONDecodeError as e:
        raise CLIError(f"--params is not valid JSON: {e.msg}") from None
    session = SessionManager(allow_pickle=args.allow_pickle)
    progress = None if args.json else (lambda t, i, n: print(f"  {i}/{n} edits ({t})", file=sys.stderr, flush=True))
    rows = evaluate_editing(session, model=args.model, methods=chosen, n=args.n, seed=args.seed, steps=args.steps,
                            scale=args.scale, inversion=args.inversion, params=params, callback=progress)
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        _print_table(rows, ["method", "success", "success_color", "success_shape", "success_size", "preservation_db",
                            "seconds", "oracle_mask"])
    return 0


def _models(args) -> int:
    """The registry, what is loaded where, and the accounted memory."""
    import json as _json

    from .registry import BUILTIN
    from .session import SessionManager, _gib

    session = SessionManager()
    for name in args.load or []:
        session.get(name)
    rows = []
    for spec in BUILTIN.values():
        present = os.path.isdir(spec.location)
        rows.append({"name": spec.name, "source": spec.source, "family": spec.family, "location": spec.location,
                     "available": present, "label": spec.label})
    status = session.status()
    if args.json:
        print(_json.dumps({"registry": rows, "loaded": status, "device": session.device,
                           "accounted_bytes": session.accounted(), "budget_bytes": session.memory_budget}))
        return 0
    print("registry:")
    for r in rows:
        print(f"  {r['name']:<18} {r['source']:<6} {r['family'] or '-':<17} {'ok' if r['available'] else 'MISSING':<8} {r['location']}")
    print(f"policy: {'hosted' if session.policy.hosted else 'local'}; model roots: {', '.join(session.policy.model_roots) or 'any'}; "
          f"pickle checkpoints: {'allowed' if session.policy.allow_pickle else 'refused'}")
    print(f"device: {session.device} ({session.dtype}); budget {_gib(session.memory_budget)}, "
          f"offload budget {_gib(session.offload_budget)}")
    print("loaded:" + ("" if status else " none"))
    for st in status:
        print(f"  {st['name']:<18} {st['where']:<8} {_gib(st['bytes'])}{'  loras: ' + ', '.join(st['loras']) if st['loras'] else ''}")
    print(f"accounted: device {_gib(session.accounted('device'))}, offload {_gib(session.accounted('offload'))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m studio", description="Controllable Generation Studio")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a shipped model by its recipe")
    t.add_argument("model", help="shapesworld | classifier (the noise-aware classifier of classifier guidance)")
    t.add_argument("--stage", default="text-unet", choices=["text-unet", "flow", "weak", "from-flow"],
                   help="shapesworld only; weak: AutoGuidance's weak UNet, trained against the shipped text encoder; "
                        "from-flow: the diffusion UNet re-derived from the flow twin (its weights and predictions)")
    t.add_argument("--minutes", type=float, default=None)
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--export", action="store_true", help="write the EMA weights (classifier: the weights) to assets/models/")
    t.add_argument("--eval", type=int, default=0,
                   help="evaluate adherence on N prompts after training (classifier: accuracy on N held-out scenes)")
    t.add_argument("--threads", type=int, default=0)
    t.add_argument("--device", default=None, help="shapesworld: cpu (default) or cuda")
    t.add_argument("--batch-size", type=int, default=None, help="shapesworld: images per step (recipe default 64)")
    t.add_argument("--workers", type=int, default=0, help="shapesworld: processes rendering scenes ahead of the step")
    t.add_argument("--bf16", action="store_true", help="shapesworld: bf16 autocast (for GPUs)")
    t.add_argument("--outlier-penalty", type=float, default=None,
                   help="shapesworld: weight of the decoder feature-norm outlier penalty (0: off)")
    t.add_argument("--cell-weight-max", type=float, default=None,
                   help="shapesworld: cap of the spatially adaptive loss weight (1: off)")
    t.add_argument("--cell-weight-power", type=float, default=None,
                   help="shapesworld: power of the cell error ratio in the adaptive loss weight (default 1)")
    t.add_argument("--freeze-text", action="store_true",
                   help="shapesworld text-unet: keep the shipped text encoder frozen (UNet-only fine-tune)")
    t.add_argument("--lr", type=float, default=None,
                   help="shapesworld: peak learning rate (recipe 6e-4; cosine to a quarter of it by step 20,000)")
    t.add_argument("--min-snr-gamma", type=float, default=None,
                   help="shapesworld text-unet/weak: cap of the x0-error weight clamp(SNR, 1, gamma) (recipe 5; "
                        "a large value keeps the low-noise steps' full weight, the plain v-loss)")
    t.set_defaults(func=_train)

    g = sub.add_parser("generate", help="text to image")
    g.add_argument("--model", default="shapesworld", help="registered name, local diffusers folder or hub id")
    g.add_argument("--prompt")
    g.add_argument("--negative", default="")
    g.add_argument("--sampler", default=None, help="ddim | euler | euler_a | dpmpp_2m | flow_euler | flow_heun")
    g.add_argument("--steps", type=int, default=25)
    g.add_argument("--guidance", default="cfg")
    g.add_argument("--scale", type=float, default=5.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--eta", type=float, default=0.0)
    g.add_argument("--num-images", type=int, default=1)
    g.add_argument("--from", dest="from_png", default=None, help="re-run the request stored in a studio PNG")
    g.add_argument("--allow-pickle", action="store_true", help="allow pickle checkpoints (runs their code)")
    g.add_argument("--out", required=True)
    g.set_defaults(func=_generate)

    m = sub.add_parser("models", help="list the registry, what is loaded where, and the accounted memory")
    m.add_argument("--load", nargs="*", help="load these models first (to see their memory)")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=_models)

    e = sub.add_parser("eval", help="measure a model (prints one JSON line)")
    esub = e.add_subparsers(dest="eval_kind", required=True)
    a = esub.add_parser("adherence", help="fraction of generated images that show their ShapesWorld prompt")
    a.add_argument("--model", default="shapesworld", help="a ShapesWorld model: registered name or local folder")
    a.add_argument("--guidance", default="cfg")
    a.add_argument("--scale", type=float, default=5.0)
    a.add_argument("--n", type=int, default=256, help="number of prompts (one image each)")
    a.add_argument("--seed", type=int, default=0, help="derives the prompts and every image's noise")
    a.add_argument("--two-objects", action="store_true", help="two-object prompts instead of one-object prompts")
    a.add_argument("--steps", type=int, default=25)
    a.add_argument("--sampler", default=None, help="ddim | euler | euler_a | dpmpp_2m | flow_euler | flow_heun")
    a.add_argument("--batch", type=int, default=32, help="images per batched run")
    a.add_argument("--allow-pickle", action="store_true", help="allow pickle checkpoints (runs their code)")
    a.set_defaults(func=_eval_adherence)

    gd = esub.add_parser("guidance", help="every guidance method at its defaults: adherence, saturation, NFE, time")
    gd.add_argument("--model", default="shapesworld")
    gd.add_argument("--n", type=int, default=128)
    gd.add_argument("--seed", type=int, default=0)
    gd.add_argument("--steps", type=int, default=25)
    gd.add_argument("--sampler", default=None)
    gd.add_argument("--batch", type=int, default=32)
    gd.add_argument("--two-objects", action="store_true")
    gd.add_argument("--methods", default="", help="comma-separated subset (file names in studio/guidance/)")
    gd.add_argument("--json", action="store_true", help="one JSON object per line")
    gd.add_argument("--allow-pickle", action="store_true")
    gd.set_defaults(func=_eval_guidance)

    iv = esub.add_parser("inversion", help="reconstruction PSNR / SSIM / time of each inversion on held-out real scenes")
    iv.add_argument("--model", default="shapesworld")
    iv.add_argument("--methods", default="ddim,null_text,negative_prompt")
    iv.add_argument("--n", type=int, default=64, help="held-out real scenes")
    iv.add_argument("--seed", type=int, default=0)
    iv.add_argument("--steps", type=int, default=25)
    iv.add_argument("--scale", type=float, default=5.0, help="CFG scale of reconstruction")
    iv.add_argument("--batch", type=int, default=16)
    iv.add_argument("--json", action="store_true", help="one JSON object per line: method, psnr, ssim, seconds, ...")
    iv.add_argument("--allow-pickle", action="store_true")
    iv.set_defaults(func=_eval_inversion)

    ed = esub.add_parser("editing", help="edits with known answers (colour, shape, size swaps): success, preservation, time")
    ed.add_argument("--model", default="shapesworld")
    ed.add_argument("--methods", default="", help="comma-separated subset of studio/editing's methods (default: all)")
    ed.add_argument("--n", type=int, default=16, help="edits per task (colour, shape, size)")
    ed.add_argument("--seed", type=int, default=0)
    ed.add_argument("--steps", type=int, default=25)
    ed.add_argument("--scale", type=float, default=5.0)
    ed.add_argument("--inversion", default="negative_prompt", help="how the real scenes are inverted first")
    ed.add_argument("--params", default="", help='per-method parameters, JSON: {"sdedit": {"strength": 0.6}}')
    ed.add_argument("--json", action="store_true", help="one JSON object per line")
    ed.add_argument("--allow-pickle", action="store_true")
    ed.set_defaults(func=_eval_editing)
    return p


def main(argv: list[str] | None = None) -> int:
    quiet_environment()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # anything else: still one line, the type tells a developer where to look
        if os.environ.get("STUDIO_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
