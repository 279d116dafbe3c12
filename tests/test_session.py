"""SessionManager: memory budget and LRU eviction, offload tier, per-run patches restored, LoRA hot-swap, safe sources."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from studio.engine import Interrupted
from studio.registry import Policy
from studio.requests import GenerateRequest
from studio.safety import UnsafeModelError
from studio.session import LoraRef, OutOfBudget, SessionManager
from tests import tiny


@pytest.fixture(scope="module")
def three_models(tmp_path_factory):
    dirs = []
    for seed in range(3):
        d = str(tmp_path_factory.mktemp(f"model{seed}"))
        tiny.build_sd_pipeline(seed=seed).save_pretrained(d, safe_serialization=True)
        dirs.append(d)
    return dirs


@pytest.fixture(scope="module")
def loras(tiny_sd_dir, tmp_path_factory):
    return [tiny.make_lora(tiny_sd_dir, str(tmp_path_factory.mktemp(f"lora{s}")), seed=s) for s in range(2)]


def req(model, seed=0, steps=3, **kw):
    return GenerateRequest("a photo of a red cat", model=model, steps=steps, seed=seed, **kw)


def test_lru_eviction_under_budget(three_models):
    a, b, c = three_models
    A, B, C = (os.path.basename(x) for x in three_models)
    probe = SessionManager(device="cpu")
    size = probe.get(a).memory_bytes()
    s = SessionManager(device="cpu", memory_budget=int(size * 2.5))
    out_a = s.generate(req(a)).unit
    s.get(b)
    assert s.loaded() == [A, B]
    s.get(c)  # a is least recently used: dropped
    assert s.loaded() == [B, C]
    s.get(b)  # touch b; now c is least recently used
    s.get(a)
    assert s.loaded() == [B, A]
    assert [e for e in s.events if e.startswith("drop")] == [f"drop {A}", f"drop {C}"]
    assert s.peak_accounted["device"] <= s.memory_budget
    assert s.accounted() <= s.memory_budget
    # the evicted model came back and gives the same image
    assert np.array_equal(s.generate(req(a)).unit, out_a)


def test_offload_tier_then_drop(three_models):
    a, b, c = three_models
    A, B, C = (os.path.basename(x) for x in three_models)
    size = SessionManager(device="cpu").get(a).memory_bytes()
    s = SessionManager(device="cpu", memory_budget=int(size * 1.5), offload_budget=int(size * 1.5))
    s.get(a)
    s.get(b)  # a moves to the offload tier
    assert [(x["name"], x["where"]) for x in s.status()] == [(A, "offload"), (B, "device")]
    s.get(c)  # b to offload; a (offload LRU) dropped to make room there
    assert [(x["name"], x["where"]) for x in s.status()] == [(B, "offload"), (C, "device")]
    s.get(b)  # back from CPU RAM, c offloaded
    assert f"reload {B} from CPU RAM" in s.events
    assert s.peak_accounted["device"] <= s.memory_budget and s.peak_accounted["offload"] <= s.offload_budget


def test_model_larger_than_budget_is_a_clear_error(three_models):
    s = SessionManager(device="cpu", memory_budget=1000)
    with pytest.raises(OutOfBudget, match="budget"):
        s.get(three_models[0])
    assert s.loaded() == [] and s.accounted() == 0


def snapshot(bundle):
    unet = bundle.modules["unet"]
    sd = {k: v.clone() for k, v in unet.state_dict().items() if "lora_" not in k}
    procs = {k: type(v) for k, v in unet.attn_processors.items()}
    proc_ids = {k: id(v) for k, v in unet.attn_processors.items()}
    return sd, procs, proc_ids


def assert_same(a, b):
    assert a[0].keys() == b[0].keys()
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k
    assert a[1] == b[1] and a[2] == b[2]


class _Boom(RuntimeError):
    pass


def test_patches_restored_after_failure_and_interrupt(tiny_sd_dir, loras):
    from diffusers.models.attention_processor import AttnProcessor

    s = SessionManager(device="cpu")
    base = s.generate(req(tiny_sd_dir)).unit
    bundle = s.get(tiny_sd_dir)
    s.generate(req(tiny_sd_dir, loras=[{"path": loras[0], "weight": 0.8}]))  # the LoRA is now loaded (inactive)
    before = snapshot(bundle)

    def failing_callback(i, n, x, pred):
        # mid-run: the LoRA is active and we swap processors, then the run fails
        bundle.modules["unet"].set_attn_processor(AttnProcessor())
        if i == 1:
            raise _Boom("failure in the middle of the run")

    with pytest.raises(_Boom):
        s.generate(req(tiny_sd_dir, loras=[{"path": loras[1], "weight": 1.0}]), callback=failing_callback)
    after = snapshot(bundle)  # lora1 is now loaded too (inactive): base weights and processors must be unchanged
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k])
    assert before[1] == after[1] and before[2] == after[2]
    assert np.array_equal(s.generate(req(tiny_sd_dir)).unit, base)  # no adapter leaks into the next run

    def stopper(i, n, x, pred):
        s.stop()

    with pytest.raises(Interrupted):
        s.generate(req(tiny_sd_dir, steps=5, loras=[{"path": loras[0], "weight": 1.0}]), callback=stopper)
    assert_same(after, snapshot(bundle))
    assert np.array_equal(s.generate(req(tiny_sd_dir)).unit, base)


def test_lora_weight_unload_and_combination(tiny_sd_dir, loras):
    s = SessionManager(device="cpu")
    base = s.generate(req(tiny_sd_dir)).unit
    with_lora = s.generate(req(tiny_sd_dir, loras=[{"path": loras[0], "weight": 1.0}])).unit
    assert np.abs(with_lora - base).max() > 1e-3  # the LoRA changes the output
    zero = s.generate(req(tiny_sd_dir, loras=[{"path": loras[0], "weight": 0.0}])).unit
    assert np.array_equal(zero, base)  # weight 0 is the base model exactly
    bundle = s.get(tiny_sd_dir)
    s.unload_loras(bundle)
    assert np.array_equal(s.generate(req(tiny_sd_dir)).unit, base)  # unloading restores the base exactly
    assert not any("lora_" in k for k in bundle.modules["unet"].state_dict())

    # two LoRAs combine additively in each adapted linear layer: W x + dW1 x + dW2 x
    with s.run_scope(tiny_sd_dir, [LoraRef(loras[0], 0.7), LoraRef(loras[1], 0.5)]) as b:
        layer = b.modules["unet"].down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
        x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(0))
        both = layer(x)
        names = list(layer.lora_A.keys())
    with s.run_scope(tiny_sd_dir, [LoraRef(loras[0], 0.7)]):
        one = layer(x)
    with s.run_scope(tiny_sd_dir, [LoraRef(loras[1], 0.5)]):
        two = layer(x)
    with s.run_scope(tiny_sd_dir):
        w0 = layer(x)
    assert len(names) == 2
    assert torch.allclose(both, w0 + (one - w0) + (two - w0), atol=1e-5)
    assert not torch.allclose(one, two)


def test_sources_policy(tiny_sd_dir, tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    hosted = Policy(hosted=True, allowed_hub_ids=("org/allowed",), model_roots=(str(root),))
    s = SessionManager(device="cpu", policy=hosted)
    with pytest.raises(UnsafeModelError, match="outside the allowed"):
        s.get(tiny_sd_dir)  # a folder outside the roots
    import shutil

    shutil.copytree(tiny_sd_dir, tmp_path / "outside")
    with pytest.raises(UnsafeModelError, match="outside the allowed"):
        s.get(str(root / ".." / "outside"))  # a `..` escape
    link = root / "escape"
    os.symlink(tiny_sd_dir, link)
    with pytest.raises(UnsafeModelError, match="outside the allowed"):
        s.get(str(link))  # a symlink pointing out of the root
    with pytest.raises(UnsafeModelError, match="not one of the models"):
        s.get("org/other-model")
    # inside the root: allowed (a copy, not a link)
    shutil.copytree(tiny_sd_dir, root / "ok")
    assert s.get(str(root / "ok")).family == "sd15"
    # the shipped assets are always allowed
    s.resolve("shapesworld")


def test_hosted_input_images_only_from_uploads(tmp_path):
    import tempfile

    hosted = Policy(hosted=True)
    with pytest.raises(UnsafeModelError, match="outside the allowed"):
        hosted.check_input_file("/etc/hostname")
    with tempfile.NamedTemporaryFile(suffix=".png") as f:
        hosted.check_input_file(f.name)  # an upload: allowed
    Policy().check_input_file("/etc/hostname")  # a local session reads what its user points at
