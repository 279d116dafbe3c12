"""Uploads of any size and mode become the model's input with a note; PSNR and SSIM against references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from studio import metrics
from studio.imageprep import prepare_image


def _save(tmp_path, img: Image.Image, name: str) -> str:
    p = str(tmp_path / name)
    img.save(p)
    return p


def test_crop_keeps_the_centre_and_reports_it(tmp_path):
    a = np.zeros((100, 200, 3), np.uint8)
    a[:, :50] = (255, 0, 0)  # left quarter red: cropped away by a centre crop to 100x100
    a[:, 50:150] = (0, 0, 255)
    a[:, 150:] = (0, 255, 0)
    out, note = prepare_image(_save(tmp_path, Image.fromarray(a), "wide.png"), (64, 64), "crop")
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - (0, 0, 255)).max() <= 2  # only the blue centre survives
    assert "centre-cropped to 100x100" in note and "resized to 64x64" in note


def test_resize_stretches_and_pad_letterboxes(tmp_path):
    a = np.zeros((100, 200, 3), np.uint8)
    a[:, :100] = (255, 0, 0)
    a[:, 100:] = (0, 255, 0)
    p = _save(tmp_path, Image.fromarray(a), "wide.png")
    out, note = prepare_image(p, (64, 64), "resize")
    assert "stretched" in note
    assert out[32, 5, 0] > 200 and out[32, 58, 1] > 200  # both halves present
    b = np.full((100, 200, 3), 128, np.uint8)
    b[40:60, 90:110] = 255
    out, note = prepare_image(_save(tmp_path, Image.fromarray(b), "grey.png"), (64, 64), "pad")
    assert "padded to 200x200 with (128, 128, 128)" in note
    assert np.abs(out[2, 32].astype(int) - 128).max() <= 1  # the letterbox carries the border colour
    assert out[32, 32].min() > 200


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16"])
def test_any_mode_becomes_rgb(tmp_path, mode):
    base = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    img = base.convert(mode) if mode != "I;16" else Image.fromarray((np.arange(1600).reshape(40, 40) * 40).astype(np.uint16))
    ext = "tiff" if mode == "CMYK" else "png"
    out, note = prepare_image(_save(tmp_path, img, f"x.{ext}"), (64, 64), "crop")
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert note.startswith(img.mode)


def test_transparency_is_composited_on_white(tmp_path):
    a = np.zeros((64, 64, 4), np.uint8)  # fully transparent black
    out, note = prepare_image(_save(tmp_path, Image.fromarray(a, "RGBA"), "t.png"), (64, 64), "crop")
    assert (out == 255).all() and "RGB on white" in note and "used as is" in note


def test_bad_uploads_get_clear_messages(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match="corrupt or not an image"):
        prepare_image(str(bad), (64, 64))
    with pytest.raises(ValueError, match="not found"):
        prepare_image(str(tmp_path / "missing.png"), (64, 64))
    with pytest.raises(ValueError, match="no image"):
        prepare_image(None, (64, 64))
    with pytest.raises(ValueError, match="NaN"):
        prepare_image(np.full((8, 8, 3), np.nan), (64, 64))
    with pytest.raises(ValueError, match="unknown fit"):
        prepare_image(np.zeros((8, 8, 3), np.uint8), (64, 64), "zoom")


def test_psnr_matches_its_definition_and_masks():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    b = a.copy()
    b[:16] = np.clip(a[:16].astype(int) + 10, 0, 255)
    mse = ((a.astype(float) - b.astype(float)) ** 2).mean()
    assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(255 ** 2 / mse))
    keep = np.zeros((32, 32), bool)
    keep[16:] = True
    assert metrics.psnr(a, b, mask=keep) == float("inf")  # the unchanged half
    assert metrics.psnr(a, a) == float("inf")


def test_ssim_equals_the_closed_form_on_constant_images():
    # Constant images: sigma terms vanish, SSIM = (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1).
    c1 = (0.01 * 255) ** 2
    for u, v in [(100, 100), (100, 140), (30, 220)]:
        x, y = np.full((24, 24, 3), u, np.uint8), np.full((24, 24, 3), v, np.uint8)
        assert metrics.ssim(x, y) == pytest.approx((2 * u * v + c1) / (u * u + v * v + c1), rel=1e-9)


def test_ssim_against_a_direct_window_sum():
    """The separable filtered form against a brute-force sum over every 11x11 window."""
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (14, 15)).astype(np.float64)
    y = np.clip(x + rng.normal(0, 20, x.shape), 0, 255)
    r = np.arange(11) - 5
    g = np.exp(-r ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            p, q = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            mp, mq = (w * p).sum(), (w * q).sum()
            vp, vq = (w * (p - mp) ** 2).sum(), (w * (q - mq) ** 2).sum()
            cpq = (w * (p - mp) * (q - mq)).sum()
            vals.append((2 * mp * mq + c1) * (2 * cpq + c2) / ((mp ** 2 + mq ** 2 + c1) * (vp + vq + c2)))
    assert metrics.ssim(x, y) == pytest.approx(np.mean(vals), rel=1e-9)
    assert metrics.ssim(x, x) == pytest.approx(1.0)
    assert metrics.ssim(x, y) < 0.99
