"""Official DiffuseKronA checkpoints (IBM/DiffuseKronA, `pytorch_lora_weights.safetensors`) and their layout.

The official layer keeps A transposed as `down.weight` (a2 × a1) and B as `up.weight` (b1 × b2), with
a1·b1 = d_out and a2·b2 = d_in. Its forward pass views the input as (b2 × a2) blocks, computes Y = B · X · Aᵀ and
flattens Y row-major, so the update it applies is not A ⊗ B but a row permutation of it
(reference/diffusekrona.md §1):

    ΔW[p·a1 + q, i·b2 + j] = B[p, j] · A[q, i]     (p < b1, q < a1, i < a2, j < b2)

Standard A ⊗ B would put A[q, i] · B[p, j] at row q·b1 + p instead. Adapters read from these files therefore hold
`DiffuseKronALayer`s (layout `diffusekrona`, their update kron.diffusekrona_delta) and are not attached as standard
Kronecker adapters.

Key names (diffusers 0.21 `save_lora_weights`):
    unet.<attention path>.processor.to_{q,k,v,out}_lora.{down,up}.weight
    text_encoder.text_model.encoder.layers.N.self_attn.{q,k,v,out}_proj.lora_linear_layer.{down,up}.weight
(the `unet.` prefix is optional: diffusers' `save_attn_procs` leaves it out). A diffusers LoRA file uses the same
names, with down (r × d_in) and up (d_out × r); the two are told apart by shape (official_outline.py's `_classify`,
which reads the keys and shapes without torch; here its outline is filled with the tensors).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .adapter import DiffuseKronALayer, Make, torch_tensor
from .official_outline import is_official, official_outline
from .outline import Adapter, tensor_infos
from .safetensors_file import float32

__all__ = ["fill_official", "from_official", "is_official"]


def fill_official(outline: Adapter, tensors: Mapping[str, Any], make: Make = torch_tensor) -> Adapter:
    """An official checkpoint's outline (official_outline.py) filled with its tensors: DiffuseKronALayers with
    A = down.weightᵀ and B = up.weight in float32, handed to `make`."""
    return outline.with_layers(
        lambda layer: DiffuseKronALayer(
            make(np.ascontiguousarray(float32(tensors[layer.keys["down"]]).T)), make(float32(tensors[layer.keys["up"]]))
        )
    )


def from_official(tensors: Mapping[str, Any], metadata: dict[str, str], source: str) -> Adapter:
    """An Adapter of DiffuseKronALayers (layout "diffusekrona") from the tensors (numpy or torch) of an official
    DiffuseKronA checkpoint, in torch tensors; module names, settings and the errors for files krona does not read are
    official_outline.py's. `metadata` (diffusers writes only {"format": "pt"}) is not used."""
    del metadata
    return fill_official(official_outline(tensor_infos(tensors), source), tensors)
