"""Guidance methods: one file per method, one shared contract (`base.Guidance`).

A guidance object declares which predictions it needs at a step (`branches`), combines them in a
pure `combine`, has a start/stop window over the steps, and undoes any model perturbation it makes
(`patch`). The samplers never see it: the engine folds it into the denoise callable.
`guidance_names()` lists the built-in methods (one file each, registered on import).
"""

from .base import Guidance, StepInfo, get_guidance, guidance_names, load_methods, GUIDANCE_METHODS  # noqa: F401
