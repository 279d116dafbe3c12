"""Training recipes of the shipped ShapesWorld models (survey Part VI, native conditional training).

    python -m studio train shapesworld --stage text-unet --minutes 60 --resume
    python -m studio train shapesworld --stage flow --minutes 30 --resume
    python -m studio train shapesworld --stage text-unet --export     # write assets/models/

Stage `text-unet` trains the CLIP text encoder and the UNet jointly for v-prediction with
10% caption dropout (so classifier-free guidance works):
    L = E_{x0, c, t, eps} w(t) || v_theta(x_t, t, c) - v ||^2,  v = sqrt(abar) eps - sqrt(1 - abar) x0,
with the x0-error weight clamped to [1, 5]: w(t) = clamp(SNR, 1, 5) / (SNR + 1) (so the v-loss weight
is about 1 at high noise). Plain min-SNR-5, min(SNR, 5) / (SNR + 1), lets that weight go to 0 as
SNR -> 0, and with zero terminal SNR the steps that decide the layout (where the object is, how many
there are) then carry almost no loss: the first 4.8 k steps trained that way drew the right colours
at random positions. Stage `flow` starts from the
diffusion UNet's EMA weights and trains the rectified-flow objective
    L = E || v_theta(x_t, t, c) - (eps - x0) ||^2,  x_t = (1 - t) x0 + t eps,
with t drawn from the same shifted grid that sampling uses; the text encoder stays frozen.
Stage `weak` trains AutoGuidance's weak model (survey §5.2.5): a fresh UNet, for `weak_step` (1,500)
steps of the text-unet objective against the shipped text encoder, frozen, so the weak and main
models take the same conditioning (L843); its export writes `unet_weak/` with the SHA-256 of that
text encoder, and re-exporting the text encoder makes it stale (the loader then refuses it):
    python -m studio train shapesworld --stage weak --minutes 60 --export

Scenes are rendered on the fly from (data_seed, step), so resuming is exact. The resumable state
(weights, EMA, optimizer, step, log) lives in `runs/shapesworld/<stage>/` (ignored by git) as
safetensors + JSON; without it, `--resume` starts from the shipped weights with a fresh optimizer,
whose learning rate warms up again over `warmup_steps`.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, asdict

import numpy as np
import torch
import torch.nn.functional as F

from . import models
from .codec import PixelUnshuffleCodec
from .weak import WEAK_DIR, WEAK_META, file_sha256, weak_unet_mismatch
from .world import render, sample_scenes, sample_scene, caption

ASSET_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "assets", "models")
RUN_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "runs", "shapesworld")


@dataclass
class TrainConfig:
    stage: str = "text-unet"
    batch_size: int = 64
    lr: float = 6e-4
    warmup_steps: int = 250
    decay_steps: int = 20000
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    two_object_prob: float = 0.35
    drop_prob: float = 0.2
    min_snr_gamma: float = 5.0
    min_snr_floor: float = 1.0  # lower clamp of the x0-error weight (0: plain min-SNR)
    # Weight of the penalty on feature-norm outliers in the decoder (see Trainer._outlier_penalty); 0: off.
    outlier_penalty: float = 0.0
    outlier_ratio: float = 3.0
    # Spatially adaptive loss weight: each latent cell's loss is scaled by its running mean error over
    # the mean cell error, clamped to [1, cell_weight_max] (1: off). Cells the model keeps getting wrong
    # whatever the scene (a fixed-position artifact) weigh more until it is gone.
    cell_weight_max: float = 1.0
    cell_weight_power: float = 1.0  # weight = (running cell error / mean) ** power, then clamped
    data_seed: int = 1234
    checkpoint_minutes: float = 5.0
    eval_minutes: float = 15.0
    eval_n: int = 64
    # text-unet: keep the shipped text encoder frozen (a UNet-only fine-tune; AutoGuidance's weak UNet, trained
    # against that encoder, stays valid)
    freeze_text: bool = False
    weak_step: int = 1500  # the weak stage's length: AutoGuidance's weak UNet is its EMA at this step
    threads: int = 0  # 0: torch default
    # Where it runs (not part of the recipe's result, only of its speed): "cpu" or "cuda"; with
    # `workers` > 0 scenes are rendered and tokenized in that many processes ahead of the step.
    device: str = "cpu"
    workers: int = 0
    bf16: bool = False  # bf16 autocast (pays off on GPUs; slower than float32 on this CPU)


def _abs(p: str) -> str:
    return os.path.abspath(p)


def asset_path(name: str) -> str:
    return _abs(os.path.join(ASSET_DIR, name))


def run_path(stage: str) -> str:
    return _abs(os.path.join(RUN_DIR, stage))


def shipped_text_encoder():
    """The shipped diffusion model's text encoder in float32: the conditioning the flow twin, the weak UNet
    and a --freeze-text fine-tune train against."""
    from transformers import CLIPTextModel

    return CLIPTextModel.from_pretrained(os.path.join(asset_path("shapesworld"), "text_encoder"), torch_dtype=torch.float32)


def compact_history(history: list[dict], max_loss_points: int = 200) -> list[dict]:
    """The log an export ships: every adherence check and note, and at most `max_loss_points` evenly spaced
    loss entries (the run state keeps them all), so training.json does not grow with every export."""
    losses = [i for i, h in enumerate(history) if set(h) <= {"step", "loss", "minutes"}]
    stride = max(1, -(-len(losses) // max_loss_points))
    keep = set(losses[::stride]) | ({losses[-1]} if losses else set())
    return [h for i, h in enumerate(history) if i in keep or i not in set(losses)]


# ----------------------------------------------------------------------------- data

def batch_for_step(step: int, cfg: TrainConfig) -> tuple[torch.Tensor, list[str]]:
    rng = random.Random(cfg.data_seed * 1_000_003 + step)
    scenes = [sample_scene(rng, two_object_prob=cfg.two_object_prob, drop_prob=cfg.drop_prob) for _ in range(cfg.batch_size)]
    imgs = np.stack([render(s) for s in scenes])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    caps = ["" if rng.random() < cfg.caption_dropout else caption(s) for s in scenes]
    return x, caps


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids


def encode_text(tokenizer, text_encoder, captions: list[str]) -> torch.Tensor:
    ids = tokenize(tokenizer, captions).to(text_encoder.device)
    return text_encoder(ids)[0]


_WORKER_TOKENIZER = None


def _worker_batch(args) -> tuple[torch.Tensor, torch.Tensor]:
    """(images in [-1, 1], token ids) of one step, computed in a data process."""
    global _WORKER_TOKENIZER
    step, cfg = args
    if _WORKER_TOKENIZER is None:
        torch.set_num_threads(1)
        if cfg.stage == "text-unet":
            from .text import build_tokenizer

            _WORKER_TOKENIZER = build_tokenizer()
        else:
            from transformers import CLIPTokenizer

            _WORKER_TOKENIZER = CLIPTokenizer.from_pretrained(os.path.join(asset_path("shapesworld"), "tokenizer"))
    x, caps = batch_for_step(step, cfg)
    return ((x + 1) * 127.5).round().to(torch.uint8), tokenize(_WORKER_TOKENIZER, caps)  # 4x less to pickle


class _Batches:
    """The batches of steps start, start+1, ... in order; rendered ahead in `workers` processes."""

    def __init__(self, trainer: "Trainer", start: int):
        self.tr, self.next, self.pending = trainer, start, []
        self.pool = None
        if trainer.cfg.workers > 0:
            import multiprocessing as mp

            self.pool = mp.get_context("spawn").Pool(trainer.cfg.workers)

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.tr.cfg
        if self.pool is None:
            x, caps = batch_for_step(step, cfg)
            return x, tokenize(self.tr.tokenizer, caps)
        while len(self.pending) < 3 * cfg.workers:
            self.pending.append((self.next, self.pool.apply_async(_worker_batch, ((self.next, cfg),))))
            self.next += 1
        s, res = self.pending.pop(0)
        assert s == step, (s, step)
        x8, ids = res.get()
        return x8.to(self.tr.dev, non_blocking=True).float() / 127.5 - 1.0, ids

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()


# ----------------------------------------------------------------------------- state

class Trainer:
    def __init__(self, cfg: TrainConfig, log=None):
        from transformers import CLIPTextModel, CLIPTokenizer
        from diffusers import UNet2DConditionModel

        self.cfg = cfg
        self.log = log or (lambda *a, **k: print(*a, flush=True))
        self.codec = PixelUnshuffleCodec()
        self.dir = run_path(cfg.stage)
        os.makedirs(self.dir, exist_ok=True)
        self.step = 0
        self.elapsed = 0.0
        self.history: list[dict] = []
        self.opt_start = 0  # the step where the optimizer started fresh: the warm-up counts from there
        base = asset_path("shapesworld")
        if cfg.stage == "text-unet":
            from .text import build_tokenizer, text_encoder_config

            self.tokenizer = build_tokenizer()
            torch.manual_seed(cfg.data_seed)
            self.text_encoder = CLIPTextModel(text_encoder_config(len(self.tokenizer), models.TEXT_HIDDEN))
            self.unet = models.make_unet()
            self.scheduler = models.make_diffusion_scheduler()
            self.train_text = not cfg.freeze_text
            if cfg.freeze_text:  # fine-tune the UNet alone: the shipped text encoder (and so weak/ and flow twins) stay valid
                self.text_encoder.load_state_dict(shipped_text_encoder().state_dict())
        elif cfg.stage == "flow":
            self.tokenizer = CLIPTokenizer.from_pretrained(os.path.join(base, "tokenizer"))
            self.text_encoder = shipped_text_encoder()
            self.unet = UNet2DConditionModel.from_pretrained(os.path.join(base, "unet"), torch_dtype=torch.float32)
            self.scheduler = models.make_flow_scheduler()
            self.train_text = False
        elif cfg.stage == "from-flow":
            # The diffusion UNet re-derived from the flow twin: its weights to start from, and its predictions,
            # carried into the v-parametrization, as the targets (the text encoder, shared by both, stays frozen).
            self.tokenizer = CLIPTokenizer.from_pretrained(os.path.join(base, "tokenizer"))
            self.text_encoder = shipped_text_encoder()
            flow_dir = os.path.join(asset_path("shapesworld-flow"), "unet")
            if not os.path.isdir(flow_dir):
                raise FileNotFoundError(f"the from-flow stage needs the shipped flow twin in {flow_dir} "
                                        "(python -m studio train shapesworld --stage flow --export)")
            self.unet = UNet2DConditionModel.from_pretrained(flow_dir, torch_dtype=torch.float32)
            self.teacher = UNet2DConditionModel.from_pretrained(flow_dir, torch_dtype=torch.float32).eval().requires_grad_(False)
            self.scheduler = models.make_diffusion_scheduler()
            self.train_text = False
        elif cfg.stage == "weak":
            # AutoGuidance's weak model (survey §5.2.5, L843: the same conditioning as the main model): a
            # fresh UNet, trained briefly against the shipped text encoder, frozen.
            self.tokenizer = CLIPTokenizer.from_pretrained(os.path.join(base, "tokenizer"))
            self.text_encoder = shipped_text_encoder()
            self.text_encoder_sha256 = file_sha256(os.path.join(base, "text_encoder", "model.safetensors"))
            torch.manual_seed(cfg.data_seed)
            self.unet = models.make_unet()
            self.scheduler = models.make_diffusion_scheduler()
            self.train_text = False
        else:
            raise ValueError(f"unknown stage {cfg.stage!r} (text-unet | flow | weak | from-flow)")
        self.dev = torch.device(cfg.device)
        self.unet.to(self.dev)
        self.text_encoder.to(self.dev)
        if getattr(self, "teacher", None) is not None:
            self.teacher.to(self.dev)
        self.text_encoder.requires_grad_(self.train_text)
        params = list(self.unet.parameters()) + (list(self.text_encoder.parameters()) if self.train_text else [])
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01, fused=self.dev.type == "cuda" or None)
        self.ema = {k: v.detach().clone() for k, v in self._trainable_state().items()}
        alphas = self.scheduler.alphas_cumprod if cfg.stage != "flow" else None
        self.alphas_cumprod = alphas
        self._features: list[torch.Tensor] = []
        if cfg.outlier_penalty > 0:
            for block in self.unet.up_blocks[1:]:
                for m in list(block.resnets) + list(block.attentions or []):
                    m.register_forward_hook(self._keep_feature)

    # The trainable tensors by name ("unet.*", "text.*").
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        d = {f"unet.{k}": p for k, p in self.unet.named_parameters()}
        if self.train_text:
            d.update({f"text.{k}": p for k, p in self.text_encoder.named_parameters()})
        return d

    # ------------------------------------------------------------------ checkpoint
    def save(self) -> None:
        from safetensors.torch import save_file

        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self._trainable_state().items()}
        tensors.update({f"ema.{k}": v.cpu().contiguous() for k, v in self.ema.items()})
        names = list(self._trainable_state())
        id_to_name = {id(p): n for n, p in self._trainable_state().items()}
        for p, st in self.opt.state.items():
            n = id_to_name[id(p)]
            for key, val in st.items():
                tensors[f"opt.{n}.{key}"] = torch.as_tensor(val).detach().cpu().clone().contiguous()
        if getattr(self, "_cell_ema", None) is not None:  # the adaptive cell weights' running error: exact resume
            tensors["aux.cell_ema"] = self._cell_ema.detach().cpu().clone().contiguous()
        meta = {"step": self.step, "elapsed": self.elapsed, "config": asdict(self.cfg), "history": self.history, "names": names,
                "opt_start": self.opt_start}
        tmp = os.path.join(self.dir, "state.tmp.safetensors")
        save_file(tensors, tmp)
        with open(os.path.join(self.dir, "state.tmp.json"), "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, os.path.join(self.dir, "state.safetensors"))
        os.replace(os.path.join(self.dir, "state.tmp.json"), os.path.join(self.dir, "state.json"))

    def load(self) -> bool:
        """Resume from the run folder; else from the shipped weights. Returns True if a run state was found."""
        from safetensors.torch import load_file

        path = os.path.join(self.dir, "state.safetensors")
        if not os.path.exists(path):
            return self._load_from_assets()
        tensors = load_file(path)
        with open(os.path.join(self.dir, "state.json")) as f:
            meta = json.load(f)
        state = self._trainable_state()
        if self.train_text and not any(k.startswith("model.text.") for k in tensors):
            # a state saved by a UNet-only (frozen text) run: its text encoder is the shipped one
            for k, v in shipped_text_encoder().state_dict().items():
                tensors[f"model.text.{k}"] = tensors[f"ema.text.{k}"] = v
            self.log("the run state has no text encoder (a frozen-text run): starting it from the shipped one")
        with torch.no_grad():
            for n, p in state.items():
                p.copy_(tensors[f"model.{n}"])
                self.ema[n].copy_(tensors[f"ema.{n}"])
        for n, p in state.items():
            st = {}
            for key in ("step", "exp_avg", "exp_avg_sq"):
                t = tensors.get(f"opt.{n}.{key}")
                if t is not None:
                    st[key] = t.to(self.dev) if key != "step" or self.dev.type == "cuda" else t
            if st:
                self.opt.state[p] = st
        if "aux.cell_ema" in tensors:
            self._cell_ema = tensors["aux.cell_ema"].to(self.dev)
        self.step, self.elapsed, self.history = meta["step"], meta["elapsed"], meta.get("history", [])
        self.opt_start = meta.get("opt_start", 0)
        self.log(f"resumed {self.cfg.stage} at step {self.step} ({self.elapsed / 60:.1f} min trained)")
        return True

    def _load_from_assets(self) -> bool:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        if self.cfg.stage == "weak":  # a shipped weak UNet may belong to an older text encoder: start afresh
            self.log("no run state: the weak stage starts from scratch against the shipped text encoder")
            return False
        if self.cfg.stage == "from-flow":  # step 0: the EMA and learning rate warm up from the flow twin's weights
            self.log("no run state: the from-flow stage starts from the shipped flow twin's weights")
            return False
        name = "shapesworld" if self.cfg.stage == "text-unet" else "shapesworld-flow"
        base = asset_path(name)
        meta_path = os.path.join(base, "training.json")
        if not os.path.exists(os.path.join(base, "unet")):
            start = "the shipped diffusion model's weights" if self.cfg.stage == "flow" else "scratch"
            self.log(f"no run state and no shipped {name}: starting from {start}")
            return False
        unet = UNet2DConditionModel.from_pretrained(os.path.join(base, "unet"), torch_dtype=torch.float32)
        self.unet.load_state_dict(unet.state_dict())
        if self.train_text:
            te = CLIPTextModel.from_pretrained(os.path.join(base, "text_encoder"), torch_dtype=torch.float32)
            self.text_encoder.load_state_dict(te.state_dict())
        self.ema = {k: v.detach().clone() for k, v in self._trainable_state().items()}
        if os.path.exists(meta_path):
            with open(meta_path) as f:
                m = json.load(f)
            self.step, self.elapsed, self.history = m.get("step", 0), m.get("elapsed", 0.0), m.get("history", [])
        self.opt_start = self.step  # a fresh optimizer: warm up again rather than jolt converged weights
        self.log(f"no run state: resuming {name} from the shipped weights at step {self.step} with a fresh optimizer")
        return False

    # ------------------------------------------------------------------ training
    def lr_at(self, step: int) -> float:
        """Linear warm-up over `warmup_steps` from the step where the optimizer started fresh (0, or the
        shipped weights' step when a run resumes from them), then a cosine decay to a quarter of the peak
        over `decay_steps` (a function of the step and the saved start, so resuming is exact)."""
        warm = min(1.0, (step - self.opt_start + 1) / self.cfg.warmup_steps)
        frac = min(step, self.cfg.decay_steps) / self.cfg.decay_steps
        return self.cfg.lr * warm * (0.25 + 0.75 * 0.5 * (1 + math.cos(math.pi * frac)))

    def loss(self, x: torch.Tensor, ids: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The stage's loss on one batch; the noise and timesteps come from the CPU generator `gen`
        whatever the device, so a run draws the same numbers on a CPU and a GPU."""
        dev = self.dev
        z0 = self.codec.encode(x.to(dev))
        b = z0.shape[0]
        if dev.type == "cpu":
            noise = torch.randn(z0.shape, generator=gen)
        else:  # drawing 3 M normals a step on the CPU would cost more than the step
            noise = torch.randn(z0.shape, generator=torch.Generator(dev).manual_seed(int(torch.randint(1 << 62, (1,), generator=gen))), device=dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
            ctx = self.text_encoder(ids.to(dev))[0]
        if self.cfg.stage != "flow":  # text-unet, weak, from-flow: v-prediction
            t = torch.randint(0, 1000, (b,), generator=gen)
            abar = self.alphas_cumprod[t].view(b, 1, 1, 1).to(dev)
            t = t.to(dev)
            zt = abar.sqrt() * z0 + (1 - abar).sqrt() * noise
            if self.cfg.stage == "from-flow":
                target = self.flow_teacher_v(zt, abar, ctx)
            else:
                target = abar.sqrt() * noise - (1 - abar).sqrt() * z0
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
                pred = self.unet(zt, t, ctx).sample.float()
            snr = abar / (1 - abar).clamp_min(1e-8)
            w = snr.clamp(self.cfg.min_snr_floor, self.cfg.min_snr_gamma) / (snr + 1)
            return self._reduce((w * (pred - target) ** 2).mean(1))  # B x H x W
        # flow: t on the shifted grid used at sampling time
        u = torch.rand(b, generator=gen)
        s = self.scheduler.config.shift
        t = (s * u / (1 + (s - 1) * u)).to(dev)
        tt = t.view(b, 1, 1, 1)
        zt = (1 - tt) * z0 + tt * noise
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
            pred = self.unet(zt, t * 1000, ctx).sample.float()
        return self._reduce(((pred - (noise - z0)) ** 2).mean(1))

    @torch.no_grad()
    def flow_teacher_v(self, zt: torch.Tensor, abar: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """The flow twin's prediction at the diffusion state z_t = a x0 + s eps (a = sqrt(abar), s = sqrt(1 - abar)),
        in the v-parametrization. Both processes share their marginals up to a scale: y = z_t / (a + s) is the
        rectified-flow state (1 - tau) x0 + tau eps at tau = s / (a + s), where the twin predicts u = eps - x0; so
        x0 = y - tau u, eps = x0 + u and v = a eps - s x0 (survey Part VI: the two parametrizations of one model)."""
        a, s = abar.sqrt(), (1 - abar).sqrt()
        tau = s / (a + s)
        y = zt / (a + s)
        with torch.autocast(zt.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
            u = self.teacher(y, tau.flatten() * 1000, ctx).sample.float()
        x0 = y - tau * u
        return a * (x0 + u) - s * x0

    def _reduce(self, err: torch.Tensor) -> torch.Tensor:
        """Mean of the per-cell error (B x H x W), with the spatially adaptive cell weights and the
        decoder outlier penalty when the recipe turns them on (both stages)."""
        loss = (err * self._cell_weights(err)).mean() if self.cfg.cell_weight_max > 1 else err.mean()
        if self.cfg.outlier_penalty > 0:
            loss = loss + self.cfg.outlier_penalty * self._outlier_penalty()
        self._features.clear()
        return loss

    def _cell_weights(self, err: torch.Tensor) -> torch.Tensor:
        """clamp((running cell error / its mean) ** cell_weight_power, 1, cell_weight_max), updated from this
        batch (H x W). A power above 1 keeps the pressure on a cell whose error has fallen but is still
        several times the rest."""
        cell = err.detach().mean(0)
        if getattr(self, "_cell_ema", None) is None or self._cell_ema.shape != cell.shape:
            self._cell_ema = cell.clone()
        self._cell_ema.mul_(0.99).add_(cell, alpha=0.01)
        return (self._cell_ema / self._cell_ema.mean()).pow(self.cfg.cell_weight_power).clamp(1.0, self.cfg.cell_weight_max)

    def _keep_feature(self, mod, inp, out) -> None:
        if mod.training:
            self._features.append(out[0] if isinstance(out, tuple) else getattr(out, "sample", out))

    def _outlier_penalty(self) -> torch.Tensor:
        """Mean over decoder features of relu(|f(h, w)| / median_hw |f| - r)^2.

        Without it the model made one position of the 8x8 decoder level a high-norm "register"
        (about 7x the median feature norm, the attention-sink pattern of transformers without a
        sink token), and every sample got a colour-noise blob at the same place of the image
        (rows 48-55, columns 0-7), which the strict evaluator rightly reads as an extra object."""
        total, count = 0.0, len(self._features)
        for f in self._features:
            n = f.float().norm(dim=1).flatten(1)  # B x HW
            med = n.median(dim=1, keepdim=True).values.clamp_min(1e-3)
            total = total + F.relu(n / med - self.cfg.outlier_ratio).pow(2).mean()
        self._features.clear()
        return total / max(1, count)

    def ema_update(self) -> None:
        d = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        names = list(self.ema)
        state = self._trainable_state()
        with torch.no_grad():
            e = [self.ema[n] for n in names]
            torch._foreach_mul_(e, d)
            torch._foreach_add_(e, [state[n].detach() for n in names], alpha=1 - d)

    def train(self, minutes: float | None = None, steps: int | None = None) -> None:
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.unet.train()
        self.text_encoder.train(self.train_text)
        start = time.time()
        last_ckpt = last_eval = time.time()
        stop = _StopFlag()  # SIGTERM / SIGINT end the run at the next step, after a checkpoint
        run_start_step = self.step
        losses = []
        window_start = time.time()
        batches = _Batches(self, self.step)
        try:
            self._loop(minutes, steps, start, last_ckpt, last_eval, stop, run_start_step, losses, window_start, batches)
        finally:
            batches.close()
        self.save()
        stop.restore()
        self.log(f"stopped at step {self.step}; state saved in {self.dir}")

    def _loop(self, minutes, steps, start, last_ckpt, last_eval, stop, run_start_step, losses, window_start, batches):
        cfg = self.cfg
        while True:
            if minutes is not None and time.time() - start >= minutes * 60:
                break
            if steps is not None and self.step - run_start_step >= steps:
                break
            if cfg.stage == "weak" and self.step >= cfg.weak_step:
                self.log(f"the weak stage ends at step {cfg.weak_step}")
                break
            if stop.requested:
                self.log(f"stop requested (signal {stop.requested})")
                break
            t0 = time.time()
            x, ids = batches.get(self.step)
            gen = torch.Generator().manual_seed(cfg.data_seed * 7919 + self.step)
            for g in self.opt.param_groups:
                g["lr"] = self.lr_at(self.step)
            loss = self.loss(x, ids, gen)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.step += 1
            self.ema_update()
            self.elapsed += time.time() - t0
            losses.append(loss.detach())
            if self.step % 50 == 0:
                mean = float(torch.stack(losses).mean())  # one device sync per 50 steps
                rate = cfg.batch_size * len(losses) / max(1e-9, time.time() - window_start)
                self.log(f"step {self.step} loss {mean:.4f} lr {self.lr_at(self.step):.2e} {rate:.0f} img/s")
                window_start = time.time()
                self.history.append({"step": self.step, "loss": mean, "minutes": self.elapsed / 60})
                losses = []
            if time.time() - last_eval >= cfg.eval_minutes * 60:
                self.evaluate_and_log()
                last_eval = time.time()
            if time.time() - last_ckpt >= cfg.checkpoint_minutes * 60:
                self.save()
                last_ckpt = time.time()
                self.log(f"checkpoint saved at step {self.step}")

    # ------------------------------------------------------------------ evaluation / export
    def ema_models(self):
        """Copies of the UNet and text encoder carrying the EMA weights."""
        import copy

        unet = copy.deepcopy(self.unet).eval()
        te = copy.deepcopy(self.text_encoder).eval()
        with torch.no_grad():
            for n, v in self.ema.items():
                mod, name = (unet, n[5:]) if n.startswith("unet.") else (te, n[5:])
                mod.get_parameter(name).copy_(v)
        return unet, te

    def evaluate_and_log(self, n: int | None = None) -> dict | None:
        try:
            res = evaluate_models(self.cfg.stage, *self.ema_models(), self.tokenizer, n=n or self.cfg.eval_n)
        except ImportError as e:  # evaluator not available in this checkout
            self.log(f"adherence eval skipped: {e}")
            return None
        res["step"] = self.step
        self.history.append({"step": self.step, "eval": res, "minutes": self.elapsed / 60})
        self.log("adherence " + json.dumps(res))
        return res

    def export_weak(self) -> str:
        """Write the weak stage's EMA UNet to assets/models/shapesworld/unet_weak/ (float16 safetensors), with
        weak.json naming the text encoder it was trained against (its file's SHA-256): the family loader
        refuses a weak UNet whose text encoder is not the model's."""
        out = os.path.join(asset_path("shapesworld"), WEAK_DIR)
        unet, _ = (m.cpu() for m in self.ema_models())
        tmp = out + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        unet.to(torch.float16).save_pretrained(tmp)
        with open(os.path.join(tmp, WEAK_META), "w") as f:
            json.dump({"step": self.step, "elapsed": self.elapsed, "text_encoder_sha256": self.text_encoder_sha256,
                       "config": asdict(self.cfg), "history": compact_history(self.history)}, f, indent=1)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        self.log(f"exported the weak UNet (EMA at step {self.step}) to {out}")
        return out

    def export(self, name: str | None = None) -> str:
        """Write the EMA weights in diffusers format (float16 safetensors) under assets/models/."""
        if self.cfg.stage == "weak":
            return self.export_weak()
        name = name or ("shapesworld-flow" if self.cfg.stage == "flow" else "shapesworld")
        out = asset_path(name)
        unet, te = (m.cpu() for m in self.ema_models())
        tmp = out + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        unet.to(torch.float16).save_pretrained(os.path.join(tmp, "unet"))
        te.to(torch.float16).save_pretrained(os.path.join(tmp, "text_encoder"))
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:  # an eval before the export leaves padding/truncation switched on in the saved file
            backend.no_padding()
            backend.no_truncation()
        self.tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
        self.scheduler.save_pretrained(os.path.join(tmp, "scheduler"))
        self.codec.save_pretrained(os.path.join(tmp, "codec"))
        if self.cfg.stage != "flow" and os.path.isdir(os.path.join(out, WEAK_DIR)):
            shutil.copytree(os.path.join(out, WEAK_DIR), os.path.join(tmp, WEAK_DIR))
            if weak_unet_mismatch(tmp):
                self.log("note: the shipped weak UNet (AutoGuidance) was trained against another text encoder and "
                         "will not load with this one; re-run: python -m studio train shapesworld --stage weak --export")
        model_index = {
            "_class_name": "ShapesWorldPipeline",
            "family": "shapesworld-flow" if self.cfg.stage == "flow" else "shapesworld",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "scheduler": ["diffusers", type(self.scheduler).__name__],
            "codec": ["studio", "PixelUnshuffleCodec"],
        }
        with open(os.path.join(tmp, "model_index.json"), "w") as f:
            json.dump(model_index, f, indent=2)
        with open(os.path.join(tmp, "training.json"), "w") as f:
            json.dump({"step": self.step, "elapsed": self.elapsed, "config": asdict(self.cfg),
                       "history": compact_history(self.history)}, f, indent=1)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        self.log(f"exported EMA weights at step {self.step} to {out}")
        return out


class _StopFlag:
    """Turns SIGTERM and SIGINT into a request to stop between steps (so the last state is saved)."""

    def __init__(self):
        import signal
        import threading

        self.requested = 0
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = signum

    def restore(self):
        import signal

        for sig, handler in self._old.items():
            signal.signal(sig, handler)


@torch.no_grad()
def sample_images(stage: str, unet, text_encoder, tokenizer, captions: list[str], *, steps: int = 25,
                  guidance_scale: float = 5.0, seed: int = 0) -> np.ndarray:
    """Reference sampler used while training (diffusers scheduler stepping, CFG); returns uint8 images."""
    codec = PixelUnshuffleCodec()
    sched = models.make_flow_scheduler() if stage == "flow" else models.make_diffusion_scheduler()
    sched.set_timesteps(steps)
    n = len(captions)
    cond = encode_text(tokenizer, text_encoder, captions)
    unc = encode_text(tokenizer, text_encoder, [""] * n)
    gen = torch.Generator().manual_seed(seed)
    dev = unet.device
    z = torch.randn((n, 48, 16, 16), generator=gen).to(dev)
    ctx = torch.cat([unc, cond])
    for t in sched.timesteps:
        out = unet(torch.cat([z, z]), torch.cat([t.reshape(1)] * 2 * n).to(dev), ctx).sample
        u, c = out.chunk(2)
        z = sched.step(u + guidance_scale * (c - u), t, z).prev_sample
    img = codec.decode(z.cpu().float()).clamp(-1, 1)
    return ((img + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def evaluate_models(stage: str, unet, text_encoder, tokenizer, *, n: int = 64, seed: int = 0,
                    guidance_scale: float = 5.0, two_objects: bool = False) -> dict:
    from .evaluator import evaluate

    scenes = sample_scenes(n, seed + 10_000, n_objects=2 if two_objects else 1, jitter=False)
    caps = [caption(s) for s in scenes]
    imgs = []
    for i in range(0, n, 32):
        imgs.append(sample_images(stage, unet, text_encoder, tokenizer, caps[i:i + 32], guidance_scale=guidance_scale, seed=seed + i))
    res = evaluate(list(np.concatenate(imgs)), scenes)
    return {k: round(float(v), 4) for k, v in res.items()}


def main(args) -> int:
    cfg = TrainConfig(stage=args.stage)
    for key in ("threads", "batch_size", "device", "workers", "bf16", "outlier_penalty", "cell_weight_max", "cell_weight_power",
                "freeze_text", "lr", "min_snr_gamma"):
        if getattr(args, key, None):
            setattr(cfg, key, getattr(args, key))
    tr = Trainer(cfg)
    if args.resume or args.export:
        tr.load()
    elif os.path.exists(os.path.join(tr.dir, "state.safetensors")):
        print(f"a run state exists in {tr.dir}: pass --resume to continue it (or delete the folder to restart)")
        return 2
    if args.minutes or args.steps:
        tr.train(minutes=args.minutes, steps=args.steps)
    if args.eval:
        tr.evaluate_and_log(n=args.eval)
        tr.save()
    if args.export:
        tr.export()
    return 0
