"""Textual-inversion embeddings (survey §10.1.1): a learned token embedding carries a new concept.

The generator stays frozen; the concept lives in one (or a few) vectors v* of the text encoder's
token-embedding table, reached through a new word S* in the prompt ("a photo of S* on a beach").
Loading one therefore adds S* to the tokenizer and v* to the embedding table, as diffusers'
`load_textual_inversion` does, so a file that works there works here and gives the same pixels:

* the file is a safetensors file with a single tensor: diffusers' `{"<token>": (k, dim) or (dim,)}`
  or A1111's `{"emb_params": (k, dim)}` (its token must be given);
* a k-vector embedding becomes the tokens S*, S*_1, ..., S*_{k-1}; prompts spell only S*, and
  `expand_prompt` rewrites it to the k tokens before tokenizing (diffusers' `maybe_convert_prompt`).

Added tokens persist for the life of the loaded model: they only extend the vocabulary, so prompts
that do not use them encode exactly as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class EmbeddingRef:
    """A textual-inversion file and the token that calls it (None: the file's own key)."""

    path: str
    token: Optional[str] = None


def read_embedding(path: str, token: Optional[str]) -> tuple[str, torch.Tensor]:
    """(token, vectors (k, dim)) from a safetensors embedding file. Only the session manager calls this."""
    from safetensors.torch import load_file

    try:
        sd = load_file(path, device="cpu")
    except Exception as e:  # not a safetensors file, truncated file
        raise ValueError(f"{path}: not a readable safetensors embedding ({type(e).__name__})") from None
    if len(sd) != 1:
        raise ValueError(f"{path}: a textual-inversion file holds one tensor; this one has {len(sd)} "
                         f"({', '.join(sorted(sd)[:4])}{', ...' if len(sd) > 4 else ''})")
    key, vectors = next(iter(sd.items()))
    if token is None:
        if key in ("emb_params", "string_to_param"):
            raise ValueError(f"{path}: this embedding file does not name its token; give one (\"token\": \"<name>\")")
        token = key
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or vectors.shape[0] < 1:
        raise ValueError(f"{path}: expected an embedding of shape (dim,) or (vectors, dim), got {tuple(vectors.shape)}")
    return token, vectors


def token_names(token: str, count: int) -> list[str]:
    """The tokenizer entries of a `count`-vector embedding: token, token_1, ..., token_{count-1}."""
    return [token] + [f"{token}_{i}" for i in range(1, count)]


def add_embedding(tokenizer, text_encoder, token: str, vectors: torch.Tensor) -> list[str]:
    """Add `token` (and its extra vectors) to the tokenizer and the text encoder's embedding table.

    The same steps as diffusers' `load_textual_inversion`: grow the table, add each token, write its
    vector in the new row. Existing rows are untouched. Only the session manager calls this.
    """
    names = token_names(token, vectors.shape[0])
    vocab = tokenizer.get_vocab()
    taken = [n for n in names if n in vocab]
    if taken:
        raise ValueError(f"token {taken[0]!r} is already in the tokenizer's vocabulary; choose another token name")
    table = text_encoder.get_input_embeddings().weight
    if vectors.shape[-1] != table.shape[-1]:
        raise ValueError(f"embedding for {token!r} has width {vectors.shape[-1]} but the text encoder's tokens have "
                         f"width {table.shape[-1]} (an embedding made for another model?)")
    text_encoder.resize_token_embeddings(len(tokenizer) + len(names), mean_resizing=False)
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for name, vector in zip(names, vectors):
            tokenizer.add_tokens(name)
            table[tokenizer.convert_tokens_to_ids(name)] = vector.to(table.device, table.dtype)
    return names


def expand_prompt(prompt: str, tokenizer) -> str:
    """Spell each multi-vector token S* as "S* S*_1 ... S*_{k-1}" (diffusers' `maybe_convert_prompt`).

    A no-op for prompts without added tokens and for single-vector tokens.
    """
    for tok in set(tokenizer.tokenize(prompt)):
        if tok in tokenizer.added_tokens_encoder:
            replacement, i = tok, 1
            while f"{tok}_{i}" in tokenizer.added_tokens_encoder:
                replacement += f" {tok}_{i}"
                i += 1
            prompt = prompt.replace(tok, replacement)
    return prompt
