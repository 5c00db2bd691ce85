"""Adapter files in and out. `native.py`: krona's own format (one .safetensors, settings in its metadata)."""

from .native import (
    Adapter,
    attach,
    canonical_name,
    collect_adapter,
    describe,
    file_sha256,
    load_adapter,
    module_name,
    read_safetensors,
    save_adapter,
)

__all__ = [
    "Adapter",
    "attach",
    "canonical_name",
    "collect_adapter",
    "describe",
    "file_sha256",
    "load_adapter",
    "module_name",
    "read_safetensors",
    "save_adapter",
]
