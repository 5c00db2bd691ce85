"""Adapter files in and out. `outline.py` holds the one in-memory `Adapter` (per-layer records by component and
module, and its settings) and what layers' shapes tell, without torch; `adapter.py` the layers with their tensors, each
with its own update. Each format is read in two steps: `<format>_outline.py` reads a file's keys, shapes and metadata
into an Adapter of outlines, without torch, and `<format>.py` fills it with the tensors and writes the format:
`native` (krona's own: one .safetensors, settings in its metadata), `lycoris` (LyCORIS / kohya LoKr, read and
written), `lora` (diffusers and kohya LoRA read; `lora_export.py` writes a Kronecker adapter as a LoRA by truncated
SVD, in kohya's key layout by default), `official` (official DiffuseKronA checkpoints, read). `detect.py` tells them
apart, `read.py` reads any of them, `description.py` describes one from its header alone (`krona inspect`), and
`in_models.py` collects an adapter from models and attaches one to them. `safetensors_file.py` reads and writes the
files with numpy: readers fill layers with float32 numpy arrays and hand them to torch unless asked not to, and
krona's own and the LoKr format are written without torch (`krona export`). Shared by the formats: `kohya_names.py`
(kohya's lora names, diffusers- or SGM-named, with `unet_paths.py`), `flux_names.py` (FLUX.1's: SimpleTuner's
`lycoris_`, OneTrainer's `lora_transformer_`, kohya's fused BFL names, with `bfl_layout.py`), `naming.py` (which names
and LoKr alpha the files krona writes use, by the adapter's family) and `ui_metadata.py` (the modelspec and kohya
`ss_` keys other tools show). Only the format modules spell file keys.

Names are imported on first use, so the torch-free parts load without torch (`krona inspect` needs no model library).
No exported name is also a submodule's name: importing a submodule sets the package attribute of its name."""

from __future__ import annotations

from ..lazy import lazy_exports

_WHERE = {
    "outline": ("LAYOUT_DIFFUSEKRONA", "LAYOUT_LORA", "LAYOUT_STANDARD", "Adapter"),
    "adapter": ("DiffuseKronALayer", "KronLayer", "LoraLayer", "numpy_array", "torch_tensor"),
    "description": ("describe",),
    "detect": ("detect_format",),
    "read": ("load_adapter", "read_adapter"),
    "lora": ("fill_lora", "from_lora"),
    "lora_export": ("save_lora", "to_lora"),
    "lycoris": ("fill_lycoris", "from_lycoris", "save_lycoris", "to_lycoris"),
    "native": ("fill_native", "from_native", "save_adapter"),
    "in_models": ("attach", "collect_adapter", "module_name"),
    "native_outline": ("canonical_name",),
    "safetensors_file": ("file_sha256",),
    "official": ("fill_official", "from_official"),
}
__getattr__, __all__ = lazy_exports(__name__, _WHERE)
