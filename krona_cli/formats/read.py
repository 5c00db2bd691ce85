"""Reading an adapter file of any format krona reads, its tensors included: the header's outline (description.py's
`outline_file`, the one `krona inspect` shows) filled with the file's tensors by the format's reader."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .adapter import Make, torch_tensor
from .description import outline_file
from .lora import fill_lora
from .lycoris import fill_lycoris
from .native import fill_native
from .official import fill_official
from .outline import Adapter
from .safetensors_file import read_header, read_tensors

# format name -> fill(outline, tensors, make) -> Adapter
FILLS = {"native": fill_native, "lycoris": fill_lycoris, "lora": fill_lora, "diffusekrona": fill_official}


def read_adapter(
    path: str | Path, unet_config: Mapping | None = None, make: Make = torch_tensor
) -> tuple[Adapter, str]:
    """The adapter in a file of any supported format, its tensors in float32 handed to `make` (torch tensors by
    default; `numpy_array` keeps them numpy, without importing torch), and the format's name.

    `unet_config` is the config of the base model's UNet, with which kohya's SGM-named UNet layers are numbered
    (default: the real SDXL UNet's, or SD 1.x's for a file that says it is for SD 1.x; see kohya_names.py)."""
    header = read_header(path)
    outline, fmt = outline_file(path, header, unet_config)
    return FILLS[fmt](outline, read_tensors(path, header), make), fmt


def load_adapter(path: str | Path, unet_config: Mapping | None = None, make: Make = torch_tensor) -> Adapter:
    """Read an adapter file in any supported format (native, LyCORIS/kohya LoKr, LoRA, official DiffuseKronA);
    `unet_config` and `make` as for `read_adapter`."""
    return read_adapter(path, unet_config, make)[0]
