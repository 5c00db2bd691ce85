"""Reading an adapter file of any format krona reads, its tensors included."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from .detect import detect_format
from .lora import from_lora
from .lycoris import from_lycoris
from .native import adapter_from_tensors, read_safetensors
from .official import from_official
from .outline import Adapter

# format name -> reader(tensors, metadata, source) -> Adapter
READERS = {
    "native": adapter_from_tensors,
    "lycoris": from_lycoris,
    "lora": from_lora,
    "diffusekrona": from_official,
}
# the readers of kohya-named files, which take the UNet config SGM names are numbered for
SGM_READERS = ("lycoris", "lora")


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
