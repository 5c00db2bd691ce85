"""The LyCORIS / kohya LoKr file format, read and written, so that ComfyUI, A1111 and LyCORIS itself load krona's
adapters and krona reads LoKr files made by other trainers.

A LoKr file is one .safetensors with, per adapted module, `<lora name>.lokr_w1`, `.lokr_w2` and a 0-d `.alpha`,
where ΔW = kron(w1, w2) (torch.kron semantics, the same as krona's A ⊗ B). The lora name is a prefix plus the
module path with `.` replaced by `_`: `lora_unet_` for the UNet (diffusers module paths), `lora_te1_` / `lora_te2_`
for SDXL's text_encoder / text_encoder_2 and `lora_te_` for SD 1.x/2.x's text_encoder (transformers 4 paths,
`text_model.encoder.layers.0.self_attn.q_proj`): see kohya_names.py. FLUX.1's transformer layers are named
`lycoris_<diffusers module, . -> _>` (SimpleTuner's LyCORIS naming, which ComfyUI maps), its CLIP-L `lora_te1_`; files
from other tools may name them `lora_transformer_` (OneTrainer) or kohya's way, after Black Forest Labs' fused modules
(`lora_unet_double_blocks_0_img_attn_qkv`), which are read as the diffusers modules they stack: flux_names.py.

Either factor may instead be stored decomposed (`lokr_w1_a` @ `lokr_w1_b`, `lokr_w2_a` @ `lokr_w2_b`). ComfyUI and
A1111 then scale ΔW by alpha / r (r the inner rank of the decomposed factor) and by 1.0 when neither is decomposed,
whatever alpha says (some ComfyUI versions divide it by w2's rows // w1's then: naming.py chooses an alpha for which
that is 1 too, where it matters). krona always writes both factors full, so its scale s is baked into w1 (w1 = s·A,
w2 = B).

Lora names, including the SGM-named UNet layers of kohya's SDXL files, are read by kohya_names.py, and a file's keys,
shapes and settings by lycoris_outline.py (no torch); here the outline is filled with the tensors. Written files carry
the modelspec and kohya `ss_` keys UIs show (ui_metadata.py) beside krona's own settings.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import write_bytes_atomic
from ..errors import KronaError
from .adapter import KronLayer, Make, row_ranges, torch_tensor
from .kohya_names import LOKR_ALPHA
from .lycoris_outline import is_lycoris, lycoris_outline
from .naming import naming_for
from .native import krona_metadata, tensor_value
from .native_outline import METADATA_KEY
from .outline import LAYOUT_STANDARD, Adapter, KronOutline, tensor_infos
from .safetensors_file import float32, safetensors_bytes
from .ui_metadata import describe_adapter, ui_metadata

__all__ = ["fill_lycoris", "from_lycoris", "is_lycoris", "save_lycoris", "to_lycoris"]

# What kohya's sd-scripts writes for a LyCORIS network (`--network_module lycoris.kohya --network_args algo=lokr
# full_matrix=True`): network_args as JSON of the strings given on its command line.
NETWORK_MODULE = "lycoris.kohya"
NETWORK_ARGS = {"algo": "lokr", "full_matrix": "True"}

# The alpha of every layer of an SD file (kohya_names.LOKR_ALPHA: scale 1 under every convention in use); a FLUX.1
# file's layers get the alpha flux_names.FluxNaming.lokr_alpha gives, or none.
ALPHA = LOKR_ALPHA
# kohya's `ss_network_dim` / `ss_network_alpha` for such a file: the lora_dim LyCORIS infers for it, and its alpha.
NETWORK_DIM = 1

# --- writing ------------------------------------------------------------------------------------------------------


def to_lycoris(adapter: Adapter, title: str | None = None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors (float32 numpy arrays) and metadata of the LoKr file that holds `adapter` (standard layout only).

    Per layer: `lokr_w1` = s·A, `lokr_w2` = B and the alpha its family's naming gives (naming.py: 1 for SD, for FLUX.1
    w2's rows // w1's where at least 1, else none), so every LoKr loader builds ΔW = s·(A ⊗ B). Lora names are the
    family's too (kohya's for SD, `lycoris_` / `lora_te1_` for FLUX.1).
    The metadata carries krona's own settings under `krona`, and the modelspec and kohya `ss_*` keys UIs show
    (ui_metadata.py; `title` is the modelspec title and kohya output name, by default "krona LoKr").
    """
    if adapter.layout != LAYOUT_STANDARD:
        raise KronaError(
            f"adapter layout '{adapter.layout}' cannot be exported as LyCORIS LoKr: only '{LAYOUT_STANDARD}' "
            "adapters (ΔW = s·A⊗B per layer) are plain Kronecker updates; retrain with the standard layout"
        )
    scale = float(adapter.scale)
    if scale == 0.0 or not math.isfinite(scale):
        raise KronaError(
            f"adapter scale {adapter.scale} cannot be exported: LoKr files hold s·A, so a zero or non-finite scale "
            "would lose A; export with a finite, non-zero --scale"
        )
    tensors: dict[str, np.ndarray] = {}
    naming = naming_for(adapter)
    for component, layers in adapter.layers.items():
        for module, layer in layers.items():
            name = naming.lokr_name(component, module)
            # s·A in float32; multiplying by 1 or a power of two is exact, so reading back gives A bit for bit.
            tensors[f"{name}.lokr_w1"] = w1 = float32(layer.a) * np.float32(scale)
            tensors[f"{name}.lokr_w2"] = w2 = float32(layer.b)
            alpha = naming.lokr_alpha(w1.shape, w2.shape)
            if alpha is not None:
                tensors[f"{name}.alpha"] = np.array(alpha, dtype=np.float32)
    network = {
        "module": NETWORK_MODULE,
        "dim": str(NETWORK_DIM),
        "alpha": f"{ALPHA:g}",
        "args": json.dumps(NETWORK_ARGS),
    }
    description = describe_adapter(adapter.base_model, adapter.training, "exported as LyCORIS LoKr (exact)")
    metadata = {
        METADATA_KEY: json.dumps(krona_metadata(adapter), sort_keys=True),
        **ui_metadata(
            "lycoris",
            title or "krona LoKr",
            adapter.architecture,
            adapter.base_model,
            adapter.training,
            description,
            network,
        ),
    }
    return tensors, metadata


def save_lycoris(path: str | Path, adapter: Adapter, dtype: str = "fp32", title: str | None = None) -> Path:
    """Write `adapter` as one LyCORIS LoKr .safetensors file, atomically; dtype is fp32, fp16 or bf16; `title`
    (modelspec title, kohya output name) defaults to the file's name."""
    tensors, metadata = to_lycoris(adapter, title or Path(path).stem)
    return write_bytes_atomic(path, safetensors_bytes(tensors, dtype, metadata))


# --- reading ------------------------------------------------------------------------------------------------------


def _factor(tensors: Mapping[str, Any], keys: dict[str, str], side: str) -> np.ndarray:
    """The full factor `side` (w1 or w2) in float32: as stored, or its two halves multiplied out (in float64, then
    rounded once)."""
    if side in keys:
        return float32(tensors[keys[side]])
    first, second = float32(tensors[keys[f"{side}_a"]]), float32(tensors[keys[f"{side}_b"]])
    return (first.astype(np.float64) @ second.astype(np.float64)).astype(np.float32)


def fill_lycoris(outline: Adapter, tensors: Mapping[str, Any], make: Make = torch_tensor) -> Adapter:
    """A LoKr file's outline (lycoris_outline.py) filled with its tensors: A = w1 and B = w2 in float32, handed to
    `make`, a decomposed factor multiplied out first, the loaders' multiplier (alpha / r of a decomposed factor) folded
    into A and the scale krona's metadata records taken out of it (A = w1 / s); a part of a fused layer (FLUX.1's
    kohya names) takes its rows' blocks of w1."""
    scale = np.float32(outline.scale)

    def layer(found: KronOutline) -> KronLayer:
        w2 = _factor(tensors, found.keys, "w2")
        w1 = row_ranges(_factor(tensors, found.keys, "w1"), found.rows, w2.shape[0])
        a = w1 if found.multiplier == 1.0 else w1 * np.float32(found.multiplier)
        if scale != 1.0:
            a = a / scale
        return KronLayer(make(a), make(w2))

    return outline.with_layers(layer)


def from_lycoris(
    tensors: Mapping[str, Any], metadata: dict[str, str], source: str, unet_config: Mapping | None = None
) -> Adapter:
    """The standard-layout Adapter held by a LyCORIS/kohya LoKr file's tensors (numpy or torch) and metadata, in torch
    tensors (`fill_lycoris`).

    With krona's own metadata (a file that `to_lycoris` wrote) the scale s is restored and A = w1 / s: native ->
    LyCORIS -> native then gives back the same tensors bit for bit when s is 1 or any power of two, and equal up to
    float rounding (one multiplication and one division by s) otherwise. Without it the scale is 1, the architecture
    comes from `ss_base_model_version` or the text-encoder prefixes, and the targets are inferred from the adapted
    modules. SGM-named UNet layers (kohya's SDXL files) are mapped to diffusers paths with `unet_config`
    (kohya_names.py). Tensors are returned in float32 whatever the file's dtype.
    """
    return fill_lycoris(
        lycoris_outline(tensor_infos(tensors), metadata, source, unet_config, tensor_value(tensors)), tensors
    )
