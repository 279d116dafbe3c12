"""Speed of one default ShapesWorld generation on this machine: `python -m bench.shapesworld`.

The target is one 64x64 image (25 DDIM steps, CFG 5, so 50 network evaluations) in at most 1 s on
the CPU. Loading is timed once; then one warm-up run and the median of `--runs` timed runs, all
in this process. The last line, `target_ratio=<seconds / target>`, is at most 1 when the target is met.
"""

from __future__ import annotations

import argparse
import statistics
import time

TARGET_SECONDS = 1.0
PROMPT = "a large red circle on the left on a gray background"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.shapesworld", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="shapesworld")
    p.add_argument("--runs", type=int, default=7, help="timed runs after the warm-up (median reported)")
    args = p.parse_args(argv)
    if args.runs < 5:
        p.error("--runs must be at least 5")

    from studio.cli import quiet_environment

    quiet_environment()
    import torch

    from studio.engine import generate
    from studio.requests import GenerateRequest
    from studio.session import SessionManager

    t0 = time.perf_counter()
    bundle = SessionManager().get(args.model)
    load_seconds = time.perf_counter() - t0
    req = GenerateRequest(prompt=PROMPT, model=args.model, sampler="ddim", steps=25, guidance="cfg",
                          guidance_scale=5.0, seed=0, num_images=1)
    generate(bundle, req)  # warm-up: first-call allocations and kernel selection
    times, nfe = [], 0
    for _ in range(args.runs):
        t = time.perf_counter()
        nfe = generate(bundle, req).nfe
        times.append(time.perf_counter() - t)
    seconds = statistics.median(times)
    print(f"model={args.model} device={bundle.device} dtype={str(bundle.dtype).replace('torch.', '')} "
          f"threads={torch.get_num_threads()}")
    print(f"load_seconds={load_seconds:.3f}")
    print(f"runs={args.runs} min={min(times):.4f} max={max(times):.4f} nfe={nfe}")
    print(f"seconds_per_image={seconds:.4f}")
    print(f"target_ratio={seconds / TARGET_SECONDS:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
