"""Attention processors for the internal-contrast guidance methods (survey §5.2; STYLE item 3).

Each method's processor wraps the layer's own processor: the rows of the batch that belong to a
perturbed branch go through the perturbed attention, every other row through the layer's own
processor, unchanged. The guidance installs them in `patch` (`base.installed`, which restores the
saved processors exactly, also when the run fails) and tells them the rows before every forward.

  base.py  rows, layer selection, install/restore, the token grid of a layer
  pag.py   identity self-attention (PAG, §5.2.3): each token's output is its own value
  seg.py   Gaussian-blurred queries over the 2-D token grid (SEG, §5.2.4)
  sag.py   a recorder of self-attention maps (SAG, §5.2.2), output unchanged
"""
