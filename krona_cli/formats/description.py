"""What `krona inspect` shows of an adapter file, read from its header alone (no torch): the tensors' names, dtypes
and shapes and the metadata, plus the few bytes of an alpha where a LoRA or a decomposed LoKr factor needs one. The
format's outline reader (`*_outline.py`) is the same one `load_adapter` reads the file with, so both see the same
adapter and refuse the same files."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path

from .detect import detect_format
from .lora_outline import lora_outline
from .lycoris_outline import lycoris_outline
from .native_outline import native_outline
from .official_outline import official_outline
from .outline import Adapter
from .safetensors_file import Header, file_sha256, first_value, read_header


def outline_file(path: str | Path, header: Header, unet_config: Mapping | None = None) -> tuple[Adapter, str]:
    """The outline of the adapter in a file whose header has been read, and the file's format."""
    source = str(path)
    fmt = detect_format(header.tensors, header.metadata, source)
    if fmt == "native":
        return native_outline(header.tensors, header.metadata, source), fmt
    if fmt == "diffusekrona":
        return official_outline(header.tensors, source), fmt
    reader = lycoris_outline if fmt == "lycoris" else lora_outline
    value = functools.partial(first_value, path, header)
    return reader(header.tensors, header.metadata, source, unet_config, value), fmt


def describe(path: str | Path, unet_config: Mapping | None = None) -> dict:
    """What `krona inspect` shows: format, key naming (`key_format`: krona, kohya, kohya-sgm, diffusers, ...),
    settings, layers and factors per component, parameters, dtype, size, hash. `unet_config` as for `read_adapter`."""
    header = read_header(path)
    adapter, fmt = outline_file(path, header, unet_config)
    factor_counts = {}  # per component: how many layers have each factors (`OxI`) or LoRA rank (`rank r`)
    for component, layers in adapter.layers.items():
        counts: dict[str, int] = {}
        for layer in layers.values():
            counts[layer.label] = counts.get(layer.label, 0) + 1
        factor_counts[component] = counts
    return {
        "file": str(path),
        "format": fmt,
        "key_format": adapter.key_format,
        "base_model": adapter.base_model,
        "architecture": adapter.architecture,
        "scale": adapter.scale,
        "format_version": adapter.format_version,
        "layout": adapter.layout,
        "targets": adapter.targets,
        "training": adapter.training,
        "layers": adapter.num_layers(),
        "factors": factor_counts,
        "parameters": adapter.num_params(),
        "dtype": sorted({info.dtype for info in header.tensors.values()}),
        "size_bytes": Path(path).stat().st_size,
        "sha256": file_sha256(path),
    }
