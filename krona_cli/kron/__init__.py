"""The Kronecker adapter, in pure torch: factors, the KronLinear layer, injection into any nn.Module, and every
Kronecker delta (`functional.py`)."""

from .factors import DEFAULT_FACTORS, Factors, fit_factors, parse_factors
from .functional import diffusekrona_delta, diffusekrona_rows, kron_delta, kron_svd, kron_svd_error
from .inject import (
    TARGET_PRESETS,
    adapted_layers,
    adapter_state_dict,
    find_targets,
    inject,
    layer_factors,
    load_adapter_state_dict,
    load_factors,
    remove,
    set_scale,
)
from .layer import KronLinear, choose_path, contraction_cost

__all__ = [
    "DEFAULT_FACTORS",
    "Factors",
    "KronLinear",
    "TARGET_PRESETS",
    "adapted_layers",
    "adapter_state_dict",
    "choose_path",
    "contraction_cost",
    "diffusekrona_delta",
    "diffusekrona_rows",
    "find_targets",
    "fit_factors",
    "inject",
    "kron_delta",
    "kron_svd",
    "kron_svd_error",
    "layer_factors",
    "load_adapter_state_dict",
    "load_factors",
    "parse_factors",
    "remove",
    "set_scale",
]
