"""Which format an adapter file is in (from its keys and metadata), reading any of them, and describing one."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from ..errors import KronaError
from .lycoris import from_lycoris, is_lycoris
from .native import METADATA_KEY, Adapter, adapter_from_tensors, file_sha256, read_safetensors
from .official import from_official, is_official

# format name -> reader(tensors, metadata, source) -> Adapter
READERS = {"native": adapter_from_tensors, "lycoris": from_lycoris, "diffusekrona": from_official}


def detect_format(keys: Iterable[str], metadata: dict[str, str], source: str) -> str:
    """`native`, `lycoris` or `diffusekrona`. LoKr files written by krona carry krona's metadata too, so the keys
    decide first."""
    keys = list(keys)
    if is_lycoris(keys):
        return "lycoris"
    if is_official(keys):
        return "diffusekrona"
    if METADATA_KEY in metadata:
        return "native"
    raise KronaError(
        f"'{source}' is a .safetensors file but not an adapter krona reads: expected a krona adapter, a LyCORIS/kohya "
        "LoKr file or an official DiffuseKronA checkpoint"
    )


def read_adapter(path: str | Path) -> tuple[Adapter, str, dict[str, torch.Tensor]]:
    """The adapter in a file of any supported format, the format's name, and the file's raw tensors."""
    tensors, metadata = read_safetensors(path)
    fmt = detect_format(tensors, metadata, str(path))
    return READERS[fmt](tensors, metadata, str(path)), fmt, tensors


def load_adapter(path: str | Path) -> Adapter:
    """Read an adapter file in any supported format (native, LyCORIS/kohya LoKr, official DiffuseKronA)."""
    return read_adapter(path)[0]


def describe(path: str | Path) -> dict:
    """What `krona inspect` shows: format, settings, layers and factors per component, parameters, dtype, size, hash."""
    adapter, fmt, tensors = read_adapter(path)
    factor_counts = {}
    for component, layers in adapter.factors.items():
        counts: dict[str, int] = {}
        for text in layers.values():
            counts[text] = counts.get(text, 0) + 1
        factor_counts[component] = counts
    return {
        "file": str(path),
        "format": fmt,
        "format_version": adapter.format_version,
        "base_model": adapter.base_model,
        "architecture": adapter.architecture,
        "layout": adapter.layout,
        "scale": adapter.scale,
        "targets": adapter.targets,
        "layers": adapter.num_layers(),
        "factors": factor_counts,
        "parameters": adapter.num_params(),
        "dtype": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
        "size_bytes": Path(path).stat().st_size,
        "sha256": file_sha256(path),
        "training": adapter.training,
    }
