"""Prompt embeddings as SDXL and SD 1.x/2.x UNets read them during training.

SDXL: the penultimate hidden states of both CLIP text encoders, concatenated on the feature axis, and the pooled
(projected) output of the second one. SD 1.x/2.x: the last hidden state of the one encoder. This is what diffusers'
DreamBooth scripts compute (no classifier-free guidance, no prompt weighting).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids padded and truncated to the tokenizer's max length (77 for CLIP)."""
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_prompts(
    tokenizers: Sequence, text_encoders: Sequence[torch.nn.Module], prompts: Sequence[str], sdxl: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt embeddings (N, 77, width), pooled embeddings (N, width) for SDXL else None), on the encoders' device."""
    if not sdxl:
        encoder = text_encoders[0]
        device = next(encoder.parameters()).device
        return encoder(tokenize(tokenizers[0], prompts).to(device))[0], None
    hidden, pooled = [], None
    for tokenizer, encoder in zip(tokenizers, text_encoders):
        device = next(encoder.parameters()).device
        out = encoder(tokenize(tokenizer, prompts).to(device), output_hidden_states=True)
        pooled = out[0]  # the last encoder's projected pooled output is the one SDXL uses
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, dim=-1), pooled
