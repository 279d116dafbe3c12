"""The attention processor of the editing methods (survey §7.2-§7.3) and the controller contract it calls.

Editing runs a source branch and an edit branch side by side in one batched forward (studio/editing).
Every attention layer of the UNet gets an `EditAttentionProcessor` for the run. It first runs the
layer's own processor on the whole batch, so the source rows (and every row of a layer or step that
the method leaves alone) are bit-for-bit the unedited computation. When the method's controller wants
the layer at this step, the processor also computes the layer explicitly,

    Q = W_Q x,  K = W_K c,  V = W_V c,   A = softmax(Q K^T / sqrt(d)),   out = W_O (A V)

(c = x for self-attention, the prompt's token embeddings for cross-attention), lets the controller
replace rows of Q, K, V (MasaCtrl, KV reuse, PnP) or of A (Prompt-to-Prompt), and writes the result
into the edit rows the controller names.

Controllers keep Prompt-to-Prompt's small interface (STYLE item 3): `forward(probs, layer)` edits
attention probabilities, `edit_qkv(layer, q, k, v)` edits the projections, `merge_rows(layer)` names
edit rows whose attention output is mixed with the source row's own (infEdit's merging, §7.2.4), `between_steps()` advances
the step and `reset()` forgets the run. Before every forward the runner tells the controller the batch
layout (`set_layout`): which rows are the source branch and which the edit branch, pair by pair
(one pair without CFG; an unconditional and a conditional pair with CFG).

`install(net, controller)` replaces every attention processor for a block and restores the saved
processor objects exactly afterwards, also when the block raises (`base.installed`).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .base import attention_input, attention_output, inner_call_kwargs, installed, token_grid


@dataclass(frozen=True)
class LayerInfo:
    """One attention layer of the UNet: its module name, kind and position."""

    name: str  # module name, e.g. "up_blocks.1.attentions.0.transformer_blocks.0.attn1"
    is_cross: bool
    place: str  # "down", "mid" or "up" (the decoder)
    index: int  # position among the layers of the same kind (self or cross), in down, mid, up order
    decoder_index: int  # position among the decoder (up-block) layers of the same kind; -1 outside the decoder

    @property
    def processor_name(self) -> str:
        return f"{self.name}.processor"


def _place(name: str) -> str:
    if name.startswith("down_blocks"):
        return "down"
    if name.startswith("mid_block"):
        return "mid"
    if name.startswith("up_blocks"):
        return "up"
    return "other"


def attention_layers(net: torch.nn.Module) -> list[LayerInfo]:
    """Every attention layer of `net`, self-attention first numbered in UNet order (down, mid, up),
    then cross-attention likewise."""
    from diffusers.models.attention_processor import Attention

    order = {"down": 0, "mid": 1, "up": 2, "other": 3}
    found = [(n, m.is_cross_attention) for n, m in net.named_modules() if isinstance(m, Attention)]
    found.sort(key=lambda nc: order[_place(nc[0])])  # stable: module order inside each part
    out = []
    for cross in (False, True):
        same = [n for n, c in found if c == cross]
        dec = 0
        for i, n in enumerate(same):
            place = _place(n)
            out.append(LayerInfo(n, cross, place, i, dec if place == "up" else -1))
            dec += place == "up"
    return out


def match_layers(layers: Sequence[LayerInfo], patterns: Optional[Sequence[str]], what: str) -> list[LayerInfo]:
    """The layers whose name matches any pattern (a regular expression searched in the module name:
    "up", "mid", "down_blocks.1", a full name); all of them when `patterns` is None."""
    if patterns is None:
        return list(layers)
    if isinstance(patterns, str):
        patterns = [p for p in re.split(r"[,\s]+", patterns) if p]
    chosen: list[LayerInfo] = []
    for p in patterns:
        hits = [l for l in layers if re.search(p, l.name)]
        if not hits:
            raise ValueError(f"no {what} layer matches {p!r}; the {what} layers are "
                             f"{', '.join(l.name for l in layers) or 'none'}")
        chosen += [h for h in hits if h not in chosen]
    return chosen


class AttentionController:
    """Per-run state shared by the processors: the step, the batch layout, the edits (subclasses).

    `pairs` lists (source row, edit row) of the next forward; `cond_pair` is the pair of the
    conditional (prompt) rows, the one Prompt-to-Prompt edits. Subclasses override `wants`,
    `edit_qkv` and/or `forward`; the defaults change nothing.
    """

    def __init__(self):
        self.step = 0
        self.num_steps = 1
        self.batch: Optional[int] = None
        self.pairs: tuple[tuple[int, int], ...] = ()
        self.cond_pair: Optional[tuple[int, int]] = None
        self.latent_size: Optional[tuple[int, int]] = None

    # --- the runner's side
    def set_layout(self, batch: int, pairs: Sequence[tuple[int, int]], cond_pair: Optional[tuple[int, int]],
                   latent_size: Optional[tuple[int, int]]) -> None:
        self.batch, self.pairs, self.cond_pair = int(batch), tuple(pairs), cond_pair
        self.latent_size = latent_size

    def begin(self, num_steps: int, start: int = 0) -> None:
        self.reset()
        self.num_steps, self.step = int(num_steps), int(start)

    def between_steps(self) -> None:
        self.step += 1

    def reset(self) -> None:
        self.step = 0

    @property
    def fraction(self) -> float:
        """Fraction of the run completed before this step, in [0, 1)."""
        return self.step / max(1, self.num_steps)

    # --- the processors' side
    def check_batch(self, batch: int) -> None:
        if batch != self.batch:
            raise RuntimeError(f"the editing controller was set for a batch of {self.batch} rows, but the layer "
                               f"sees {batch}: the network was called without set_layout")

    def wants(self, layer: LayerInfo) -> bool:
        """Whether the layer needs the explicit computation at this step (to edit or to record)."""
        return False

    def needs_probs(self, layer: LayerInfo) -> bool:
        """Whether `forward` must see the attention probabilities (else the edited rows use SDPA)."""
        return False

    def edit_qkv(self, layer: LayerInfo, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """(q, k, v, rows): projections (B, heads, N, d) with some rows replaced, and the rows to write."""
        return q, k, v, ()

    def forward(self, probs: torch.Tensor, layer: LayerInfo):
        """(probs, rows): attention probabilities (B, heads, N, L) with some rows edited, and the rows to write."""
        return probs, ()

    def merge_rows(self, layer: LayerInfo) -> dict:
        """{edit row: (source row, γ)}: rows whose attention output (before W_O) becomes
        γ * (their own) + (1 - γ) * (the source row's own attention, softmax(Q_s K_s^T) V_s); infEdit's
        attention merging (§7.2.4). The default merges nothing."""
        return {}

    def grid(self, n_tokens: int) -> tuple[int, int]:
        return token_grid(n_tokens, self.latent_size)


class EditAttentionProcessor:
    """The layer's own processor on the whole batch, then the controller's edits on the rows it names."""

    def __init__(self, inner: Callable, controller: AttentionController, layer: LayerInfo):
        self.inner = inner
        self.controller = controller
        self.layer = layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        out = self.inner(attn, hidden_states, **inner_call_kwargs(encoder_hidden_states, attention_mask, temb, kwargs))
        ctl = self.controller
        if not ctl.wants(self.layer):
            return out
        batch = hidden_states.shape[0]
        ctl.check_batch(batch)
        tokens, residual, shape4 = attention_input(attn, hidden_states, temb)
        if encoder_hidden_states is None:
            context = tokens
        else:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        q, k, v = attn.to_q(tokens), attn.to_k(context), attn.to_v(context)
        head_dim = k.shape[-1] // attn.heads
        q, k, v = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        mask = None
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, context.shape[1], batch)
            mask = mask.view(batch, attn.heads, -1, mask.shape[-1])
        q0, k0, v0 = q, k, v  # the projections before the controller's edits (merging reads the source's own)
        q, k, v, rows_qkv = ctl.edit_qkv(self.layer, q, k, v)
        rows_p: Sequence[int] = ()
        probs = None
        if ctl.needs_probs(self.layer):
            scores = q.float() @ k.float().transpose(-1, -2) * (head_dim ** -0.5)
            if mask is not None:
                scores = scores + mask.float()
            probs, rows_p = ctl.forward(scores.softmax(dim=-1), self.layer)
        rows = sorted(set(rows_qkv) | set(rows_p))
        if not rows:
            return out
        idx = torch.tensor(rows, device=hidden_states.device)
        explicit = set(rows_p)
        parts = []
        for r in rows:  # rows with edited probabilities use them; rows with edited projections use SDPA
            if r in explicit:
                parts.append(probs[r:r + 1].to(v.dtype) @ v[r:r + 1])
            else:
                m = None if mask is None else mask[r:r + 1]
                parts.append(F.scaled_dot_product_attention(q[r:r + 1], k[r:r + 1], v[r:r + 1], attn_mask=m,
                                                            dropout_p=0.0, is_causal=False))
        h = torch.cat(parts)
        merge = ctl.merge_rows(self.layer)
        if merge:
            h = h.clone()
            for pos, r in enumerate(rows):
                if r in merge:
                    s, g = merge[r]
                    m = None if mask is None else mask[s:s + 1]
                    own_s = F.scaled_dot_product_attention(q0[s:s + 1], k0[s:s + 1], v0[s:s + 1], attn_mask=m,
                                                           dropout_p=0.0, is_causal=False)
                    h[pos] = g * h[pos] + (1.0 - g) * own_s[0]
        h = h.transpose(1, 2).reshape(len(rows), -1, attn.heads * head_dim).to(q.dtype)
        sub_shape = None if shape4 is None else (len(rows),) + tuple(shape4[1:])
        edited = attention_output(attn, h, residual.index_select(0, idx), sub_shape)
        out = out.clone()
        out[idx] = edited.to(out.dtype)
        return out


@contextlib.contextmanager
def install(net: torch.nn.Module, controller: AttentionController):
    """Every attention layer of `net` gets an `EditAttentionProcessor` around its own processor for the
    block; the saved processors come back exactly (the same objects), also when the block raises."""
    saved = net.attn_processors
    layers = attention_layers(net)
    replacements = {l.processor_name: EditAttentionProcessor(saved[l.processor_name], controller, l) for l in layers}
    with installed(net, replacements):
        yield layers


@contextlib.contextmanager
def forward_hook(module: torch.nn.Module, hook: Callable):
    """`module.register_forward_hook(hook)` for the block, removed afterwards (also when it raises)."""
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
