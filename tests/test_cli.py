"""The CLI: generate, re-run from a PNG's parameters, and one clear line for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    p = subprocess.run([sys.executable, "-m", "studio", *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    return p.returncode, p.stdout, p.stderr


def test_generate_and_rerun_from_png(tiny_sd_dir, tmp_path):
    a, b = str(tmp_path / "a.png"), str(tmp_path / "b.png")
    rc, out, err = run_cli("generate", "--model", tiny_sd_dir, "--prompt", "a red cat", "--negative", "a dog",
                           "--sampler", "euler", "--steps", "4", "--scale", "4", "--seed", "5", "--out", a)
    assert rc == 0, err
    params = json.loads(Image.open(a).info["parameters"])
    assert params["prompt"] == "a red cat" and params["negative_prompt"] == "a dog" and params["sampler"] == "euler"
    assert params["steps"] == 4 and params["guidance_scale"] == 4.0 and params["seed"] == 5
    rc, out, err = run_cli("generate", "--from", a, "--out", b)
    assert rc == 0, err
    pa, pb = np.asarray(Image.open(a)), np.asarray(Image.open(b))
    assert pa.std() > 0 and np.array_equal(pa, pb)


@pytest.mark.parametrize("case", ["missing", "pickle", "width", "steps", "bad_png", "no_params_png"])
def test_bad_input_is_one_clear_line(case, tiny_sd_dir, tmp_path):
    out = str(tmp_path / "o.png")
    if case == "missing":
        args = ["--model", str(tmp_path / "nope"), "--prompt", "x"]
        expect = "model not found"
    elif case == "pickle":
        ck = tmp_path / "model.ckpt"
        ck.write_bytes(b"\x80\x04not really")
        args = ["--model", str(ck), "--prompt", "x"]
        expect = "pickle"
    elif case == "width":
        args = ["--model", tiny_sd_dir, "--prompt", "x", "--width", "30", "--height", "32"]
        expect = "multiple of 8"
    elif case == "steps":
        args = ["--model", tiny_sd_dir, "--prompt", "x", "--steps", "0"]
        expect = "steps must be at least 1"
    elif case == "bad_png":
        p = tmp_path / "bad.png"
        p.write_bytes(b"not a png at all")
        args = ["--from", str(p)]
        expect = "cannot read image"
    else:
        p = tmp_path / "plain.png"
        Image.new("RGB", (8, 8)).save(p)
        args = ["--from", str(p)]
        expect = "no studio parameters"
    rc, stdout, stderr = run_cli("generate", *args, "--out", out)
    assert rc != 0
    lines = [l for l in stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error:") and expect in lines[0]
    assert "Traceback" not in stderr
    assert not os.path.exists(out)


def test_pickle_weights_inside_folder_are_refused(tmp_path):
    from studio.safety import UnsafeModelError, check_model_folder

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(UnsafeModelError, match="pickle"):
        check_model_folder(str(tmp_path))
    check_model_folder(str(tmp_path), allow_pickle=True)  # a local setting may allow it


def test_bench_guidance_times_every_registered_method(capsys):
    """The bench runs every method (the measurement ones on a rendered ground truth) and prints its ratio line."""
    from bench.guidance import main
    from studio.guidance import guidance_names

    assert main(["--steps", "3", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for m in guidance_names():
        assert f"ratio_{m}=" in out, m
    assert "nfe_per_image" in out and "targets:" in out
    nfe = dict(kv.split("=") for kv in out.split("nfe_per_image ")[1].splitlines()[0].split())
    assert int(nfe["cfg"]) == 6 and int(nfe["measurement_hard"]) == 3 and int(nfe["pag"]) == 9
