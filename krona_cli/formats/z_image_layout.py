"""Z-Image's transformer in its original layout (Lumina 2's names), the one its single files hold and ComfyUI loads as
a diffusion model: diffusers' ZImageTransformer2DModel names mapped back as diffusers'
`convert_z_image_transformer_checkpoint_to_diffusers` reads them. Each attention's q, k and v are one fused `qkv`; its
output is `out`, its norms `q_norm` / `k_norm`; the patch embedder and final layer of patch size 2 lose their
`all_…2-1` names. Everything else keeps its name."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .bfl_layout import concatenate_rows, fused_weights

_RENAMES = (
    ("all_final_layer.2-1.", "final_layer."),
    ("all_x_embedder.2-1.", "x_embedder."),
    (".attention.to_out.0.", ".attention.out."),
    (".attention.norm_q.", ".attention.q_norm."),
    (".attention.norm_k.", ".attention.k_norm."),
)
_FUSED = (".attention.to_q.weight", ".attention.to_k.weight", ".attention.to_v.weight")


def diffusers_to_z_image(
    state: Mapping[str, Any], prefix: str = "", concatenate: Callable[[Sequence[Any]], Any] | None = None
) -> dict[str, Any]:
    """A diffusers ZImageTransformer2DModel state dict in the original names after `prefix`, q/k/v fused by rows
    (`concatenate`: numpy's or torch's by default)."""
    concatenate = concatenate or concatenate_rows
    out: dict[str, Any] = {}
    pending: dict[str, list[Any]] = {}
    for key, value in state.items():
        part = next((i for i, end in enumerate(_FUSED) if key.endswith(end)), None)
        if part is not None:
            fused = prefix + key[: -len(_FUSED[part])] + ".attention.qkv.weight"
            pending.setdefault(fused, [None] * 3)[part] = value
            continue
        name = key
        for old, new in _RENAMES:
            name = name.replace(old, new)
        out[prefix + name] = value
    return out | fused_weights(pending, concatenate)
