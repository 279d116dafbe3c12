"""PNG files that carry their request: a text chunk named `parameters` holds the request as JSON."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image, PngImagePlugin


def save_png(path_or_file, image: np.ndarray, request_json: str, result: dict | None = None) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", request_json)
    if result:
        info.add_text("studio-result", json.dumps(result, sort_keys=True))
    Image.fromarray(image).save(path_or_file, format="PNG", pnginfo=info)


def read_parameters(path_or_file) -> dict:
    """The request stored in a studio PNG. Raises ValueError with one clear line when it has none."""
    try:
        with Image.open(path_or_file) as im:
            im.load()
            text = im.info.get("parameters")
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {getattr(path_or_file, 'name', path_or_file)}: {e}") from None
    if not text:
        raise ValueError("this PNG carries no studio parameters")
    try:
        params = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError("this PNG's parameters are not valid JSON") from None
    if not isinstance(params, dict):
        raise ValueError("this PNG's parameters are not a request")
    return params
