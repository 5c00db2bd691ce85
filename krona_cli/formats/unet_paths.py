"""The UNet's module and parameter paths in diffusers' naming and in the original (LDM / SGM) layout that A1111, Forge,
ComfyUI, kohya's trainers and Stability's own code use, both ways, for a UNet of any block structure (no torch).

The UNet's block structure decides the numbering, so every mapping takes the UNet's config (a dict or diffusers'
FrozenDict): down block i, layer j sits in `input_blocks.N.0` (its resnet) and `input_blocks.N.1` (its attention) with
N counted over every layer and downsampler before it; `input_blocks.0.0` is `conv_in`; the middle block is
`middle_block.0/1/2` (resnet, attention, resnet); up block i, layer j in `output_blocks.N.0/.1`, its upsampler in the
same `output_blocks.N` as its last layer, after the attention where there is one. Inside a resnet, diffusers' `norm1`,
`conv1`, `time_emb_proj`, `norm2`, `conv2`, `conv_shortcut` are `in_layers.0`, `in_layers.2`, `emb_layers.1`,
`out_layers.0`, `out_layers.3`, `skip_connection`; attention blocks keep their inner names (`proj_in`,
`transformer_blocks.0.attn1.to_q`, ...). Paths carry no `model.diffusion_model.` prefix:
`unet_path_to_sgm("down_blocks.1.attentions.0.proj_in", cfg)` is `"input_blocks.4.1.proj_in"` on SDXL.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache

from ..errors import KronaError

# diffusers resnet child -> original ResBlock child
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_RESNET_BACK = {v: k for k, v in _RESNET.items()}
# blocks outside the down/mid/up structure
_FIXED = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _layers(config: Mapping) -> list[int]:
    blocks = len(config["down_block_types"])
    per_block = config["layers_per_block"]
    return [int(per_block)] * blocks if isinstance(per_block, int) else [int(n) for n in per_block]


def _key(config: Mapping) -> tuple:
    return (
        tuple(config["down_block_types"]),
        tuple(config["up_block_types"]),
        tuple(_layers(config)),
        config.get("mid_block_type", "UNetMidBlock2DCrossAttn"),
    )


@lru_cache(maxsize=16)
def _blocks(key: tuple) -> tuple[tuple[str, str, bool], ...]:
    """(diffusers prefix, original prefix, is a resnet) for every block of a UNet structure."""
    down_types, up_types, layers, mid_type = key
    out: list[tuple[str, str, bool]] = [(d, o, False) for d, o in _FIXED.items()]
    n = 1
    for i, kind in enumerate(down_types):
        for j in range(layers[i]):
            out.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0", True))
            if "CrossAttn" in kind:
                out.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{n}.1", False))
            n += 1
        if i < len(down_types) - 1:
            out.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{n}.0.op", False))
            n += 1
    out.append(("mid_block.resnets.0", "middle_block.0", True))
    if "CrossAttn" in (mid_type or ""):
        out += [("mid_block.attentions.0", "middle_block.1", False), ("mid_block.resnets.1", "middle_block.2", True)]
    else:
        out.append(("mid_block.resnets.1", "middle_block.1", True))
    n = 0
    for i, (kind, per_block) in enumerate(zip(up_types, reversed(layers))):
        attention = "CrossAttn" in kind
        for j in range(per_block + 1):
            out.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n}.0", True))
            if attention:
                out.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{n}.1", False))
            if j == per_block and i < len(up_types) - 1:
                upsampler = f"output_blocks.{n}.{2 if attention else 1}.conv"
                out.append((f"up_blocks.{i}.upsamplers.0.conv", upsampler, False))
            n += 1
    return tuple(out)


def rename_child(path: str, names: Mapping[str, str]) -> str | None:
    """`path` with its first module(s) renamed by `names` (`{"conv_shortcut": "nin_shortcut"}`), None if none match."""
    for child, renamed in names.items():
        if path == child or path.startswith(child + "."):
            return renamed + path[len(child) :]
    return None


def _translate(path: str, table, source: int, resnet_names: dict[str, str], what: str) -> str:
    for entry in table:
        prefix = entry[source]
        if path == prefix or path.startswith(prefix + "."):
            rest = path[len(prefix) + 1 :]
            if entry[2] and rest:
                rest = rename_child(rest, resnet_names)
                if rest is None:
                    raise KronaError(f"'{path}' is not a {what} UNet path krona knows")
            return entry[1 - source] + ("." + rest if rest else "")
    raise KronaError(f"'{path}' is not a {what} UNet path of this architecture")


def unet_path_to_sgm(path: str, config: Mapping) -> str:
    """diffusers' UNet module or parameter path -> the original (SGM/LDM) one, for a UNet with this config."""
    return _translate(path, _blocks(_key(config)), 0, _RESNET, "diffusers")


def unet_path_from_sgm(path: str, config: Mapping) -> str:
    """The original (SGM/LDM) UNet module or parameter path -> diffusers' one, for a UNet with this config."""
    return _translate(path, _blocks(_key(config)), 1, _RESNET_BACK, "original (SGM)")
