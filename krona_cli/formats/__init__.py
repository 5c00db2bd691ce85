"""Adapter files in and out. `outline.py` holds the one in-memory `Adapter` (per-layer records by component and
module, and its settings) and what layers' shapes tell, without torch; `adapter.py` the layers with their tensors, each
with its own update. Each format is read in two steps: `<format>_outline.py` reads a file's keys, shapes and metadata
into an Adapter of outlines, without torch, and `<format>.py` fills it with the tensors and writes the format:
`native` (krona's own: one .safetensors, settings in its metadata), `lycoris` (LyCORIS / kohya LoKr, read and
written), `lora` (diffusers and kohya LoRA read; LoRA written from a Kronecker adapter by truncated SVD, in kohya's key
layout by default), `official` (official DiffuseKronA checkpoints, read). `detect.py` tells them apart, `read.py`
reads any of them, `description.py` describes one from its header alone (`krona inspect`, no torch), and
`safetensors_file.py` reads a header and single numbers without torch. Shared by the formats: `kohya_names.py` (kohya's
lora names, diffusers- or SGM-named, with `unet_paths.py`) and `ui_metadata.py` (the modelspec and kohya `ss_` keys
other tools show). Only the format modules spell file keys.

Names are imported on first use, so the torch-free parts load without torch (`krona inspect` needs no model library).
No exported name is also a submodule's name: importing a submodule sets the package attribute of its name."""

from __future__ import annotations

from ..lazy import lazy_exports

_WHERE = {
    "outline": ("LAYOUT_DIFFUSEKRONA", "LAYOUT_LORA", "LAYOUT_STANDARD", "Adapter"),
    "adapter": ("DiffuseKronALayer", "KronLayer", "LoraLayer"),
    "description": ("describe",),
    "detect": ("detect_format",),
    "read": ("load_adapter", "read_adapter"),
    "lora": ("from_lora", "save_lora", "to_lora"),
    "lycoris": ("from_lycoris", "save_lycoris", "to_lycoris"),
    "native": ("attach", "collect_adapter", "module_name", "read_safetensors", "save_adapter"),
    "native_outline": ("canonical_name",),
    "safetensors_file": ("file_sha256",),
    "official": ("from_official",),
}
__getattr__, __all__ = lazy_exports(__name__, _WHERE)
