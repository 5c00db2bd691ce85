"""Which format an adapter file is in, from its keys and metadata alone (no torch)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ..errors import KronaError
from .lora_outline import is_lora
from .lycoris_outline import is_lycoris
from .native_outline import METADATA_KEY
from .official_outline import is_official


def detect_format(keys: Iterable[str], metadata: Mapping[str, str], source: str) -> str:
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
