"""Prompt adherence of a ShapesWorld model: generate from captions with known answers, read them back.

Prompts come from `world.sample_scenes` with every attribute stated (colour, shape, size, position,
background), images come from the studio's own sampling loop (`engine.generate`, so every sampler and
guidance method is measured exactly as the studio runs it), and `evaluator.evaluate` checks each image
against its scene. The split keeps the scorer testable without a model:

    scenes = prompt_scenes(n, seed)                        # what to ask for
    images, seconds, nfe = generate_for_prompts(...)       # what the model drew
    score_prompts(images, scenes)                          # how much of it is right

Everything derives from `seed`: the scenes and one noise seed per image, each depending only on
`seed` and the image's index, so a result does not depend on the batch size (up to float rounding).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from . import evaluator, world

# Streams of the seed sequence: scenes and image noise must not share random numbers.
_SCENE_STREAM = 0
_NOISE_STREAM = 1
_MAX_BATCH = 64  # GenerateRequest.num_images allows at most this many images per run


def derived_seed(seed: int, stream: int) -> int:
    """One 63-bit seed for `stream`, derived from `seed` (numpy SeedSequence: independent streams)."""
    return int(np.random.SeedSequence([int(seed), stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


def image_seeds(seed: int, n: int) -> list[int]:
    """Noise seed of each of n images; image k's seed depends only on (seed, k)."""
    state = np.random.SeedSequence([int(seed), _NOISE_STREAM]).generate_state(n, dtype=np.uint64)
    return [int(s >> 1) for s in state]  # below 2^63, as GenerateRequest requires of seeds


def prompt_scenes(n: int, seed: int = 0, *, two_objects: bool = False) -> list[world.Scene]:
    """n scenes whose captions state every attribute (no dropped words, no jitter)."""
    return world.sample_scenes(n, derived_seed(seed, _SCENE_STREAM), n_objects=2 if two_objects else 1,
                               drop_prob=0.0, jitter=False)


def score_prompts(images: Sequence[np.ndarray], scenes: Sequence[world.Scene]) -> dict:
    """Evaluator fractions (per attribute and all_correct), mean saturation and n, rounded to 4 places."""
    res = evaluator.evaluate(images, scenes)
    return {k: (v if k == "n" else round(float(v), 4)) for k, v in res.items()}


def generate_for_prompts(bundle, prompts: Sequence[str], seeds: Sequence[int], *, guidance: str = "cfg",
                         scale: float = 5.0, steps: int = 25, sampler: Optional[str] = None,
                         guidance_params: Optional[dict[str, Any]] = None, negative_prompt: str = "",
                         should_stop=None):
    """One batched run of the engine with a prompt and a noise seed per image.

    Image k equals a single-image `engine.generate` of prompts[k] with seed seeds[k] (same request
    otherwise) for deterministic samplers, up to float rounding of the batched forward pass.
    Returns the engine's RunResult."""
    from ..engine import generate
    from ..requests import GenerateRequest

    prompts, seeds = list(prompts), [int(s) for s in seeds]
    if not prompts:
        raise ValueError("no prompts to generate")
    req = GenerateRequest(prompt=prompts[0], model=bundle.name or "shapesworld", negative_prompt=negative_prompt,
                          sampler=sampler, steps=steps, guidance=guidance, guidance_scale=scale,
                          guidance_params=dict(guidance_params or {}), seed=seeds[0] if seeds else 0,
                          num_images=len(prompts))
    return generate(bundle, req, prompts=prompts, seeds=seeds, should_stop=should_stop)


def _bundle_of(session_or_bundle, model: str):
    """A Bundle as is; a SessionManager's bundle for `model`; None: a fresh session's."""
    from ..families.base import Bundle

    if isinstance(session_or_bundle, Bundle):
        return session_or_bundle, None
    if session_or_bundle is None:
        from ..session import SessionManager

        session_or_bundle = SessionManager()
    return session_or_bundle.get(model), getattr(session_or_bundle, "should_stop", None)


def adherence(session_or_bundle=None, *, model: str = "shapesworld", guidance: str = "cfg", scale: float = 5.0,
              n: int = 256, seed: int = 0, two_objects: bool = False, steps: int = 25, sampler: Optional[str] = None,
              batch: int = 32, guidance_params: Optional[dict[str, Any]] = None) -> dict:
    """Fraction of n generated images that show their prompt (per attribute and all at once).

    Returns the evaluator's fractions (color, shape, size, position, background, texture, count,
    all_correct), the mean HSV `saturation`, `n`, the sampling cost (`seconds_per_image`,
    `nfe_per_image`; scoring is not timed) and the settings that produced them."""
    if n < 1:
        raise ValueError(f"n must be at least 1 (got {n})")
    if not 1 <= batch <= _MAX_BATCH:
        raise ValueError(f"batch must be between 1 and {_MAX_BATCH} (got {batch})")
    if not 0 <= int(seed) < 2**63:
        raise ValueError(f"seed must be a non-negative integer below 2^63 (got {seed})")
    bundle, should_stop = _bundle_of(session_or_bundle, model)
    if not bundle.family.startswith("shapesworld"):
        raise ValueError(f"adherence needs a ShapesWorld model (got {bundle.name or model!r} of family {bundle.family!r})")
    scenes = prompt_scenes(n, seed, two_objects=two_objects)
    prompts = [world.caption(s) for s in scenes]
    seeds = image_seeds(seed, n)
    images: list[np.ndarray] = []
    seconds, nfe, used_sampler = 0.0, 0, sampler
    for start in range(0, n, batch):
        run = generate_for_prompts(bundle, prompts[start:start + batch], seeds[start:start + batch],
                                   guidance=guidance, scale=scale, steps=steps, sampler=sampler,
                                   guidance_params=guidance_params, should_stop=should_stop)
        images.extend(run.images)
        seconds += run.seconds
        nfe += run.nfe * len(run.images)  # RunResult.nfe already counts per image
        used_sampler = run.metadata.get("sampler", sampler)
    out = score_prompts(images, scenes)
    out.update(seconds_per_image=round(seconds / n, 4), nfe_per_image=nfe / n, model=bundle.name or model,
               guidance=guidance, scale=scale, steps=steps, sampler=used_sampler, seed=int(seed),
               two_objects=bool(two_objects))
    return out
