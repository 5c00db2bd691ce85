"""SD3's transformer in Stability's MMDiT layout, the one its single files hold (`sd3.5_medium.safetensors`, under
`model.diffusion_model.`) and ComfyUI loads: diffusers' SD3Transformer2DModel names mapped back as diffusers'
`convert_sd3_transformer_checkpoint_to_diffusers` reads them. Each joint block's image and text q/k/v (and SD3.5
Medium's second image attention's) are one fused `qkv`; the last block's text modulation and the final one have their
(shift, scale) halves swapped against diffusers' (scale, shift)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..errors import KronaError
from .bfl_layout import concatenate_rows, fused_weights, swap_halves

# diffusers module (inside transformer_blocks.N) -> (MMDiT module inside joint_blocks.N, position in its fused qkv)
_FUSED = {
    "attn.to_q": ("x_block.attn.qkv", 0),
    "attn.to_k": ("x_block.attn.qkv", 1),
    "attn.to_v": ("x_block.attn.qkv", 2),
    "attn.add_q_proj": ("context_block.attn.qkv", 0),
    "attn.add_k_proj": ("context_block.attn.qkv", 1),
    "attn.add_v_proj": ("context_block.attn.qkv", 2),
    "attn2.to_q": ("x_block.attn2.qkv", 0),
    "attn2.to_k": ("x_block.attn2.qkv", 1),
    "attn2.to_v": ("x_block.attn2.qkv", 2),
}
_BLOCK = {
    "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj",
    "attn2.to_out.0": "x_block.attn2.proj",
    "attn.norm_q": "x_block.attn.ln_q",
    "attn.norm_k": "x_block.attn.ln_k",
    "attn.norm_added_q": "context_block.attn.ln_q",
    "attn.norm_added_k": "context_block.attn.ln_k",
    "attn2.norm_q": "x_block.attn2.ln_q",
    "attn2.norm_k": "x_block.attn2.ln_k",
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
}
_TOP = {
    "pos_embed.pos_embed": "pos_embed",
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
_BLOCK_KEY = re.compile(r"^transformer_blocks\.(\d+)\.(.+)\.(weight|bias)$")


def _last_block(state: Mapping[str, Any]) -> int:
    """The index of the block that drops the text stream: the one without a text output projection."""
    blocks = {int(m[1]) for key in state if (m := _BLOCK_KEY.match(key))}
    return next(i for i in sorted(blocks) if f"transformer_blocks.{i}.attn.to_add_out.weight" not in state)


def diffusers_to_sd3(
    state: Mapping[str, Any], prefix: str = "", concatenate: Callable[[Sequence[Any]], Any] | None = None
) -> dict[str, Any]:
    """A diffusers SD3Transformer2DModel state dict in Stability's MMDiT names after `prefix`, q/k/v fused and the
    halves of the last block's text modulation and of the final modulation swapped. `concatenate` stacks arrays by rows
    (default: numpy's or torch's)."""
    concatenate = concatenate or concatenate_rows
    last = _last_block(state)
    out: dict[str, Any] = {}
    pending: dict[str, list[Any]] = {}
    for key, value in state.items():
        block = _BLOCK_KEY.match(key)
        if block is None:
            module, param = key.rsplit(".", 1) if key != "pos_embed.pos_embed" else (key, "")
            if module not in _TOP:
                raise KronaError(f"{key!r} is not a weight of an SD3 transformer (diffusers' SD3Transformer2DModel)")
            name = _TOP[module] + (f".{param}" if param else "")
            out[prefix + name] = swap_halves(value, concatenate) if module == "norm_out.linear" else value
            continue
        index, module, param = int(block[1]), block[2], block[3]
        where = f"joint_blocks.{index}."
        if module in _FUSED:
            fused, position = _FUSED[module]
            pending.setdefault(f"{prefix}{where}{fused}.{param}", [None] * 3)[position] = value
        elif module in _BLOCK:
            swap = module == "norm1_context.linear" and index == last
            out[f"{prefix}{where}{_BLOCK[module]}.{param}"] = swap_halves(value, concatenate) if swap else value
        else:
            raise KronaError(f"{key!r} is not a weight of an SD3 transformer (diffusers' SD3Transformer2DModel)")
    return out | fused_weights(pending, concatenate)
