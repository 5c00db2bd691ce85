"""Adapter files. The native format: one .safetensors with `<component>.<module path>.kron_a` / `.kron_b` tensors
and the settings as JSON under the metadata key `krona` (the only key krona reads back; the header also carries the
modelspec and kohya `ss_` keys other tools show, see ui_metadata.py). Its keys and settings are read in
native_outline.py; here: writing it and filling its outline with the tensors, without torch (in_models.py collects an
adapter from models and attaches one).

Only .safetensors files are ever read; pickles (PyTorch .bin/.pt/.ckpt) are refused before anything is loaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .. import __version__
from ..atomic import write_bytes_atomic
from ..errors import KronaError
from .adapter import KRON_LAYOUTS, Make, torch_tensor
from .native_outline import FORMAT, METADATA_KEY, native_outline
from .outline import Adapter, tensor_infos
from .safetensors_file import float32, safetensors_bytes
from .ui_metadata import describe_adapter, ui_metadata


def krona_metadata(adapter: Adapter) -> dict:
    """krona's settings of a Kronecker adapter, the JSON stored under the metadata key `krona` (here, and beside the
    LoKr and LoRA files' own keys): format version, base model, architecture, layout, scale, targets, per-layer
    factors (`OxI`) and the training settings."""
    return {
        "format": FORMAT,
        "format_version": adapter.format_version,
        "krona_version": __version__,
        "base_model": adapter.base_model,
        "architecture": adapter.architecture,
        "layout": adapter.layout,
        "scale": adapter.scale,
        "targets": adapter.targets,
        "factors": {c: {m: layer.factors for m, layer in mods.items()} for c, mods in adapter.layers.items()},
        "training": adapter.training,
    }


def save_adapter(path: str | Path, adapter: Adapter, dtype: str = "fp32", title: str | None = None) -> Path:
    """Write `adapter` as one native .safetensors file in `dtype` (fp32, fp16 or bf16), atomically. Beside krona's
    settings the header carries the modelspec and kohya `ss_` keys other tools show (ui_metadata.py); `title` defaults
    to the file's name."""
    if not adapter.kronecker:
        raise KronaError(
            f"a '{adapter.layout}' adapter holds no Kronecker factors; krona's own format stores Kronecker ones only"
        )
    flat = {}
    for component, mods in adapter.layers.items():
        for module, layer in mods.items():
            flat[f"{component}.{module}.kron_a"] = layer.a
            flat[f"{component}.{module}.kron_b"] = layer.b
    metadata = {
        METADATA_KEY: json.dumps(krona_metadata(adapter), sort_keys=True),
        **ui_metadata(
            "native",
            title or Path(path).stem,
            adapter.architecture,
            adapter.base_model,
            adapter.training,
            describe_adapter(adapter.base_model, adapter.training, "saved in krona's own format"),
        ),
    }
    return write_bytes_atomic(path, safetensors_bytes(flat, dtype, metadata))


def tensor_value(tensors: Mapping[str, Any]) -> Callable[[str], float]:
    """What the outline readers take the first number of a tensor (an alpha) with, for tensors in memory."""
    return lambda key: float(float32(tensors[key]).reshape(-1)[0])


def fill_native(outline: Adapter, tensors: Mapping[str, Any], make: Make = torch_tensor) -> Adapter:
    """A native file's outline (native_outline.py) filled with its tensors: A and B in float32, handed to `make`."""
    return outline.with_layers(
        lambda layer: KRON_LAYOUTS[layer.layout](
            make(float32(tensors[layer.keys["a"]])), make(float32(tensors[layer.keys["b"]]))
        )
    )


def from_native(tensors: Mapping[str, Any], metadata: dict[str, str], source: str) -> Adapter:
    """The adapter held by a native file's tensors (numpy or torch) and metadata, in torch tensors; KronaError where
    they do not fit together."""
    return fill_native(native_outline(tensor_infos(tensors), metadata, source), tensors)
