"""Prompt tokens and their columns in the cross-attention maps (survey §7.2.1, L1113-1143).

A cross-attention map A (pixels x text tokens) has one column per position of the encoded prompt:
the start token at column 0, the prompt's tokens at columns 1..n, then the end token and padding.
These helpers find the columns of a word and align the tokens of two prompts, as Prompt-to-Prompt's
`seq_aligner` does for refinement.
"""

from __future__ import annotations

from typing import Union

import numpy as np


def tokenizer_of(bundle):
    """The (first) CLIP tokenizer whose token positions are the columns of the cross-attention maps."""
    tok = getattr(bundle, "extra", {}).get("tokenizer")
    if tok is None:
        raise ValueError(f"{getattr(bundle, 'name', '') or getattr(bundle, 'family', 'this model')}: "
                         "no tokenizer to map words to cross-attention columns")
    return tok


def _expand(bundle, prompt: str) -> str:
    """The prompt as the family encodes it (multi-vector textual-inversion tokens spelled out)."""
    from ..adapters.textual_inversion import expand_prompt

    return expand_prompt(prompt, tokenizer_of(bundle))


def prompt_ids(bundle, prompt: str) -> list[int]:
    """The token ids of `prompt` between the start and end tokens, as far as the encoder's length allows."""
    tok = tokenizer_of(bundle)
    ids = tok(_expand(bundle, prompt), truncation=True, max_length=tok.model_max_length).input_ids
    return list(ids[1:-1])


def prompt_tokens(bundle, prompt: str) -> list[str]:
    """The prompt's tokens a user can pick (ShapesWorld: one per word), without the end-of-word mark."""
    tok = tokenizer_of(bundle)
    return [t[:-4] if t.endswith("</w>") else t for t in tok.convert_ids_to_tokens(prompt_ids(bundle, prompt))]


def sequence_length(bundle) -> int:
    return int(tokenizer_of(bundle).model_max_length)


def token_columns(bundle, prompt: str, token: Union[str, int]) -> list[int]:
    """Columns of the cross-attention map (start token = column 0) that belong to `token`: an index into
    `prompt_tokens`, or a word, every occurrence of it (a word the tokenizer splits matches its pieces
    in sequence). ValueError when the prompt does not contain it."""
    tokens = prompt_tokens(bundle, prompt)
    if isinstance(token, (int, np.integer)) and not isinstance(token, bool):
        if not 0 <= int(token) < len(tokens):
            raise ValueError(f"token index {token} is outside the prompt's {len(tokens)} tokens ({' '.join(tokens)})")
        return [int(token) + 1]
    if not isinstance(token, str) or not token.strip():
        raise ValueError(f"token must be a word of the prompt or an index, not {token!r}")
    word = token.strip().lower()
    cols = [i + 1 for i, t in enumerate(tokens) if t.lower() == word]
    if cols:
        return cols
    pieces = prompt_ids(bundle, word)
    ids = prompt_ids(bundle, prompt)
    for start in range(len(ids) - len(pieces) + 1):
        if pieces and ids[start:start + len(pieces)] == pieces:
            cols += [start + 1 + j for j in range(len(pieces))]
    if not cols:
        raise ValueError(f"{token!r} is not a token of the prompt {prompt!r} (its tokens: {' '.join(tokens)})")
    return cols


def align(src: list[int], tgt: list[int]) -> list[int]:
    """For every target token, the index of the source token it is aligned with, or -1 when it is new.

    Global alignment with Prompt-to-Prompt's scores (`seq_aligner.ScoreParams(gap=0, match=1,
    mismatch=-1)`): with a free gap a substitution never pays, so this is a longest common subsequence;
    source tokens off it are deleted, target tokens off it inserted."""
    n, m = len(src), len(tgt)
    best = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            best[i][j] = best[i + 1][j + 1] + 1 if src[i] == tgt[j] else max(best[i + 1][j], best[i][j + 1])
    out = [-1] * m
    i = j = 0
    while i < n and j < m:
        if src[i] == tgt[j]:
            out[j] = i
            i, j = i + 1, j + 1
        elif best[i + 1][j] >= best[i][j + 1]:
            i += 1
        else:
            j += 1
    return out


def column_mapper(src_ids: list[int], tgt_ids: list[int], length: int) -> tuple[np.ndarray, np.ndarray]:
    """(mapper, from_source) over all `length` columns of the target map: target column j takes source
    column mapper[j] when from_source[j], else keeps its own. Start and end tokens map to each other,
    the prompt tokens follow `align`, the padding after the end token keeps its offset from it."""
    mapper = np.arange(length)
    from_source = np.zeros(length, dtype=bool)
    mapper[0], from_source[0] = 0, True
    for j, i in enumerate(align(src_ids, tgt_ids)):
        if i >= 0:
            mapper[j + 1], from_source[j + 1] = i + 1, True
    end_s, end_t = len(src_ids) + 1, len(tgt_ids) + 1
    for j in range(end_t, length):
        i = end_s + (j - end_t)
        if i < length:
            mapper[j], from_source[j] = i, True
    return mapper, from_source
