"""FLUX.2's transformer in Black Forest Labs' layout, the one its single files hold (`flux-2-klein-4b.safetensors`)
and ComfyUI loads as a diffusion model: diffusers' Flux2Transformer2DModel names mapped back as diffusers'
`convert_flux2_transformer_checkpoint_to_diffusers` reads them. A double block's image and text q/k/v are one fused
`qkv` each, the q/k norms are `query_norm` / `key_norm` with a `scale`, and the final modulation's (shift, scale)
halves are swapped against diffusers' (scale, shift). Single blocks and the shared modulations are renamed only."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..errors import KronaError
from .bfl_layout import concatenate_rows, fused_weights, swap_halves

_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",  # halves swapped
}
_DOUBLE = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
}
_FUSED = {
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
}
_SINGLE = {
    "attn.to_qkv_mlp_proj": "linear1",
    "attn.to_out": "linear2",
    "attn.norm_q": "norm.query_norm",
    "attn.norm_k": "norm.key_norm",
}
_KEY = re.compile(r"^(?:(transformer_blocks|single_transformer_blocks)\.(\d+)\.)?(.+)\.(weight|bias)$")


def diffusers_to_flux2(
    state: Mapping[str, Any], prefix: str = "", concatenate: Callable[[Sequence[Any]], Any] | None = None
) -> dict[str, Any]:
    """A diffusers Flux2Transformer2DModel state dict in BFL's names after `prefix` (`concatenate`: numpy's or
    torch's by default)."""
    concatenate = concatenate or concatenate_rows
    out: dict[str, Any] = {}
    pending: dict[str, list[Any]] = {}
    for key, value in state.items():
        found = _KEY.match(key)
        scope, index, module, param = found.groups() if found else (None, None, None, None)
        table = {"transformer_blocks": _DOUBLE, "single_transformer_blocks": _SINGLE, None: _TOP}[scope]
        where = f"{prefix}double_blocks.{index}." if scope == "transformer_blocks" else prefix
        where = f"{prefix}single_blocks.{index}." if scope == "single_transformer_blocks" else where
        if found and scope == "transformer_blocks" and module in _FUSED:
            fused, position = _FUSED[module]
            pending.setdefault(f"{where}{fused}.{param}", [None] * 3)[position] = value
        elif found and module in table:
            name = table[module]
            param = "scale" if name.endswith("_norm") else param
            out[f"{where}{name}.{param}"] = swap_halves(value, concatenate) if module == "norm_out.linear" else value
        else:
            raise KronaError(f"{key!r} is not a weight of a FLUX.2 transformer (diffusers' Flux2Transformer2DModel)")
    return out | fused_weights(pending, concatenate)
