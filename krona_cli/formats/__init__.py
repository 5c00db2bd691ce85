"""Adapter files in and out, one module per format: `native.py` (krona's own: one .safetensors, settings in its
metadata), `lycoris.py` (LyCORIS / kohya LoKr, read and written), `lora.py` (diffusers and kohya LoRA read; LoRA
written from a Kronecker adapter by truncated SVD, in kohya's key layout by default), `official.py` (official
DiffuseKronA checkpoints, read); `detect.py` tells them apart and reads any of them. Shared by the formats:
`kohya_names.py` (kohya's lora names, diffusers- or SGM-named) and `ui_metadata.py` (the modelspec and kohya `ss_`
keys other tools show)."""

from .detect import describe, detect_format, load_adapter, read_adapter
from .lora import LoraAdapter, from_lora, lora_deltas, save_lora, to_lora
from .lycoris import from_lycoris, save_lycoris, to_lycoris
from .native import (
    Adapter,
    attach,
    canonical_name,
    collect_adapter,
    file_sha256,
    module_name,
    read_safetensors,
    save_adapter,
)
from .official import LAYOUT_DIFFUSEKRONA, from_official, official_delta

__all__ = [
    "LAYOUT_DIFFUSEKRONA",
    "Adapter",
    "LoraAdapter",
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
    "lora_deltas",
    "module_name",
    "official_delta",
    "read_adapter",
    "read_safetensors",
    "save_adapter",
    "save_lora",
    "save_lycoris",
    "to_lora",
    "to_lycoris",
]
