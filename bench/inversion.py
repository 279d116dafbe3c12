"""Real-image inversion on the shipped ShapesWorld model (survey §8): reconstruction PSNR and time per image.

    python -m bench.inversion [--model shapesworld] [--images 3] [--steps 25] [--scale 5.0] [--seed 2027]

Renders `--images` scenes that the model never saw (`toyworld.world.sample_scenes` with a seed other
than the training data's), captions them, and inverts each with

    ddim             DDIM inversion (§8.1), reconstructed with CFG at --scale against the empty prompt;
    negative_prompt  the same inversion, the source prompt as CFG's unconditional branch (§8.3);
    null_text_fixed  null-text inversion (§8.2), 10 Adam updates at every step;
    null_text_early  the same with the recipe's early stop (loss < epsilon + 1e-3 i / N, epsilon = 1e-5).

ShapesWorld's codec is exact, so PSNR (pixels in [-1, 1], peak-to-peak 2) measures the inversion alone.
A line per image and method: inversion and reconstruction seconds, PSNR, network forwards, and for
null-text the Adam updates used; then the means per method. The null-text runs of an image alternate
their order from image to image, so that a drift in the machine's load does not favour one. The last
line is `speedup=<fixed / early-stop inversion time>` (summed over the images).

Whatever the model's training state: an undertrained model gives lower PSNRs, the same comparison.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

METHODS = ("ddim", "negative_prompt", "null_text_fixed", "null_text_early")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="shapesworld")
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--scale", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=2027, help="scene seed (the training data uses 1234)")
    args = ap.parse_args(argv)

    from studio.cli import quiet_environment

    quiet_environment()
    from studio.inversion import image_tensor, invert, psnr, reconstruct
    from studio.session import SessionManager
    from studio.toyworld import world

    bundle = SessionManager(device="cpu").get(args.model)
    print(f"model={args.model} images={args.images} steps={args.steps} scale={args.scale} seed={args.seed} "
          f"threads={os.environ.get('OMP_NUM_THREADS', 'default')}")
    settings = {"ddim": ("ddim", {}), "negative_prompt": ("negative_prompt", {}),
                "null_text_fixed": ("null_text", {"early_stop": False}),
                "null_text_early": ("null_text", {"early_stop": True})}
    rows = {m: [] for m in METHODS}
    for k, scene in enumerate(world.sample_scenes(args.images, seed=args.seed)):
        image, prompt = world.render(scene), world.caption(scene)
        target = image_tensor(image)
        print(f"image {k}: {prompt}")
        order = list(METHODS) if k % 2 == 0 else ["ddim", "negative_prompt", "null_text_early", "null_text_fixed"]
        for name in order:
            method, kw = settings[name]
            t = time.perf_counter()
            r = invert(bundle, image, prompt, method, steps=args.steps, guidance_scale=args.scale, **kw)
            t_inv = time.perf_counter() - t
            rec = reconstruct(bundle, r)
            p = psnr(bundle.decode(rec.latents).float().cpu(), target)
            rows[name].append({"invert": t_inv, "reconstruct": rec.seconds, "psnr": p, "nfe": r.nfe,
                               "updates": sum(r.inner_steps)})
            extra = f" updates={sum(r.inner_steps)}/{10 * args.steps}" if method == "null_text" else ""
            print(f"  {name:16s} invert={t_inv:6.2f}s reconstruct={rec.seconds:5.2f}s psnr={p:6.2f} dB "
                  f"nfe={r.nfe}+{rec.nfe}{extra}")
    print("mean per image:")
    for name in METHODS:
        rs = rows[name]
        mean = lambda key: statistics.fmean(r[key] for r in rs)  # noqa: E731
        extra = f" updates={mean('updates'):.1f}" if name.startswith("null_text") else ""
        print(f"  {name:16s} time={mean('invert') + mean('reconstruct'):6.2f}s (invert {mean('invert'):.2f}s) "
              f"psnr={mean('psnr'):6.2f} dB{extra}")
    fixed = sum(r["invert"] for r in rows["null_text_fixed"])
    early = sum(r["invert"] for r in rows["null_text_early"])
    print(f"speedup={fixed / early:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
