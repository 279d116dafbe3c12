"""What the perturbation processors share: which rows, which layers, install/restore, the token grid.

`RowSelection` is the per-forward state a guidance method writes (`Guidance.before_forward`) and its
processors read: the batch size of the next forward, the rows to act on, and the latent's spatial
size (from which a layer's 2-D token grid follows). `RowSplitProcessor` runs the layer's own
processor on the other rows and the method's `perturbed` computation on the selected ones; with no
selected row it calls the layer's own processor on the whole batch, so an unperturbed forward is
bit-for-bit the normal one.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Callable, Optional, Sequence

import torch


class RowSelection:
    """The rows of the next forward that a processor acts on, set before every forward."""

    def __init__(self):
        self.batch: Optional[int] = None
        self.rows: tuple[int, ...] = ()
        self.latent_size: Optional[tuple[int, int]] = None

    def set(self, batch: int, rows: Sequence[int], latent_size: Optional[tuple[int, int]] = None) -> None:
        self.batch, self.rows = int(batch), tuple(int(r) for r in rows)
        self.latent_size = latent_size

    def clear(self) -> None:
        self.batch, self.rows = None, ()

    def for_batch(self, batch: int) -> tuple[int, ...]:
        """The selected rows of a forward of `batch` rows; () when nothing is selected."""
        if not self.rows:
            return ()
        if batch != self.batch:
            raise RuntimeError(f"perturbation rows were set for a batch of {self.batch}, but the layer sees {batch} "
                               "rows: the network was called without the guidance's before_forward")
        return self.rows


def rows_of(rows: dict[str, slice], branches: Sequence[str]) -> list[int]:
    """The batch rows of `branches` (names absent from `rows` are skipped), in batch order."""
    out = []
    for b in branches:
        if b in rows:
            s = rows[b]
            out.extend(range(s.start, s.stop))
    return sorted(out)


def latent_size(x_in: torch.Tensor) -> Optional[tuple[int, int]]:
    return (int(x_in.shape[-2]), int(x_in.shape[-1])) if x_in.dim() == 4 else None


def token_grid(n_tokens: int, latent: Optional[tuple[int, int]]) -> tuple[int, int]:
    """The (height, width) grid of a layer's n tokens: the latent halved (rounding up, as a stride-2
    convolution with padding 1 does) until it has n cells; a square grid when that fails."""
    if latent is not None:
        h, w = latent
        while h * w > n_tokens:
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        if h * w == n_tokens:
            return h, w
    side = math.isqrt(n_tokens)
    if side * side == n_tokens:
        return side, side
    raise ValueError(f"cannot lay {n_tokens} tokens out on the 2-D grid of a {latent} latent")


def self_attention_layers(net: torch.nn.Module, patterns: Sequence[str], method: str) -> list[str]:
    """Processor names (keys of `net.attn_processors`) of the self-attention layers whose module name
    matches any of `patterns` (regular expressions searched in the name, as diffusers' PAG pipelines
    select `pag_applied_layers`: "mid" is every self-attention layer of the middle block)."""
    from diffusers.models.attention_processor import Attention

    names = [n for n, m in net.named_modules() if isinstance(m, Attention) and not m.is_cross_attention]
    chosen = []
    for pattern in patterns:
        last = pattern.split(".")[-1]
        hits = [n for n in names if re.search(pattern, n)
                and not (last.isnumeric() and n.split(".")[-1].isnumeric() and last == n.split(".")[-1])]
        if not hits:
            raise ValueError(f"{method}: no self-attention layer matches {pattern!r}; the model's self-attention "
                             f"layers are {', '.join(names) or 'none'}")
        chosen += [h for h in hits if h not in chosen]
    return [f"{n}.processor" for n in chosen]


def attention_network(bundle, method: str) -> torch.nn.Module:
    """The bundle's UNet, whose self-attention layers the processors replace."""
    net = bundle.modules.get("unet")
    if net is None or not hasattr(net, "set_attn_processor"):
        raise ValueError(f"{method}: needs a UNet with attention processors (bundle.modules['unet']); "
                         f"the {getattr(bundle, 'family', '?')} model has none")
    return net


@contextlib.contextmanager
def installed(net: torch.nn.Module, replacements: dict[str, object]):
    """Set `replacements` (processor name -> processor) on `net` for the block; the saved processors
    come back exactly (the same objects), also when the block raises."""
    saved = dict(net.attn_processors)
    unknown = set(replacements) - set(saved)
    if unknown:
        raise KeyError(f"no attention layer named {', '.join(sorted(unknown))}")
    net.set_attn_processor({**saved, **replacements})
    try:
        yield
    finally:
        net.set_attn_processor(dict(saved))  # set_attn_processor pops from the dict it is given


def inner_call_kwargs(encoder_hidden_states, attention_mask, temb, kwargs) -> dict:
    out = dict(kwargs, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask)
    if temb is not None:
        out["temb"] = temb
    return out


class RowSplitProcessor:
    """The layer's own processor on unselected rows, `perturbed(attn, hidden_states, attention_mask, temb)`
    on the selected ones (subclasses define it)."""

    def __init__(self, inner: Callable, selection: RowSelection):
        self.inner = inner
        self.selection = selection

    def perturbed(self, attn, hidden_states: torch.Tensor, attention_mask, temb) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        batch = hidden_states.shape[0]
        selected = self.selection.for_batch(batch)
        if not selected:
            return self.inner(attn, hidden_states, **inner_call_kwargs(encoder_hidden_states, attention_mask, temb, kwargs))
        if encoder_hidden_states is not None:
            raise ValueError("a self-attention perturbation was installed on a layer that attends to encoder states")
        pick = torch.tensor(selected, device=hidden_states.device)

        def sub(t, idx):
            return t.index_select(0, idx) if t is not None and t.dim() > 0 and t.shape[0] == batch else t

        out_p = self.perturbed(attn, sub(hidden_states, pick), sub(attention_mask, pick), sub(temb, pick))
        if len(selected) == batch:
            return out_p
        chosen = set(selected)
        keep = torch.tensor([r for r in range(batch) if r not in chosen], device=hidden_states.device)
        out_k = self.inner(attn, sub(hidden_states, keep), **inner_call_kwargs(None, sub(attention_mask, keep),
                                                                             sub(temb, keep), kwargs))
        out = out_k.new_empty((batch,) + tuple(out_k.shape[1:]))
        out[keep] = out_k
        out[pick] = out_p.to(out.dtype)
        return out


def attention_input(attn, hidden_states: torch.Tensor, temb):
    """The steps of diffusers' AttnProcessor2_0 before the projections: (normed tokens (B, N, C),
    residual, the 4-D shape to restore or None)."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    shape4 = None
    if hidden_states.ndim == 4:
        shape4 = hidden_states.shape
        b, c, h, w = shape4
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states, residual, shape4


def attention_output(attn, hidden_states: torch.Tensor, residual, shape4) -> torch.Tensor:
    """The steps of AttnProcessor2_0 after attention: output projection, 4-D shape, residual, rescale."""
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if shape4 is not None:
        hidden_states = hidden_states.transpose(-1, -2).reshape(shape4)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor
