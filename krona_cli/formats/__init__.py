"""Adapter files in and out. `adapter.py` holds the one in-memory adapter every format is read into and written
from (per-layer records by component and module, each with its own update); then one module per format: `native.py`
(krona's own: one .safetensors, settings in its metadata), `lycoris.py` (LyCORIS / kohya LoKr, read and written),
`lora.py` (diffusers and kohya LoRA read; LoRA written from a Kronecker adapter by truncated SVD, in kohya's key
layout by default), `official.py` (official DiffuseKronA checkpoints, read); `detect.py` tells them apart and reads
any of them. Shared by the formats: `kohya_names.py` (kohya's lora names, diffusers- or SGM-named) and
`ui_metadata.py` (the modelspec and kohya `ss_` keys other tools show). Only the format modules spell file keys."""

from .adapter import (
    LAYOUT_DIFFUSEKRONA,
    LAYOUT_LORA,
    LAYOUT_STANDARD,
    Adapter,
    DiffuseKronALayer,
    KronLayer,
    LoraLayer,
)
from .detect import describe, detect_format, load_adapter, read_adapter
from .lora import from_lora, save_lora, to_lora
from .lycoris import from_lycoris, save_lycoris, to_lycoris
from .native import (
    attach,
    canonical_name,
    collect_adapter,
    file_sha256,
    module_name,
    read_safetensors,
    save_adapter,
)
from .official import from_official

__all__ = [
    "LAYOUT_DIFFUSEKRONA",
    "LAYOUT_LORA",
    "LAYOUT_STANDARD",
    "Adapter",
    "DiffuseKronALayer",
    "KronLayer",
    "LoraLayer",
    "attach",
    "canonical_name",
    "collect_adapter",
    "describe",
    "detect_format",
    "file_sha256",
    "from_lora",
    "from_lycoris",
    "from_official",
    "load_adapter",
    "module_name",
    "read_adapter",
    "read_safetensors",
    "save_adapter",
    "save_lora",
    "save_lycoris",
    "to_lora",
    "to_lycoris",
]
