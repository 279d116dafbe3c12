"""Uploaded images -> the model's input size, with every conversion spelled out for the UI.

    img, note = prepare_image(upload, (64, 64), fit="crop")
    # note: "RGBA 300x200; converted to RGB on white; centre-cropped to 200x200; resized to 64x64 (Lanczos)"

`fit` is the user's visible choice of how a different aspect ratio becomes the model's:
"crop" (centre crop to the target aspect, then resize), "resize" (stretch) or "pad" (letterbox
with the border colour, then resize). Any mode PIL reads is accepted (L, LA, P, RGBA, I;16, CMYK, ...);
transparency is composited on white. Unreadable or empty files raise ValueError with a message meant
for the user.
"""

from __future__ import annotations

import os
from typing import Any, Union

import numpy as np

FITS = ("crop", "resize", "pad")
MAX_PIXELS = 64_000_000  # refuse decompression bombs before decoding


def load_image(source: Union[str, os.PathLike, np.ndarray, Any]):
    """A PIL image from a path, an array (HxW, HxWx3, HxWx4; uint8 or float in [0, 1]) or a PIL image."""
    from PIL import Image, UnidentifiedImageError

    if source is None:
        raise ValueError("no image given: upload one first")
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        a = source
        if a.size == 0:
            raise ValueError("the image is empty")
        if a.dtype != np.uint8:
            if not np.isfinite(a).all():
                raise ValueError("the image contains NaN or infinite values")
            a = np.clip(a * (255.0 if a.max() <= 1.0 else 1.0), 0, 255).round().astype(np.uint8)
        if a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3, 4)):
            return Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[2] == 1 else a)
        raise ValueError(f"an image array must be HxW, HxWx3 or HxWx4 (got shape {a.shape})")
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise ValueError(f"image file not found: {os.path.basename(path)}")
    try:
        img = Image.open(path)
        if img.width * img.height > MAX_PIXELS:
            raise ValueError(f"the image is too large ({img.width}x{img.height} pixels)")
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read {os.path.basename(path)} as an image ({type(e).__name__}): "
                         "the file is corrupt or not an image") from None
    return img


def _to_rgb(img) -> tuple[Any, str]:
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img, ""
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB"), f"{mode} -> RGB on white"
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo) * 255.0
        return Image.fromarray(a.round().astype(np.uint8)).convert("RGB"), f"{mode} -> 8-bit RGB (min-max scaled)"
    return img.convert("RGB"), f"{mode} -> RGB"


def prepare_image(source, size: tuple[int, int], fit: str = "crop") -> tuple[np.ndarray, str]:
    """(uint8 HxWx3 at `size` = (height, width), a one-line note of what was done)."""
    from PIL import Image

    if fit not in FITS:
        raise ValueError(f"unknown fit {fit!r}; choose one of {', '.join(FITS)}")
    h, w = int(size[0]), int(size[1])
    img = load_image(source)
    if img.width == 0 or img.height == 0:
        raise ValueError("the image is empty")
    notes = [f"{img.mode} {img.width}x{img.height}"]
    img, conv = _to_rgb(img)
    if conv:
        notes.append("converted to " + conv.split(" -> ", 1)[1])
    src_w, src_h = img.size
    if (src_w, src_h) != (w, h):
        if src_w * h != src_h * w:  # aspect ratios differ
            if fit == "crop":
                if src_w * h > src_h * w:
                    cw, ch = round(src_h * w / h), src_h
                else:
                    cw, ch = src_w, round(src_w * h / w)
                left, top = (src_w - cw) // 2, (src_h - ch) // 2
                img = img.crop((left, top, left + cw, top + ch))
                notes.append(f"centre-cropped to {cw}x{ch}")
            elif fit == "pad":
                a = np.asarray(img)
                border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
                colour = tuple(int(c) for c in np.median(border, axis=0))
                if src_w * h > src_h * w:
                    cw, ch = src_w, round(src_w * h / w)
                else:
                    cw, ch = round(src_h * w / h), src_h
                canvas = Image.new("RGB", (cw, ch), colour)
                canvas.paste(img, ((cw - src_w) // 2, (ch - src_h) // 2))
                img = canvas
                notes.append(f"padded to {cw}x{ch} with {colour}")
            else:
                notes.append("stretched (aspect ratio changed)")
        if img.size != (w, h):
            down = img.width > w or img.height > h
            img = img.resize((w, h), Image.Resampling.LANCZOS if down else Image.Resampling.BICUBIC)
            notes.append(f"resized to {w}x{h} ({'Lanczos' if down else 'bicubic'})")
    else:
        notes.append("used as is")
    return np.asarray(img, dtype=np.uint8).copy(), "; ".join(notes)
