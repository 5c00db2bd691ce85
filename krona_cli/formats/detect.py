"""Which format an adapter file is in (from its keys and metadata), reading any of them, and describing one."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from ..errors import KronaError
from .adapter import Adapter
from .lora import from_lora, is_lora
from .lycoris import from_lycoris, is_lycoris
from .native import METADATA_KEY, adapter_from_tensors, file_sha256, read_safetensors
from .official import from_official, is_official

# format name -> reader(tensors, metadata, source) -> Adapter
READERS = {
    "native": adapter_from_tensors,
    "lycoris": from_lycoris,
    "lora": from_lora,
    "diffusekrona": from_official,
}
# the readers of kohya-named files, which take the UNet config SGM names are numbered for
SGM_READERS = ("lycoris", "lora")


def detect_format(keys: Iterable[str], metadata: dict[str, str], source: str) -> str:
    """`native`, `lycoris`, `lora` or `diffusekrona`. LoKr and LoRA files written by krona carry krona's metadata
    too, so the keys decide first."""
    keys = list(keys)
    if is_lycoris(keys):
        return "lycoris"
    if is_lora(keys):
        return "lora"
    if is_official(keys):
        return "diffusekrona"
    if METADATA_KEY in metadata:
        return "native"
    raise KronaError(
        f"'{source}' is a .safetensors file but not an adapter krona reads: expected a krona adapter, a LyCORIS/kohya "
        "LoKr file, a diffusers/kohya LoRA or an official DiffuseKronA checkpoint"
    )


def read_adapter(path: str | Path, unet_config: Mapping | None = None) -> tuple[Adapter, str, dict[str, torch.Tensor]]:
    """The adapter in a file of any supported format, the format's name, and the file's raw tensors.

    `unet_config` is the config of the base model's UNet, with which kohya's SGM-named UNet layers are numbered
    (default: the real SDXL UNet's, or SD 1.x's for a file that says it is for SD 1.x; see kohya_names.py)."""
    tensors, metadata = read_safetensors(path)
    fmt = detect_format(tensors, metadata, str(path))
    if fmt in SGM_READERS:
        return READERS[fmt](tensors, metadata, str(path), unet_config), fmt, tensors
    return READERS[fmt](tensors, metadata, str(path)), fmt, tensors


def load_adapter(path: str | Path, unet_config: Mapping | None = None) -> Adapter:
    """Read an adapter file in any supported format (native, LyCORIS/kohya LoKr, LoRA, official DiffuseKronA);
    `unet_config` as for `read_adapter`."""
    return read_adapter(path, unet_config)[0]


def describe(path: str | Path, unet_config: Mapping | None = None) -> dict:
    """What `krona inspect` shows: format, key naming (`key_format`: krona, kohya, kohya-sgm, diffusers, ...),
    settings, layers and factors per component, parameters, dtype, size, hash. `unet_config` as for `read_adapter`."""
    adapter, fmt, tensors = read_adapter(path, unet_config)
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
        "dtype": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
        "size_bytes": Path(path).stat().st_size,
        "sha256": file_sha256(path),
    }
