"""The FLUX.1 transformer in Black Forest Labs' own layout (the `flux` reference code, BFL's released
`flux1-dev.safetensors`, ComfyUI, Forge and kohya's FLUX trainers) and in diffusers' `FluxTransformer2DModel` names,
both ways.

Most weights are renamed one to one (`img_in` ↔ `x_embedder`, `double_blocks.N.img_mod.lin` ↔
`transformer_blocks.N.norm1.linear`, ...). Three things are more than a rename:

- fused projections: a double block's `img_attn.qkv` is diffusers' `attn.to_q`, `to_k`, `to_v` stacked by rows and
  its `txt_attn.qkv` the `attn.add_q_proj`, `add_k_proj`, `add_v_proj`; a single block's `linear1` is `attn.to_q`,
  `to_k`, `to_v` and `proj_mlp` stacked (hidden, hidden, hidden, mlp-hidden rows), its `linear2` is `proj_out`.
  `bfl_slices` tells where a diffusers module's rows lie in its fused BFL weight;
- the q/k RMS norms' parameter is `scale` in BFL's names, `weight` in diffusers';
- `final_layer.adaLN_modulation.1` holds (shift, scale) where diffusers' `norm_out.linear` holds (scale, shift): the
  two halves of its rows are swapped.

Values may be numpy arrays or torch tensors (torch is imported only to concatenate torch tensors): the conversion
slices and concatenates rows and never computes (split parts are views of the fused array). Any width works
(diffusers' own `convert_flux_transformer_checkpoint_to_diffusers` fixes 3072). On read, a `model.diffusion_model.`
prefix (ComfyUI's and the original layout's whole checkpoints) is accepted; `diffusers_to_bfl` writes bare BFL names
unless given a prefix.

For adapter files (flux_names.py): `is_linear` tells the transformer's linear modules in either naming,
`module_from_underscores` reads one from a lora name (`.` spelled `_`), `bfl_parts` gives the diffusers modules a BFL
linear holds with their rows (fused parts, the swapped final modulation), `fused_rows` a fused weight's height.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..errors import KronaError

BFL_PREFIX = "model.diffusion_model."
MLP_RATIO = 4  # FLUX.1's single blocks: proj_mlp is 4 × hidden wide (diffusers' FluxSingleTransformerBlock)

# Block prefixes, diffusers ↔ BFL (the number follows).
_DOUBLE = ("transformer_blocks.", "double_blocks.")
_SINGLE = ("single_transformer_blocks.", "single_blocks.")

# Per scope ("top", "double", "single"): diffusers module -> BFL module, renamed one to one (weight and bias alike).
_RENAMES = {
    "top": {
        "x_embedder": "img_in",
        "context_embedder": "txt_in",
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "proj_out": "final_layer.linear",
        "norm_out.linear": "final_layer.adaLN_modulation.1",  # its halves swapped, see _SWAPPED
    },
    "double": {
        "norm1.linear": "img_mod.lin",
        "norm1_context.linear": "txt_mod.lin",
        "attn.to_out.0": "img_attn.proj",
        "attn.to_add_out": "txt_attn.proj",
        "ff.net.0.proj": "img_mlp.0",
        "ff.net.2": "img_mlp.2",
        "ff_context.net.0.proj": "txt_mlp.0",
        "ff_context.net.2": "txt_mlp.2",
    },
    "single": {"norm.linear": "modulation.lin", "proj_out": "linear2"},
}
# Per scope: diffusers parameter -> BFL parameter (the RMS norms of q and k).
_NORMS = {
    "top": {},
    "double": {
        "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
        "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
        "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
        "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
    },
    "single": {"attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"},
}
# Per scope: BFL fused module -> the diffusers modules whose rows it stacks, in order.
_FUSED = {
    "top": {},
    "double": {
        "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
        "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    },
    "single": {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")},
}
_SWAPPED = "final_layer.adaLN_modulation.1"  # (shift, scale) in BFL, (scale, shift) in diffusers

# The inverse tables, BFL -> diffusers, and diffusers module -> (BFL fused module, its part's position).
_RENAMES_BACK = {scope: {b: d for d, b in table.items()} for scope, table in _RENAMES.items()}
_NORMS_BACK = {scope: {b: d for d, b in table.items()} for scope, table in _NORMS.items()}
_PART_OF = {
    scope: {d: (fused, i) for fused, parts in table.items() for i, d in enumerate(parts)}
    for scope, table in _FUSED.items()
}


def _split_name(name: str, bfl: bool) -> tuple[str, str, str, str]:
    """(scope, the name's block prefix, the other layout's block prefix, the rest) of a diffusers or BFL name."""
    for scope, (d_block, b_block) in (("single", _SINGLE), ("double", _DOUBLE)):
        mine, other = (b_block, d_block) if bfl else (d_block, b_block)
        if name.startswith(mine):
            number, dot, rest = name[len(mine) :].partition(".")
            if number.isdigit() and dot:
                return scope, f"{mine}{number}.", f"{other}{number}.", rest
    return "top", "", "", name


def _part_rows(scope: str, fused: str, hidden: int, mlp_hidden: int | None) -> list[int]:
    """How many rows each part of a fused BFL weight has, in order."""
    if fused == "linear1":
        return [hidden] * 3 + [MLP_RATIO * hidden if mlp_hidden is None else mlp_hidden]
    return [hidden] * len(_FUSED[scope][fused])


def bfl_module(diffusers_module: str) -> str:
    """The BFL module a diffusers FluxTransformer2DModel module lives in (`transformer_blocks.3.attn.to_k` ->
    `double_blocks.3.img_attn.qkv`, `single_transformer_blocks.7.proj_out` -> `single_blocks.7.linear2`); the q/k
    norms too (`attn.norm_q` -> `img_attn.norm.query_norm`, whose parameter is `scale`)."""
    scope, _, b_block, rest = _split_name(diffusers_module, bfl=False)
    if rest in _RENAMES[scope]:
        return b_block + _RENAMES[scope][rest]
    if rest in _PART_OF[scope]:
        return b_block + _PART_OF[scope][rest][0]
    norm = _NORMS[scope].get(f"{rest}.weight")
    if norm is not None:
        return b_block + norm.removesuffix(".scale")
    raise KronaError(
        f"{diffusers_module!r} is not a module of a FLUX.1 transformer (diffusers' FluxTransformer2DModel)"
    )


def bfl_slices(
    diffusers_module: str, hidden_size: int, mlp_hidden_size: int | None = None
) -> tuple[str, int, int] | None:
    """Where a diffusers module's output rows lie inside a fused BFL weight: (BFL module, start, stop), e.g.
    `transformer_blocks.3.attn.to_k` -> (`double_blocks.3.img_attn.qkv`, h, 2h) and
    `single_transformer_blocks.7.proj_mlp` -> (`single_blocks.7.linear1`, 3h, 3h + 4h) for hidden size h (3072 in
    FLUX.1; `mlp_hidden_size` defaults to 4h). None for a module that has a BFL weight of its own (`bfl_module` names
    it); an error for a name that is not the transformer's. The rows are those of `.weight` and `.bias` alike."""
    scope, _, b_block, rest = _split_name(diffusers_module, bfl=False)
    if rest not in _PART_OF[scope]:
        bfl_module(diffusers_module)  # refuses names that are not the transformer's
        return None
    fused, position = _PART_OF[scope][rest]
    rows = _part_rows(scope, fused, hidden_size, mlp_hidden_size)
    start = sum(rows[:position])
    return b_block + fused, start, start + rows[position]


def concatenate_rows(parts: Sequence[Any]) -> Any:
    """Rows stacked: numpy arrays with numpy, torch tensors with torch (imported only then)."""
    if type(parts[0]).__module__.startswith("numpy"):
        import numpy

        return numpy.concatenate(parts, axis=0)
    import torch

    return torch.cat(list(parts), dim=0)


def swap_halves(value: Any, concatenate: Callable[[Sequence[Any]], Any]) -> Any:
    """The two halves of the rows exchanged (BFL's (shift, scale) <-> diffusers' (scale, shift)); its own inverse."""
    half = value.shape[0] // 2
    return concatenate([value[half:], value[:half]])


def fused_weights(pending: Mapping[str, list[Any]], concatenate: Callable[[Sequence[Any]], Any]) -> dict[str, Any]:
    """Each fused weight of another layout stacked from its diffusers parts (`pending`: key -> the parts in order, None
    where one was not given: an error naming the weight)."""
    out = {}
    for key, parts in pending.items():
        if any(part is None for part in parts):
            raise KronaError(f"{key!r} cannot be written: some of the diffusers weights it stacks are missing")
        out[key] = concatenate(parts)
    return out


def diffusers_to_bfl(
    state: Mapping[str, Any], prefix: str = "", concatenate: Callable[[Sequence[Any]], Any] | None = None
) -> dict[str, Any]:
    """A diffusers FluxTransformer2DModel state dict in BFL's layout (q/k/v and the single blocks' MLP input fused,
    the final modulation's halves swapped), every name after `prefix` (`BFL_PREFIX` for a whole checkpoint's).
    `concatenate` stacks arrays by rows (default: numpy's or torch's, by the arrays' type)."""
    concatenate = concatenate or concatenate_rows
    out: dict[str, Any] = {}
    pending: dict[str, list[Any]] = {}  # fused BFL key -> its parts, in order
    for key, value in state.items():
        scope, _, b_block, rest = _split_name(key, bfl=False)
        module, _, param = rest.rpartition(".")
        if rest in _NORMS[scope]:
            out[prefix + b_block + _NORMS[scope][rest]] = value
        elif module in _RENAMES[scope]:
            name = _RENAMES[scope][module]
            out[prefix + b_block + f"{name}.{param}"] = swap_halves(value, concatenate) if name == _SWAPPED else value
        elif module in _PART_OF[scope]:
            fused, position = _PART_OF[scope][module]
            parts = pending.setdefault(prefix + b_block + f"{fused}.{param}", [None] * len(_FUSED[scope][fused]))
            parts[position] = value
        else:
            raise KronaError(f"{key!r} is not a weight of a FLUX.1 transformer (diffusers' FluxTransformer2DModel)")
    return out | fused_weights(pending, concatenate)


def _hidden_size(state: Mapping[str, Any]) -> int | None:
    """The transformer's width, from the weights that tell it (None if none does)."""
    if "img_in.weight" in state:
        return int(state["img_in.weight"].shape[0])
    for key, value in state.items():
        if key.endswith(".linear1.weight"):
            return int(value.shape[1])
    return None


def _fused_rows(key: str, scope: str, fused: str, total: int, hidden: int | None) -> list[int]:
    """How a fused BFL weight of `total` rows splits into its diffusers parts (q, k, v thirds; a single block's
    `linear1` as hidden × 3 and the rest for its MLP)."""
    if fused != "linear1":
        rows = _part_rows(scope, fused, total // len(_FUSED[scope][fused]), None)
    elif hidden is None:
        raise KronaError(f"{key!r} cannot be split: the transformer's hidden size is unknown; pass `hidden_size`")
    else:
        rows = _part_rows(scope, fused, hidden, total - 3 * hidden)
    if sum(rows) != total or min(rows) <= 0:
        raise KronaError(f"{key!r} has {total} rows, which do not split into {rows}: not a FLUX.1 weight")
    return rows


def bfl_to_diffusers(state: Mapping[str, Any], hidden_size: int | None = None) -> dict[str, Any]:
    """A FLUX.1 transformer state dict in BFL's layout (with or without `model.diffusion_model.`) in diffusers'
    FluxTransformer2DModel names: fused weights split by rows, the final modulation's halves swapped back.
    `hidden_size` (3072 in FLUX.1) is read from `img_in.weight` or a `linear1.weight` when not given; it is needed
    only to split a single block's `linear1`."""
    bare = {key.removeprefix(BFL_PREFIX): value for key, value in state.items()}
    hidden = hidden_size if hidden_size is not None else _hidden_size(bare)
    out: dict[str, Any] = {}
    for key, value in bare.items():
        scope, _, d_block, rest = _split_name(key, bfl=True)
        module, _, param = rest.rpartition(".")
        if rest in _NORMS_BACK[scope]:
            out[d_block + _NORMS_BACK[scope][rest]] = value
        elif module in _RENAMES_BACK[scope]:
            out[d_block + f"{_RENAMES_BACK[scope][module]}.{param}"] = (
                swap_halves(value, concatenate_rows) if module == _SWAPPED else value
            )
        elif module in _FUSED[scope]:
            start = 0
            for part, count in zip(_FUSED[scope][module], _fused_rows(key, scope, module, int(value.shape[0]), hidden)):
                out[d_block + f"{part}.{param}"] = value[start : start + count]
                start += count
        else:
            raise KronaError(f"{key!r} is not a weight of a FLUX.1 transformer in Black Forest Labs' layout")
    return out


# --- the linear modules, and names with `.` spelled `_` (adapter files' lora names) -------------------------------


def _scope_prefix(scope: str, bfl: bool) -> str:
    """A block scope's name prefix without its dot (`transformer_blocks`, `double_blocks`); "" for the top scope."""
    blocks = {"double": _DOUBLE, "single": _SINGLE}.get(scope)
    return "" if blocks is None else blocks[1 if bfl else 0].rstrip(".")


def _linear_rests(scope: str, bfl: bool) -> tuple[str, ...]:
    """The linear modules of a scope after its block prefix, in BFL's names or diffusers' (fused parts included)."""
    if bfl:
        return (*_RENAMES[scope].values(), *_FUSED[scope])
    return (*_RENAMES[scope], *_PART_OF[scope])


def _encoded_rests() -> dict[tuple[str, bool], dict[str, str]]:
    """Per (scope, BFL?): a linear's rest with `.` spelled `_` -> the rest itself."""
    tables = {}
    for scope in _RENAMES:
        for bfl in (False, True):
            tables[scope, bfl] = {rest.replace(".", "_"): rest for rest in _linear_rests(scope, bfl)}
    return tables


_ENCODED = _encoded_rests()


def module_from_underscores(name: str, bfl: bool) -> str | None:
    """The FLUX.1 transformer's linear module a lora name spells with `_` for `.`, in diffusers' names
    (`transformer_blocks_3_attn_to_q` -> `transformer_blocks.3.attn.to_q`) or, with `bfl`, in BFL's
    (`double_blocks_3_img_attn_qkv` -> `double_blocks.3.img_attn.qkv`); None when it names no such module."""
    for scope in ("single", "double"):
        block = _scope_prefix(scope, bfl) + "_"
        if name.startswith(block):
            number, _, rest = name[len(block) :].partition("_")
            found = _ENCODED[scope, bfl].get(rest) if number.isdigit() and str(int(number)) == number else None
            return None if found is None else f"{block[:-1]}.{number}.{found}"
    return _ENCODED["top", bfl].get(name)


def is_linear(module: str, bfl: bool) -> bool:
    """Whether `module` is a linear module of the FLUX.1 transformer in diffusers' names or, with `bfl`, BFL's."""
    scope, prefix, _, rest = _split_name(module, bfl)
    return rest in _linear_rests(scope, bfl) and (scope == "top") == (prefix == "")


def fused_rows(bfl_module: str, hidden_size: int, mlp_hidden_size: int | None = None) -> int:
    """How many rows a fused BFL weight (`img_attn.qkv`, `txt_attn.qkv`, `linear1`) has for this width."""
    scope, _, _, rest = _split_name(bfl_module, bfl=True)
    if rest not in _FUSED[scope]:
        raise KronaError(f"{bfl_module!r} is not a fused weight of a FLUX.1 transformer in Black Forest Labs' layout")
    return sum(_part_rows(scope, rest, hidden_size, mlp_hidden_size))


def bfl_parts(bfl_module: str, rows: int, in_features: int) -> list[tuple[str, tuple[tuple[int, int], ...]]]:
    """The diffusers modules a BFL linear of `rows` output rows and `in_features` inputs holds, each with the row
    ranges (start, stop) of the BFL weight that make its rows, in order: one range for a rename or a fused part
    (`double_blocks.0.img_attn.qkv` -> `attn.to_q` (0, h), `attn.to_k` (h, 2h), `attn.to_v` (2h, 3h); a single
    block's `linear1` split with h = `in_features`), two for `final_layer.adaLN_modulation.1`, whose halves
    diffusers' `norm_out.linear` holds swapped: ((rows/2, rows), (0, rows/2))."""
    scope, _, d_block, rest = _split_name(bfl_module, bfl=True)
    if rest in _FUSED[scope]:
        parts, start = [], 0
        for part, count in zip(_FUSED[scope][rest], _fused_rows(bfl_module, scope, rest, rows, in_features)):
            parts.append((d_block + part, ((start, start + count),)))
            start += count
        return parts
    if rest not in _RENAMES_BACK[scope] or not is_linear(bfl_module, bfl=True):
        raise KronaError(f"{bfl_module!r} is not a linear module of a FLUX.1 transformer in Black Forest Labs' layout")
    module = d_block + _RENAMES_BACK[scope][rest]
    if rest != _SWAPPED:
        return [(module, ((0, rows),))]
    if rows % 2:
        raise KronaError(f"{bfl_module!r} has {rows} rows, which do not split into (shift, scale) halves")
    return [(module, ((rows // 2, rows), (0, rows // 2)))]
