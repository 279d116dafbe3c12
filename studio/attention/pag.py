"""Identity self-attention for Perturbed-Attention Guidance (survey §5.2.3, L794-818; Ahn et al.).

PAG replaces the self-attention map W = softmax(Q K^T / sqrt(d)) of selected layers by the identity
matrix (L796: "substituting selected self-attention maps with an identity matrix"), so W V = V: every
token's attention output is its own value vector, with no token-to-token mixing. The rest of the
layer (input norms, value and output projections, residual, rescale) is unchanged, as in diffusers'
`PAGIdentitySelfAttnProcessor2_0`. Only the rows of perturbed branches take this path.
"""

from __future__ import annotations

from .base import RowSplitProcessor, attention_input, attention_output


class IdentitySelfAttention(RowSplitProcessor):
    """Selected rows: output = to_out(to_v(x)), the attention map replaced by the identity."""

    def perturbed(self, attn, hidden_states, attention_mask, temb):
        tokens, residual, shape4 = attention_input(attn, hidden_states, temb)
        return attention_output(attn, attn.to_v(tokens), residual, shape4)
