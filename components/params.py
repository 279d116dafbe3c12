"""Per-method parameter overrides typed by the user as JSON, shared by the comparison tabs."""

from __future__ import annotations

import json


def parse_method_params(text: str, example: str = '{"apg": {"eta": 0.5}}') -> dict:
    """'{"method": {"param": value}, ...}' -> dict; empty text -> {}; anything else a ValueError for the UI."""
    text = (text or "").strip()
    if not text:
        return {}
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"method parameters are not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    if not isinstance(d, dict) or not all(isinstance(v, dict) for v in d.values()):
        raise ValueError(f"method parameters must look like {example}")
    return d
