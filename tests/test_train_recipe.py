"""The ShapesWorld training recipe: its objectives written out independently, exact resume, and the
spatially adaptive cell weights that fight a fixed-position artifact.

Runs on the real architecture with batches of 2 (a step is a fraction of a second on the CPU); the run
folder is a temporary directory, never the work tree's `runs/`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from studio.toyworld import train as T


def _cfg(**kw) -> T.TrainConfig:
    base = dict(batch_size=2, warmup_steps=2, checkpoint_minutes=1e9, eval_minutes=1e9, weak_step=10**9)
    base.update(kw)
    return T.TrainConfig(**base)


def _quiet(*a, **k):
    pass


@pytest.mark.parametrize("gamma", [5.0, 1e4])
def test_diffusion_loss_is_the_clamped_snr_weighted_v_objective(tmp_path, monkeypatch, gamma):
    """gamma 5: the recipe's min-SNR clamp; 1e4: the low-noise steps keep their full weight (the plain
    v-loss above SNR 1), the fine-tune that went after the late-step grain."""
    monkeypatch.setattr(T, "RUN_DIR", str(tmp_path))
    tr = T.Trainer(_cfg(stage="text-unet", min_snr_gamma=gamma), log=_quiet)
    x, caps = T.batch_for_step(0, tr.cfg)
    ids = T.tokenize(tr.tokenizer, caps)
    with torch.no_grad():
        got = tr.loss(x, ids, torch.Generator().manual_seed(5))
        # the same draws, in the same order, by hand
        g = torch.Generator().manual_seed(5)
        z0 = torch.nn.functional.pixel_unshuffle(x, 4)
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(0, 1000, (2,), generator=g)
        ab = tr.scheduler.alphas_cumprod[t].view(2, 1, 1, 1)
        zt = ab.sqrt() * z0 + (1 - ab).sqrt() * noise
        v = ab.sqrt() * noise - (1 - ab).sqrt() * z0
        pred = tr.unet(zt, t, tr.text_encoder(ids)[0]).sample
        snr = ab / (1 - ab)
        w = torch.minimum(torch.maximum(snr, torch.ones_like(snr)), torch.full_like(snr, gamma)) / (snr + 1)
        want = (w * (pred - v) ** 2).mean()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_flow_loss_is_the_rectified_flow_objective(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "RUN_DIR", str(tmp_path))
    tr = T.Trainer(_cfg(stage="flow"), log=_quiet)
    x, caps = T.batch_for_step(3, tr.cfg)
    ids = T.tokenize(tr.tokenizer, caps)
    with torch.no_grad():
        got = tr.loss(x, ids, torch.Generator().manual_seed(9))
        g = torch.Generator().manual_seed(9)
        z0 = torch.nn.functional.pixel_unshuffle(x, 4)
        noise = torch.randn(z0.shape, generator=g)
        u = torch.rand(2, generator=g)
        t = 3.0 * u / (1 + 2.0 * u)  # shift 3
        zt = (1 - t.view(2, 1, 1, 1)) * z0 + t.view(2, 1, 1, 1) * noise
        pred = tr.unet(zt, t * 1000, tr.text_encoder(ids)[0]).sample
        want = F.mse_loss(pred, noise - z0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_from_flow_targets_are_the_flow_twins_velocity_carried_into_v(tmp_path, monkeypatch):
    """The from-flow stage's target: with a teacher that predicts the true velocity eps - x0 of the
    rectified-flow state, the converted target is exactly v = sqrt(abar) eps - sqrt(1 - abar) x0 at every
    noise level (a wrong tau or scale fails this); its loss is the v-loss against that target, and the
    stage starts from the flow twin's weights with the text encoder frozen."""
    monkeypatch.setattr(T, "RUN_DIR", str(tmp_path))
    tr = T.Trainer(_cfg(stage="from-flow", min_snr_gamma=1e4), log=_quiet)
    assert tr.load() is False and tr.step == 0
    assert all(k.startswith("unet.") for k in tr._trainable_state())
    torch.testing.assert_close(tr.unet.conv_out.weight, tr.teacher.conv_out.weight)
    assert not any(p.requires_grad for p in tr.teacher.parameters())

    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(4, 48, 16, 16, generator=g)
    eps = torch.randn(4, 48, 16, 16, generator=g)
    abar = tr.alphas_cumprod[torch.tensor([0, 300, 700, 999])].view(4, 1, 1, 1)
    zt = abar.sqrt() * z0 + (1 - abar).sqrt() * eps
    seen = {}

    class Oracle(torch.nn.Module):
        def forward(self, y, t, ctx):
            tau = (t / 1000).view(-1, 1, 1, 1)
            seen["y"] = y
            torch.testing.assert_close(y, (1 - tau) * z0 + tau * eps)  # the flow state at the flow time
            return type("Out", (), {"sample": eps - z0})()

    monkeypatch.setattr(tr, "teacher", Oracle())
    got = tr.flow_teacher_v(zt, abar, torch.zeros(4, 8, 64))
    torch.testing.assert_close(got, abar.sqrt() * eps - (1 - abar).sqrt() * z0, rtol=1e-4, atol=1e-5)
    assert "y" in seen


def test_cell_weights_follow_the_running_error_and_are_clamped(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "RUN_DIR", str(tmp_path))
    tr = T.Trainer(_cfg(stage="text-unet", cell_weight_max=4.0), log=_quiet)
    err = torch.ones(2, 4, 4)
    err[:, 1, 2] = 3.0  # a cell at 3x the rest: weight 3 / mean (1.92)
    err[:, 3, 0] = 8.0  # a worse one: 5.1, clamped to the cap
    w = tr._cell_weights(err)
    cell = err.mean(0)
    want = (cell / cell.mean()).clamp(1.0, 4.0)  # first call: the running error is this batch's
    torch.testing.assert_close(w, want)
    assert w[3, 0] == 4.0 and 1.0 < float(w[1, 2]) < 4.0 and w[0, 0] == 1.0
    # then an exponential average with decay 0.99
    err2 = torch.ones(2, 4, 4)
    w2 = tr._cell_weights(err2)
    ema = 0.99 * cell + 0.01 * err2.mean(0)
    torch.testing.assert_close(w2, (ema / ema.mean()).clamp(1.0, 4.0))
    # with a power: (ratio ** p), then clamped
    tr.cfg.cell_weight_power, tr.cfg.cell_weight_max = 2.0, 100.0
    tr._cell_ema = None
    w3 = tr._cell_weights(err)
    torch.testing.assert_close(w3, ((cell / cell.mean()) ** 2).clamp(1.0, 100.0))
    assert float(w3[1, 2]) > float(w[1, 2]) ** 1.5  # the 3x cell weighs its ratio squared (3.7 against 1.9)


def _weights(tr: T.Trainer) -> dict[str, torch.Tensor]:
    d = {k: v.detach().clone() for k, v in tr._trainable_state().items()}
    d.update({"ema." + k: v.clone() for k, v in tr.ema.items()})
    return d


def test_resume_is_exact_with_every_recipe_option(tmp_path, monkeypatch):
    """4 steps straight == 2 steps, save, a fresh process-like Trainer that loads, 2 more steps: the weights,
    the EMA, the optimizer moments and the adaptive cell weights all carry over."""
    torch.set_num_threads(1)  # same reduction order in both runs
    opts = dict(stage="text-unet", cell_weight_max=5.0, outlier_penalty=0.1)
    monkeypatch.setattr(T, "RUN_DIR", str(tmp_path / "straight"))
    a = T.Trainer(_cfg(**opts), log=_quiet)
    a.train(steps=4)
    monkeypatch.setattr(T, "RUN_DIR", str(tmp_path / "resumed"))
    b = T.Trainer(_cfg(**opts), log=_quiet)
    b.train(steps=2)
    c = T.Trainer(_cfg(**opts), log=_quiet)
    assert c.load() is True and c.step == 2
    c.train(steps=2)
    assert c.step == a.step == 4
    wa, wc = _weights(a), _weights(c)
    assert wa.keys() == wc.keys()
    for k in wa:
        assert torch.equal(wa[k], wc[k]), k
    # not vacuous: training moved the weights, and a resume without the saved state would differ
    d = T.Trainer(_cfg(**opts), log=_quiet)
    assert not torch.equal(_weights(d)["unet.conv_out.weight"], wa["unet.conv_out.weight"])


def test_weak_stage_trains_a_fresh_unet_against_the_frozen_shipped_text_encoder(tmp_path, monkeypatch):
    """AutoGuidance's weak model (survey §5.2.5) must take the main model's conditioning: the weak stage
    trains a fresh UNet with the v-objective against the shipped text encoder, which does not move."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    monkeypatch.setattr(T, "RUN_DIR", str(tmp_path))
    base = T.asset_path("shapesworld")
    shipped_te = CLIPTextModel.from_pretrained(f"{base}/text_encoder", torch_dtype=torch.float32)
    shipped_unet = UNet2DConditionModel.from_pretrained(f"{base}/unet", torch_dtype=torch.float32)
    tr = T.Trainer(_cfg(stage="weak", weak_step=3), log=_quiet)
    assert not any(p.requires_grad for p in tr.text_encoder.parameters())
    assert all(k.startswith("unet.") for k in tr._trainable_state())
    # a fresh UNet, not the shipped one
    assert not torch.equal(tr.unet.conv_out.weight, shipped_unet.conv_out.weight)
    # the same v-objective as the text-unet stage, on the same draws
    x, caps = T.batch_for_step(0, tr.cfg)
    ids = T.tokenize(tr.tokenizer, caps)
    ref = T.Trainer(_cfg(stage="text-unet"), log=_quiet)
    with torch.no_grad():
        ref.unet.load_state_dict(tr.unet.state_dict())
        ref.text_encoder.load_state_dict(tr.text_encoder.state_dict())
        torch.testing.assert_close(tr.loss(x, ids, torch.Generator().manual_seed(2)),
                                   ref.loss(x, ids, torch.Generator().manual_seed(2)), rtol=1e-5, atol=1e-7)
    before = tr.unet.conv_out.weight.detach().clone()
    tr.train(steps=10)
    assert tr.step == 3  # the stage ends at weak_step
    assert not torch.equal(before, tr.unet.conv_out.weight)
    for (n, p), q in zip(tr.text_encoder.named_parameters(), shipped_te.parameters()):
        assert torch.equal(p, q), n


def test_weak_export_names_its_text_encoder_and_the_loader_refuses_a_stale_one(tmp_path, monkeypatch):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from studio.families.shapesworld import load_shapesworld
    from studio.guidance import get_guidance

    assets = tmp_path / "assets"
    model = assets / "shapesworld"
    shutil.copytree(T.asset_path("shapesworld"), model)
    monkeypatch.setattr(T, "ASSET_DIR", str(assets))
    monkeypatch.setattr(T, "RUN_DIR", str(tmp_path / "runs"))
    tr = T.Trainer(_cfg(stage="weak", weak_step=1), log=_quiet)
    tr.train(steps=1)
    tr.export()
    meta = json.loads((model / "unet_weak" / "weak.json").read_text())
    assert meta["step"] == 1 and meta["text_encoder_sha256"] == T.file_sha256(str(model / "text_encoder" / "model.safetensors"))
    assert T.weak_unet_mismatch(str(model)) is None
    bundle = load_shapesworld(str(model))
    weak = bundle.modules["unet_weak"]
    torch.testing.assert_close(weak.conv_out.weight.float(), tr.ema["unet.conv_out.weight"].half().float())

    # another text encoder (one weight changed): the weak UNet no longer fits and is not loaded
    te_file = model / "text_encoder" / "model.safetensors"
    tensors = load_file(str(te_file))
    key = next(k for k in tensors if k.endswith("final_layer_norm.bias"))
    tensors[key] = tensors[key] + 1
    save_file(tensors, str(te_file), metadata={"format": "pt"})
    assert "another text encoder" in T.weak_unet_mismatch(str(model))
    stale = load_shapesworld(str(model))
    assert "unet_weak" not in stale.modules
    with pytest.raises(ValueError, match="another text encoder.*--stage weak"):
        with get_guidance("autoguidance").patch(stale):
            pass


def test_frozen_text_fine_tune_keeps_the_shipped_text_encoder_byte_for_byte(tmp_path, monkeypatch):
    """`--freeze-text`: a UNet-only fine-tune from the shipped weights; its export writes the same text
    encoder file, so the shipped weak UNet (AutoGuidance) still loads; a later run that trains the text
    encoder again resumes from such a state with the shipped encoder."""
    import shutil

    from studio.families.shapesworld import load_shapesworld

    assets = tmp_path / "assets"
    model = assets / "shapesworld"
    shutil.copytree(T.asset_path("shapesworld"), model)
    te_file = model / "text_encoder" / "model.safetensors"
    before = T.file_sha256(str(te_file))
    monkeypatch.setattr(T, "ASSET_DIR", str(assets))
    monkeypatch.setattr(T, "RUN_DIR", str(tmp_path / "runs"))
    tr = T.Trainer(_cfg(stage="text-unet", freeze_text=True), log=_quiet)
    tr.load()  # no run state: the shipped weights
    assert not any(p.requires_grad for p in tr.text_encoder.parameters())
    assert all(k.startswith("unet.") for k in tr._trainable_state())
    unet0 = tr.unet.conv_out.weight.detach().clone()
    tr.train(steps=2)
    assert not torch.equal(unet0, tr.unet.conv_out.weight)
    tr.export()
    assert T.file_sha256(str(te_file)) == before
    assert T.weak_unet_mismatch(str(model)) is None  # the shipped weak UNet still fits
    assert "unet_weak" in load_shapesworld(str(model)).modules

    # resuming that state with the text encoder trainable: it starts from the shipped encoder
    again = T.Trainer(_cfg(stage="text-unet"), log=_quiet)
    assert again.load() is True and again.step == tr.step
    shipped = load_shapesworld(T.asset_path("shapesworld")).modules["text_encoder"]
    for (n, p), q in zip(again.text_encoder.named_parameters(), shipped.parameters()):
        assert torch.equal(p, q.float()), n
    torch.testing.assert_close(again.unet.conv_out.weight, tr.unet.conv_out.weight)


def test_exported_history_keeps_every_check_and_thins_the_losses():
    hist = [{"step": i, "loss": 1.0 / (i + 1), "minutes": i / 10} for i in range(1000)]
    hist.insert(500, {"step": 500, "eval": {"all_correct": 0.5}, "minutes": 50})
    hist.insert(0, {"step": 0, "minutes": 0, "note": "from scratch"})
    out = T.compact_history(hist, max_loss_points=100)
    assert [h for h in out if "loss" not in h] == [hist[0], hist[501]]  # every check and note, in order
    losses = [h for h in out if "loss" in h]
    assert 90 <= len(losses) <= 101 and losses[0]["step"] == 0 and losses[-1]["step"] == 999
    assert [h["step"] for h in out] == sorted(h["step"] for h in out)
    assert T.compact_history(hist[:5]) == hist[:5]


def test_resuming_from_shipped_weights_warms_the_fresh_optimizer_up_again(tmp_path, monkeypatch):
    """Without a run state, --resume starts from the shipped weights with a fresh optimizer: its learning rate
    ramps up again from that step (a fresh Adam at the full rate would jolt converged weights), and a state
    saved later resumes with the same schedule."""
    import math

    monkeypatch.setattr(T, "RUN_DIR", str(tmp_path))
    tr = T.Trainer(_cfg(stage="flow", warmup_steps=250), log=_quiet)
    assert tr.load() is False and tr.step > 0
    s0, lr = tr.step, tr.cfg.lr

    def want(step, start):
        cos = 0.25 + 0.75 * 0.5 * (1 + math.cos(math.pi * min(step, 20000) / 20000))
        return lr * min(1.0, (step - start + 1) / 250) * cos

    for k in (0, 1, 124, 249, 400):
        assert math.isclose(tr.lr_at(s0 + k), want(s0 + k, s0), rel_tol=1e-12), k
    assert tr.lr_at(s0) < tr.lr_at(s0 + 249) / 100
    tr.train(steps=1)
    again = T.Trainer(_cfg(stage="flow", warmup_steps=250), log=_quiet)
    assert again.load() is True and again.opt_start == s0
    assert again.lr_at(s0 + 1) == tr.lr_at(s0 + 1)
    fresh = T.Trainer(_cfg(stage="flow", warmup_steps=250), log=_quiet)  # never loaded: the warm-up was at step 0
    assert math.isclose(fresh.lr_at(s0), want(s0, 0), rel_tol=1e-12) and fresh.lr_at(s0) > 100 * tr.lr_at(s0)
