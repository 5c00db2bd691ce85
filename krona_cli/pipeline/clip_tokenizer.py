"""CLIP's byte-level BPE tokenizer built from a list of merges: the vocabulary is laid out as OpenAI's CLIP lays it
out (the 256 byte symbols, the same with `</w>`, one entry per merge, `<|startoftext|>`, `<|endoftext|>`), so the
merges alone define it. `clip_tokenizer()` is the real SD/SDXL tokenizer from the merges krona ships
(configs/tokenizers/); tiny.py builds its small tokenizer from merges it learns itself.
"""

from __future__ import annotations

import functools
import gzip

from transformers import CLIPTokenizer

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"  # CLIP's eos, unk and (for SD 1.x and SDXL's first tokenizer) pad
END_OF_WORD = "</w>"
MAX_LENGTH = 77  # CLIP's context length; the text encoders' position table has exactly this many rows
MERGES_FILE = "clip-bpe-merges.txt.gz"


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters, in CLIP's order.

    Printable latin-1 bytes map to themselves; the rest are shifted to code points from 256 up, so that every byte has
    a visible, non-whitespace symbol a BPE vocabulary can hold.
    """
    byte_values = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    code_points = byte_values[:]
    shift = 0
    for b in range(256):
        if b not in byte_values:
            byte_values.append(b)
            code_points.append(256 + shift)
            shift += 1
    return dict(zip(byte_values, (chr(c) for c in code_points)))


def vocabulary(merges: list[tuple[str, str]]) -> list[str]:
    """CLIP's vocabulary in id order for these merges."""
    byte_symbols = list(bytes_to_unicode().values())
    return [*byte_symbols, *(s + END_OF_WORD for s in byte_symbols), *("".join(pair) for pair in merges), BOS, EOS]


def tokenizer_from_merges(merges: list[tuple[str, str]], pad_token: str = EOS) -> CLIPTokenizer:
    """A CLIPTokenizer for these merges (context length 77; `pad_token` is `!` for SDXL's second and SD 2's)."""
    # transformers 5 builds the backend from `vocab`/`merges` (`vocab_file=` would be silently ignored), and without
    # `model_max_length` padding to max length would try to pad to an effectively infinite length.
    vocab = {token: index for index, token in enumerate(vocabulary(merges))}
    return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=MAX_LENGTH, pad_token=pad_token)


@functools.cache
def _shipped_merges() -> tuple[tuple[str, str], ...]:
    from ..architectures import CONFIGS_DIR

    with gzip.open(CONFIGS_DIR / "tokenizers" / MERGES_FILE, "rt", encoding="utf-8") as f:
        return tuple(tuple(line.split()) for line in f.read().splitlines())


def clip_tokenizer(pad_token: str = EOS) -> CLIPTokenizer:
    """OpenAI CLIP's tokenizer (49,408 tokens), as SD 1.x, SD 2.x and SDXL use it, from the shipped merges."""
    return tokenizer_from_merges(list(_shipped_merges()), pad_token)


def is_clip_tokenizer(tokenizer) -> bool:
    """True when `tokenizer` has exactly OpenAI CLIP's vocabulary (so a file need not carry it)."""
    return tokenizer.get_vocab() == {t: i for i, t in enumerate(vocabulary(list(_shipped_merges())))}
