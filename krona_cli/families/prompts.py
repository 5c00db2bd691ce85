"""Prompts as a denoiser reads them: token ids, and the one conditioning record every family's prompt encoding gives
(per-token text states, and a pooled text vector where the family has one). Torch is imported where tensors are made."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


def tokenize(tokenizer, prompts: Sequence[str], max_length: int | None = None):
    """Token ids (N, length) padded and truncated to `max_length`, by default the tokenizer's (77 for CLIP)."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=max_length or tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


@dataclass(frozen=True)
class Conditioning:
    """Prompt embeddings of N prompts: `embeds` (N, tokens, width) the denoiser attends to, `pooled` (N, width) or
    None, and `mask` (N, tokens) of the real tokens where the denoiser reads those alone, else None. A cache
    keeps `row(i)`s and `stack` puts rows together again."""

    embeds: Any
    pooled: Any = None
    mask: Any = None

    def row(self, i: int) -> Conditioning:
        return Conditioning(*(None if part is None else part[i] for part in (self.embeds, self.pooled, self.mask)))

    @staticmethod
    def stack(rows: Sequence[Conditioning]) -> Conditioning:
        import torch

        def stacked(parts):
            return None if parts[0] is None else torch.stack(parts)

        return Conditioning(*(stacked([getattr(r, name) for r in rows]) for name in ("embeds", "pooled", "mask")))
