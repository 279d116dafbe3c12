"""The noise-aware attribute classifier p_phi(c | x_t, t) of ShapesWorld (survey §3.1, L330-363).

Classifier guidance (survey §3.1) steers a frozen generator with the gradient of a classifier that
was trained on noisy states:

    g_phi(x_t, t; c) = grad_{x_t} log p_phi(c | x_t, t)                                  (§3.1, L340)

This file holds that classifier and its training recipe; `studio/guidance/classifier.py` uses it.

Network: over the 16x16x48 latents of the exact codec (`codec.py`), a stem convolution, one residual
block per resolution (16x16, 8x8, 4x4; GroupNorm, SiLU, 3x3 convolutions) whose normalised features
are modulated by the timestep embedding (FiLM: h <- (1 + scale(t)) * h + shift(t); the embedding is
sinusoidal in t followed by a two-layer MLP), strided convolutions between resolutions, then the 4x4
map flattened (so position stays readable) into a small MLP and one linear head per attribute of the
FIRST object of a single-object scene: shape (6), colour (8), size (2), position (5) and the
background (4). About 0.96 M parameters.

Training recipe (`python -m studio train classifier [--minutes M | --steps N] [--resume] [--export]`):
single-object scenes (with position jitter) rendered on the fly from (data seed, step), encoded by the
codec and noised with the diffusion model's schedule (`models.make_diffusion_scheduler()`: v-prediction,
zero-terminal-SNR scaled-linear betas) at t ~ U{0, ..., 999}:

    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,     L = sum_k CE(head_k(x_t, t), c_k),

AdamW with a linear warm-up. The run state (weights, optimizer, step, log) is kept in `runs/classifier/`
(ignored by git) as safetensors + JSON; since every batch and its noise are functions of (seed, step),
`--resume` continues exactly where the run stopped. Every `eval_minutes` the accuracy per head is logged
on held-out noised scenes at t in {0, 250, 500, 750}. `--export` writes float16 weights and config.json
to `assets/models/shapesworld-classifier/` (float16 changed no held-out prediction we measured).

Shipped: step 2870 (11 CPU-minutes on one thread beside the UNet's training, 184 k noised scenes), 1.9 MB.
Held-out accuracy on 512 renders (shape / colour / size / position / background):
t = 0: 0.96 / 1.00 / 1.00 / 1.00 / 1.00;  t = 250: 0.84 / 0.99 / 1.00 / 1.00 / 1.00;
t = 500: 0.65 / 0.92 / 0.98 / 1.00 / 1.00;  t = 750: 0.29 / 0.53 / 0.84 / 0.77 / 1.00.
Shape was still rising; `python -m studio train classifier --minutes M --resume --export` continues the run.

Serving the flow model: the network is conditioned on the noise level through the diffusion timestep
only. A rectified-flow state x = (1 - s) x_0 + s eps (s the flow time) is the variance-preserving state
x / sqrt((1 - s)^2 + s^2) at abar(s) = (1 - s)^2 / ((1 - s)^2 + s^2), so `vp_inputs` maps any state
x = alpha x_0 + sigma eps to the classifier's input x / sqrt(alpha^2 + sigma^2) and a (continuous)
timestep t with abar_t = alpha^2 / (alpha^2 + sigma^2), interpolated in this schedule's abar table.
For the diffusion model this is the identity and its own timestep; the guidance uses it for both.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import world

# The heads, in order, and their classes (the labels are the index in each tuple).
HEADS: dict[str, tuple[str, ...]] = {
    "shape": tuple(world.SHAPES),
    "color": tuple(world.COLORS),
    "size": tuple(world.SIZES),
    "position": tuple(world.POSITIONS),
    "background": tuple(world.BACKGROUNDS),
}
EVAL_TIMESTEPS = (0, 250, 500, 750)
HELD_OUT_SEED = "shapesworld-classifier-held-out"  # a string seed: no training step (integer seeds) draws it

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
EXPORT_DIR = os.path.join(ROOT, "assets", "models", "shapesworld-classifier")
RUN_DIR = os.path.join(ROOT, "runs", "classifier")
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


# ----------------------------------------------------------------------------- network

def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of (possibly fractional) timesteps t (B,)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class FiLMResBlock(nn.Module):
    """GroupNorm -> FiLM(t) -> SiLU -> conv, twice, plus the skip connection."""

    def __init__(self, channels: int, time_dim: int, groups: int = 8):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.film = nn.Linear(time_dim, 2 * channels)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(temb)[:, :, None, None].chunk(2, dim=1)
        r = self.conv1(F.silu(self.norm1(h) * (1 + scale) + shift))
        r = self.conv2(F.silu(self.norm2(r)))
        return h + r


@dataclass
class ClassifierConfig:
    in_channels: int = 48
    latent_size: int = 16
    widths: tuple[int, ...] = (64, 96, 128)
    time_dim: int = 128
    freq_dim: int = 64
    hidden: int = 64
    groups: int = 8

    @staticmethod
    def from_dict(d: dict) -> "ClassifierConfig":
        known = {f: d[f] for f in ClassifierConfig.__dataclass_fields__ if f in d}
        if "widths" in known:
            known["widths"] = tuple(known["widths"])
        return ClassifierConfig(**known)


class NoisyAttributeClassifier(nn.Module):
    """p_phi(attributes | x_t, t) over ShapesWorld latents; `forward` returns {head: logits (B, n_head)}."""

    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__()
        self.config = c = config or ClassifierConfig()
        self.time_mlp = nn.Sequential(nn.Linear(c.freq_dim, c.time_dim), nn.SiLU(), nn.Linear(c.time_dim, c.time_dim))
        self.stem = nn.Conv2d(c.in_channels, c.widths[0], 3, padding=1)
        self.blocks = nn.ModuleList(FiLMResBlock(w, c.time_dim, c.groups) for w in c.widths)
        self.downs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in zip(c.widths[:-1], c.widths[1:]))
        self.out_norm = nn.GroupNorm(c.groups, c.widths[-1])
        side = c.latent_size // 2 ** (len(c.widths) - 1)
        self.fc = nn.Linear(c.widths[-1] * side * side, c.hidden)
        self.heads = nn.ModuleDict({k: nn.Linear(c.hidden, len(v)) for k, v in HEADS.items()})

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.config
        if x.shape[-2:] != (c.latent_size, c.latent_size):
            raise ValueError(f"the classifier reads {c.latent_size}x{c.latent_size} latents (64x64 images), "
                             f"got {tuple(x.shape[-2:])}")
        t = torch.as_tensor(t, device=x.device).float().reshape(-1).expand(x.shape[0])
        temb = F.silu(self.time_mlp(timestep_embedding(t, c.freq_dim).to(x.dtype)))
        h = self.stem(x)
        for i, block in enumerate(self.blocks):
            h = block(h, temb)
            if i < len(self.downs):
                h = self.downs[i](h)
        h = F.silu(self.out_norm(h)).flatten(1)
        h = F.silu(self.fc(h))
        return {k: head(h) for k, head in self.heads.items()}


def noise_table() -> torch.Tensor:
    """abar_t, t = 0..999, of the diffusion model's schedule (float64)."""
    from .models import make_diffusion_scheduler

    return make_diffusion_scheduler().alphas_cumprod.to(torch.float64)


def timestep_for_abar(abar: float, table: torch.Tensor) -> float:
    """The continuous timestep whose abar (interpolated linearly in `table`, which decreases) is `abar`."""
    ac = table.numpy()
    return float(np.interp(abar, ac[::-1], np.arange(len(ac), dtype=np.float64)[::-1]))


def vp_inputs(x: torch.Tensor, alpha: float, sigma: float, table: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Classifier input and timestep for the state x = alpha x_0 + sigma eps (diffusion or rectified flow).

    x / sqrt(alpha^2 + sigma^2) is a variance-preserving state with abar = alpha^2 / (alpha^2 + sigma^2);
    for the flow state (1 - s) x_0 + s eps this is abar(s) = (1 - s)^2 / ((1 - s)^2 + s^2)."""
    norm = math.sqrt(alpha * alpha + sigma * sigma)
    return x / norm, timestep_for_abar(alpha * alpha / (norm * norm), table)


def labels_of(scene: world.Scene) -> dict[str, int]:
    """Class index per head of a scene's first object and background."""
    o = scene.objects[0]
    values = {"shape": o.shape, "color": o.color, "size": o.size, "position": o.position, "background": scene.background}
    return {k: HEADS[k].index(v) for k, v in values.items()}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- data

@dataclass
class TrainConfig:
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    data_seed: int = 4321
    init_seed: int = 0
    checkpoint_minutes: float = 3.0
    eval_minutes: float = 4.0
    eval_n: int = 256
    model: dict = field(default_factory=lambda: asdict(ClassifierConfig()))


def encode_scenes(scenes: list[world.Scene]) -> torch.Tensor:
    """Clean latents (B, 48, 16, 16) of the scenes through the exact codec."""
    from .codec import PixelUnshuffleCodec

    imgs = np.stack([world.render(s) for s in scenes])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return PixelUnshuffleCodec().encode(x)


def label_tensor(scenes: list[world.Scene]) -> dict[str, torch.Tensor]:
    labels = [labels_of(s) for s in scenes]
    return {k: torch.tensor([d[k] for d in labels]) for k in HEADS}


def batch_for_step(step: int, cfg: TrainConfig, table: torch.Tensor):
    """Noised latents, timesteps and labels of training step `step` (a function of (data_seed, step))."""
    rng = random.Random(cfg.data_seed * 1_000_003 + step)
    scenes = [world.sample_scene(rng, n_objects=1, jitter=True) for _ in range(cfg.batch_size)]
    x0 = encode_scenes(scenes)
    gen = torch.Generator().manual_seed(cfg.data_seed * 7919 + step)
    t = torch.randint(0, len(table), (len(scenes),), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    abar = table[t].float().view(-1, 1, 1, 1)
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise, t, label_tensor(scenes)


def held_out_scenes(n: int) -> list[world.Scene]:
    """Single-object scenes (jitter on) that no training step draws."""
    rng = random.Random(HELD_OUT_SEED)
    return [world.sample_scene(rng, n_objects=1, jitter=True) for _ in range(n)]


@torch.no_grad()
def accuracy(model: nn.Module, n: int = 256, timesteps=EVAL_TIMESTEPS, seed: int = 0, batch: int = 128) -> dict:
    """Accuracy per head on n held-out scenes noised at each timestep: {"t=0": {"shape": ..., ...}, ...}."""
    table = noise_table()
    scenes = held_out_scenes(n)
    x0 = encode_scenes(scenes)
    labels = label_tensor(scenes)
    was_training = model.training
    model.eval()
    out = {}
    for t in timesteps:
        gen = torch.Generator().manual_seed(seed * 1000 + int(t))
        noise = torch.randn(x0.shape, generator=gen)
        abar = float(table[int(t)])
        xt = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * noise
        correct = {k: 0 for k in HEADS}
        for i in range(0, n, batch):
            logits = model(xt[i:i + batch].float(), torch.full((len(xt[i:i + batch]),), float(t)))
            for k in HEADS:
                correct[k] += int((logits[k].argmax(1) == labels[k][i:i + batch]).sum())
        out[f"t={t}"] = {k: round(v / n, 4) for k, v in correct.items()}
    model.train(was_training)
    return out


# ----------------------------------------------------------------------------- training

class Trainer:
    """Resumable training of the classifier (state in `run_dir`: state.safetensors + state.json)."""

    def __init__(self, cfg: TrainConfig | None = None, run_dir: str | None = None, log=None):
        self.cfg = cfg or TrainConfig()
        self.dir = os.path.abspath(run_dir or RUN_DIR)
        self.log = log or (lambda *a: print(*a, flush=True))
        torch.manual_seed(self.cfg.init_seed)
        self.model = NoisyAttributeClassifier(ClassifierConfig.from_dict(self.cfg.model))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.table = noise_table()
        self.step = 0
        self.elapsed = 0.0
        self.history: list[dict] = []

    def lr_at(self, step: int) -> float:
        return self.cfg.lr * min(1.0, (step + 1) / self.cfg.warmup_steps)

    def save(self) -> None:
        from safetensors.torch import save_file

        os.makedirs(self.dir, exist_ok=True)
        params = dict(self.model.named_parameters())
        tensors = {f"model.{k}": v.detach().contiguous() for k, v in params.items()}
        by_id = {id(p): n for n, p in params.items()}
        for p, st in self.opt.state.items():
            for key, val in st.items():
                tensors[f"opt.{by_id[id(p)]}.{key}"] = torch.as_tensor(val).detach().clone().contiguous()
        meta = {"step": self.step, "elapsed": self.elapsed, "config": asdict(self.cfg), "history": self.history}
        save_file(tensors, os.path.join(self.dir, "state.tmp.safetensors"))
        with open(os.path.join(self.dir, "state.tmp.json"), "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(os.path.join(self.dir, "state.tmp.safetensors"), os.path.join(self.dir, "state.safetensors"))
        os.replace(os.path.join(self.dir, "state.tmp.json"), os.path.join(self.dir, "state.json"))

    def has_state(self) -> bool:
        return os.path.exists(os.path.join(self.dir, "state.safetensors"))

    def load(self) -> bool:
        """Resume from the run folder (weights, optimizer, step, log): True. Without a run state, start from
        the shipped (float16) weights with a fresh optimizer, or from scratch when none is shipped: False."""
        from safetensors.torch import load_file

        if not self.has_state():
            if not os.path.isfile(os.path.join(EXPORT_DIR, WEIGHTS_NAME)):
                self.log(f"no run state in {self.dir} and no shipped classifier: starting from scratch")
                return False
            shipped = load_classifier(EXPORT_DIR)
            self.model.load_state_dict(shipped.state_dict())
            with open(os.path.join(EXPORT_DIR, CONFIG_NAME)) as f:
                training = json.load(f).get("training", {})
            self.step, self.elapsed = int(training.get("step", 0)), 60.0 * float(training.get("minutes", 0.0))
            self.log(f"no run state in {self.dir}: continuing the shipped classifier (step {self.step}) "
                     "with a fresh optimizer")
            return False
        tensors = load_file(os.path.join(self.dir, "state.safetensors"))
        with open(os.path.join(self.dir, "state.json")) as f:
            meta = json.load(f)
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                p.copy_(tensors[f"model.{n}"])
        for n, p in self.model.named_parameters():
            st = {key: tensors[f"opt.{n}.{key}"] for key in ("step", "exp_avg", "exp_avg_sq") if f"opt.{n}.{key}" in tensors}
            if st:
                self.opt.state[p] = st
        self.step, self.elapsed, self.history = meta["step"], meta["elapsed"], meta.get("history", [])
        self.log(f"resumed the classifier at step {self.step} ({self.elapsed / 60:.1f} min trained)")
        return True

    def train_step(self) -> float:
        x, t, labels = batch_for_step(self.step, self.cfg, self.table)
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.step)
        logits = self.model(x, t)
        loss = sum(F.cross_entropy(logits[k], labels[k]) for k in HEADS)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step += 1
        return float(loss.detach())

    def evaluate_and_log(self, n: int | None = None) -> dict:
        acc = accuracy(self.model, n or self.cfg.eval_n)
        self.history.append({"step": self.step, "minutes": round(self.elapsed / 60, 2), "accuracy": acc})
        self.log(f"step {self.step} held-out accuracy " + json.dumps(acc))
        return acc

    def train(self, minutes: float | None = None, steps: int | None = None) -> None:
        from .train import _StopFlag

        self.model.train()
        start = last_ckpt = last_eval = time.time()
        first, losses = self.step, []
        stop = _StopFlag()  # SIGTERM / SIGINT end the run after the current step, with a checkpoint
        while True:
            if minutes is not None and time.time() - start >= minutes * 60:
                break
            if steps is not None and self.step - first >= steps:
                break
            if stop.requested:
                self.log(f"stop requested (signal {stop.requested})")
                break
            t0 = time.time()
            losses.append(self.train_step())
            self.elapsed += time.time() - t0
            if self.step % 50 == 0:
                self.log(f"step {self.step} loss {np.mean(losses):.4f} lr {self.lr_at(self.step):.2e}")
                self.history.append({"step": self.step, "loss": round(float(np.mean(losses)), 4),
                                     "minutes": round(self.elapsed / 60, 2)})
                losses = []
            if time.time() - last_eval >= self.cfg.eval_minutes * 60:
                self.evaluate_and_log()
                last_eval = time.time()
            if time.time() - last_ckpt >= self.cfg.checkpoint_minutes * 60:
                self.save()
                last_ckpt = time.time()
        self.save()
        stop.restore()
        self.log(f"stopped at step {self.step}; state saved in {self.dir}")

    def export(self, out: str | None = None, n_eval: int = 512) -> dict:
        """Write float16 weights + config.json (with the float16 model's held-out accuracy) to `out`
        (default: assets/models/shapesworld-classifier/)."""
        out = out or EXPORT_DIR
        half = NoisyAttributeClassifier(self.model.config)
        half.load_state_dict({k: v.detach().to(torch.float16).float() for k, v in self.model.state_dict().items()})
        acc = accuracy(half, n_eval)
        config = save_classifier(self.model, out, {
            "training": {"step": self.step, "minutes": round(self.elapsed / 60, 2),
                         "batch_size": self.cfg.batch_size, "data_seed": self.cfg.data_seed},
            "held_out_accuracy": {"n": n_eval, **acc}})
        size = os.path.getsize(os.path.join(out, WEIGHTS_NAME))
        self.log(f"exported the classifier at step {self.step} to {out} ({size / 1e6:.2f} MB); "
                 f"held-out accuracy (float16) {json.dumps(acc)}")
        return config


def save_classifier(model: NoisyAttributeClassifier, out: str, extra: dict | None = None) -> dict:
    """Write `model` as float16 safetensors + config.json to the folder `out` (replaced atomically)."""
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    config = {"_class_name": "NoisyAttributeClassifier", **asdict(model.config),
              "heads": {k: list(v) for k, v in HEADS.items()},
              "noise_schedule": "models.DIFFUSION_SCHEDULER alphas_cumprod (t = 0..999)",
              "parameters": count_parameters(model), "dtype": "float16", **(extra or {})}
    out = os.path.abspath(out)
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file(state, os.path.join(tmp, WEIGHTS_NAME))
    with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return config


def load_classifier(path: str | None = None, device="cpu") -> NoisyAttributeClassifier:
    """The exported classifier (safetensors only; default: the shipped one), in float32 and eval mode;
    a clear error when it is missing."""
    from safetensors.torch import load_file

    path = path or EXPORT_DIR
    weights, cfg_path = os.path.join(path, WEIGHTS_NAME), os.path.join(path, CONFIG_NAME)
    if not (os.path.isfile(weights) and os.path.isfile(cfg_path)):
        raise FileNotFoundError(f"no classifier at {path} (expected {WEIGHTS_NAME} and {CONFIG_NAME}); "
                                "train and export it with: python -m studio train classifier --minutes 10 --export")
    with open(cfg_path) as f:
        config = json.load(f)
    heads = config.get("heads")
    if heads is not None and {k: tuple(v) for k, v in heads.items()} != HEADS:
        raise ValueError(f"{path}: the classifier's heads {heads} do not match this ShapesWorld vocabulary")
    with torch.inference_mode(False):  # normal tensors even when called inside an inference-mode run
        model = NoisyAttributeClassifier(ClassifierConfig.from_dict(config))
        model.load_state_dict({k: v.float() for k, v in load_file(weights).items()})
        model.to(device).eval().requires_grad_(False)
    return model


def main(args) -> int:
    """`python -m studio train classifier [--minutes M | --steps N] [--resume] [--eval N] [--export]`."""
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    tr = Trainer()
    if args.resume or args.export:
        tr.load()
    elif tr.has_state():
        print(f"a run state exists in {tr.dir}: pass --resume to continue it (or delete the folder to restart)")
        return 2
    if args.minutes or args.steps:
        tr.train(minutes=args.minutes, steps=args.steps)
    if args.export and tr.step == 0:
        print(f"nothing to export: no trained classifier in {tr.dir} (train it first with --minutes or --steps)")
        return 2
    if args.eval:
        tr.evaluate_and_log(n=args.eval)
        tr.save()
    if args.export:
        tr.export()
    return 0
