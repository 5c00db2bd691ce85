"""The Kronecker adapter, in pure torch: factors, the KronLinear layer, injection into any nn.Module, and every
Kronecker delta (`functional.py`); the Kronecker SVD in numpy (`low_rank.py`). Names are imported on first use, so the
torch-free parts (`factors`, `targets`, `low_rank`) load without torch (`krona plan` needs no model library)."""

from __future__ import annotations

from ..lazy import lazy_exports

_WHERE = {
    "factors": ("DEFAULT_FACTORS", "Factors", "fit_factors", "parse_factors"),
    "functional": ("diffusekrona_delta", "kron_delta"),
    "low_rank": ("diffusekrona_rows", "kron_svd", "kron_svd_error"),
    "targets": ("TARGET_PRESETS", "target_pattern"),
    "injection": (
        "adapted_layers",
        "adapter_state_dict",
        "find_targets",
        "inject",
        "layer_factors",
        "load_adapter_state_dict",
        "load_factors",
        "remove",
        "set_scale",
    ),
    "layer": ("KronLinear", "choose_path", "contraction_cost"),
}
__getattr__, __all__ = lazy_exports(__name__, _WHERE)
