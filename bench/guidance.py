"""Time per image of every guidance method relative to CFG, on the same model in one run.

    python -m bench.guidance [--model shapesworld] [--steps 15] [--repeats 5] [--scale 5.0]

Loads the model through the session manager (default: the shipped ShapesWorld, whatever its training
state: speed does not depend on the weights), then runs rounds of
    cfg, m_1, cfg, m_2, ..., cfg, m_k, cfg
(same prompt, seed, sampler, steps and scale), so every method run sits between two CFG runs. A
method's ratio is the median over rounds of its time over the mean of its two neighbouring CFG runs;
"cfg" itself is measured the same way (its ratio shows the noise). Lines `ratio_<method>=<x>` for every
registered method (studio.guidance.guidance_names()), then the NFE per image of each.

Method settings: guidance_scale = --scale, except CFG++ (its lambda lies in [0, 1]: 0.6). AutoGuidance
needs the model's weak checkpoint (modules["unet_weak"]); a model without one gets a copy of its UNet as
a stand-in for the timing only (the same architecture costs the same), removed afterwards. Adaptive
Guidance switches to one branch once the cosine of eps_cond and eps_uncond reaches its threshold: the
bench prints the cosine of every step of a probe run and the step where the default threshold is first
reached (or that it never is: then `adaptive` runs CFG throughout). It also measures
`adaptive_later`, with a threshold that the run first reaches at the step nearest the middle among
the steps whose cosine exceeds every earlier one; when the first step's cosine is the largest (eps
predictions agree most at pure noise), every reachable threshold switches at step 0, and the bench
says so instead.
Targets: pag <= 1.6, adaptive < 1.0.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from studio.cli import quiet_environment  # noqa: E402

quiet_environment()

PROMPT = "a small red circle at the top on a white background"
PARAMS = {"cfg_pp": {"guidance_scale": 0.6}}


def _truth_image() -> str:
    """A rendered ShapesWorld scene of PROMPT's kind, saved as the measurement methods' ground truth."""
    import tempfile

    from PIL import Image

    from studio.toyworld.world import render, sample_scene

    path = os.path.join(tempfile.mkdtemp(prefix="bench-guidance-"), "truth.png")
    Image.fromarray(render(sample_scene(random.Random(0), n_objects=1))).save(path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="shapesworld")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--scale", type=float, default=5.0)
    args = ap.parse_args(argv)

    from studio.engine import generate
    from studio.guidance import get_guidance, guidance_names
    from studio.requests import GenerateRequest
    from studio.session import SessionManager

    bundle = SessionManager().get(args.model)
    notes = [f"model={args.model} steps={args.steps} repeats={args.repeats} scale={args.scale} device={bundle.device}"]

    def build(name, **extra):
        params = {"guidance_scale": args.scale, **PARAMS.get(name, {}), **extra}
        return get_guidance(name.removesuffix("_later"), **params)

    def run(name, **extra):
        g = build(name, **extra)
        t = time.perf_counter()
        r = generate(bundle, GenerateRequest(PROMPT, model=args.model, steps=args.steps, seed=0), guidance=g)
        return time.perf_counter() - t, r.nfe, g

    added_weak = bundle.modules.get("unet_weak") is None
    if added_weak:
        bundle.modules["unet_weak"] = copy.deepcopy(bundle.modules["unet"])
        notes.append("autoguidance: the model has no weak checkpoint; a copy of its UNet stands in (timing only)")
    try:
        methods = guidance_names()
        extra = {name: {} for name in methods}
        truth = _truth_image()  # the inverse-problem methods (§6) measure a ground-truth scene
        for name in methods:
            if name.startswith("measurement_"):
                extra[name] = {"image": truth, "guidance_scale": 1.0}
        _, _, probe = run("adaptive", threshold=1.0)  # never switches: the cosine of every step
        gammas = probe.similarities
        _, _, run_default = run("adaptive")  # where the default run switches (its min_signal rule included)
        default, switched = run_default.threshold, run_default.converged
        notes.append("adaptive: cosine per step " + " ".join(f"{g:.6f}" for g in gammas))
        if switched:
            notes.append(f"adaptive: threshold {default} switches to one branch after step "
                         f"{len(run_default.similarities) - 1} of {len(gammas)}")
        else:
            notes.append(f"adaptive: threshold {default} never reached: adaptive runs CFG throughout")
        records = [k for k in range(1, len(gammas)) if gammas[k] > max(gammas[:k])]
        if records:
            k = min(records, key=lambda k: abs(k - len(gammas) // 2))
            notes.append(f"adaptive_later: threshold {gammas[k]:.8f}, first reached at step {k}")
            methods.append("adaptive_later")
            extra["adaptive_later"] = {"threshold": gammas[k]}
        else:
            notes.append("adaptive_later: not measured; the first step's cosine is the largest (at zero terminal "
                         "SNR its alpha is 0 and the cosine 1, a step on which min_signal forbids the switch), so "
                         "this rule finds no later threshold")

        run("cfg"), [run(m, **extra[m]) for m in methods]  # warm-up
        ratios = {m: [] for m in methods}
        nfe = {}
        for _ in range(args.repeats):
            before, _, _ = run("cfg")
            for m in methods:
                t, nfe[m], _ = run(m, **extra[m])
                after, nfe["cfg"], _ = run("cfg")
                ratios[m].append(t / ((before + after) / 2))
                before = after
    finally:
        if added_weak:
            bundle.modules.pop("unet_weak", None)

    for line in notes:
        print(line)
    for m in methods:
        print(f"ratio_{m}={statistics.median(ratios[m]):.3f}")
    print("nfe_per_image " + " ".join(f"{m}={nfe[m]}" for m in methods))
    verdict = {m: statistics.median(ratios[m]) for m in ("pag", "adaptive", "adaptive_later") if m in ratios}
    print(f"targets: pag<=1.6 {'ok' if verdict['pag'] <= 1.6 else 'MISSED'}; "
          + "; ".join(f"{m}<1.0 {'ok' if r < 1.0 else 'MISSED'}" for m, r in verdict.items() if m != "pag"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
