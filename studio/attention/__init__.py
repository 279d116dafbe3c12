"""Attention processors for the internal-contrast guidance methods (survey §5.2; STYLE item 3).

Each method's processor wraps the layer's own processor: the rows of the batch that belong to a
perturbed branch go through the perturbed attention, every other row through the layer's own
processor, unchanged. The guidance installs them in `patch` (`base.installed`, which restores the
saved processors exactly, also when the run fails) and tells them the rows before every forward.

  base.py  rows, layer selection, install/restore, the token grid of a layer
  pag.py   identity self-attention (PAG, §5.2.3): each token's output is its own value
  seg.py   Gaussian-blurred queries over the 2-D token grid (SEG, §5.2.4)
  sag.py   a recorder of self-attention maps (SAG, §5.2.2), output unchanged

The editing methods (survey §7, studio/editing) use one processor on every layer for a run, which runs
the layer's own processor and lets a controller edit Q, K, V or the attention probabilities of the
edit branch's rows:

  edit.py      the processor, the controller contract, layer enumeration, install/restore
  tokens.py    prompt tokens, their cross-attention columns, Prompt-to-Prompt's token alignment
  p2p.py       Prompt-to-Prompt (§7.2.1): column mapping, reweighting, self-attention copy, local blend
  p2p_style.py Prompt-to-Prompt's style injection, Ã = (1 - α) A_s + α A_t (§7.2.1 table)
  masactrl.py  MasaCtrl's mutual self-attention (§7.2.2)
  kv_reuse.py  background keys and values from the source pass (§7.2.3)
  infedit.py   infEdit's unified attention control: modulation and merging (§7.2.4)
  pnp.py       Plug-and-Play feature and self-attention injection (§7.3.1)
  store.py     a recorder of cross-attention maps; viewer.py: the attention viewer on top of it
"""
