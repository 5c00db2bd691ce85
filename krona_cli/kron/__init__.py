"""The Kronecker adapter, in pure torch: factors, the KronLinear layer, injection into any nn.Module."""

from .factors import DEFAULT_FACTORS, Factors, fit_factors, parse_factors
from .inject import (
    TARGET_PRESETS,
    adapted_layers,
    adapter_state_dict,
    find_targets,
    inject,
    layer_factors,
    load_adapter_state_dict,
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
    "find_targets",
    "fit_factors",
    "inject",
    "layer_factors",
    "load_adapter_state_dict",
    "parse_factors",
    "remove",
    "set_scale",
]
