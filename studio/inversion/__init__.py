"""Inversion (survey Part III, §8): from a clean latent back to the noise that reproduces it."""
