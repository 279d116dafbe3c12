"""Controllable Generation Studio: the engine (no Gradio imports here, no import-time side effects)."""

__version__ = "0.1.0"
