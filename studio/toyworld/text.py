"""ShapesWorld's word-level CLIP tokenizer and small CLIP text encoder configuration.

The tokenizer is a real `CLIPTokenizer` (byte-level BPE as in CLIP) whose merges are
chosen so that every word of the caption grammar is exactly one token. That keeps
cross-attention maps per word, which Prompt-to-Prompt and the attention viewer need.
Any other text still tokenizes (character pieces), it just was never seen in training.
"""

from __future__ import annotations

import json
import os
import tempfile

from .world import vocabulary

MAX_LENGTH = 32


def _bytes_to_unicode() -> dict[int, str]:
    # CLIP's reversible byte -> printable-unicode table.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _apply_merges(symbols: list[str], merges: list[tuple[str, str]]) -> list[str]:
    ranks = {m: i for i, m in enumerate(merges)}
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def build_vocab_and_merges(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level base vocabulary plus merges that make each word in `words` one token."""
    base = list(_bytes_to_unicode().values())
    vocab_list = base + [c + "</w>" for c in base]
    merges: list[tuple[str, str]] = []
    changed = True
    while changed:
        changed = False
        for w in words:
            syms = list(w[:-1]) + [w[-1] + "</w>"]
            syms = _apply_merges(syms, merges)
            if len(syms) > 1:
                merges.append((syms[0], syms[1]))
                changed = True
    for a, b in merges:
        if a + b not in vocab_list:
            vocab_list.append(a + b)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab_list)}, merges


def build_tokenizer(out_dir: str | None = None, words: list[str] | None = None):
    """Build the ShapesWorld `CLIPTokenizer`; save it to `out_dir` when given."""
    from transformers import CLIPTokenizer

    vocab, merges = build_vocab_and_merges(words or vocabulary())
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w") as f:
            json.dump(vocab, f)
        with open(os.path.join(tmp, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
        tok = CLIPTokenizer.from_pretrained(tmp, model_max_length=MAX_LENGTH, pad_token="<|endoftext|>")
        if out_dir:
            tok.save_pretrained(out_dir)
    return tok


def text_encoder_config(vocab_size: int, hidden_size: int = 64):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        projection_dim=hidden_size,
    )
