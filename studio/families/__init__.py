"""Model families: prompt encoding, the denoiser in our parameterization, and the latent codec.

Each family turns a diffusers folder (a hub id on a user's machine, a local folder, or a shipped
asset) into a `Bundle` that the engine drives. Only the session manager calls `load`.
"""

from .base import Bundle, Conditioning, load_bundle, detect_family, FAMILIES  # noqa: F401
