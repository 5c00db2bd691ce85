"""The dtype names krona's options and files use (fp32, fp16, bf16)."""

from __future__ import annotations

import torch

from .errors import KronaError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def compute_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype a model computes in under `--mixed-precision` (no, fp16 or bf16)."""
    return torch.float32 if mixed_precision == "no" else DTYPES[mixed_precision]


def dtype_from_name(name: str) -> torch.dtype:
    """The torch dtype for `fp32`, `fp16` or `bf16`; a KronaError naming the choices otherwise."""
    if name not in DTYPES:
        raise KronaError(f"unknown dtype '{name}'; use one of {', '.join(DTYPES)}")
    return DTYPES[name]
