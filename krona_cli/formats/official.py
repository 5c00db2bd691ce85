"""Official DiffuseKronA checkpoints (IBM/DiffuseKronA, `pytorch_lora_weights.safetensors`) and their layout.

The official layer keeps A transposed as `down.weight` (a2 × a1) and B as `up.weight` (b1 × b2), with
a1·b1 = d_out and a2·b2 = d_in. Its forward pass views the input as (b2 × a2) blocks, computes Y = B · X · Aᵀ and
flattens Y row-major, so the update it applies is not A ⊗ B but a row permutation of it
(reference/diffusekrona.md §1):

    ΔW[p·a1 + q, i·b2 + j] = B[p, j] · A[q, i]     (p < b1, q < a1, i < a2, j < b2)

Standard A ⊗ B would put A[q, i] · B[p, j] at row q·b1 + p instead. Adapters read from these files therefore hold
`DiffuseKronALayer`s (layout `diffusekrona`, their update kron.diffusekrona_delta) and are not attached as standard
Kronecker adapters.

Key names (diffusers 0.21 `save_lora_weights`):
    unet.<attention path>.processor.to_{q,k,v,out}_lora.{down,up}.weight
    text_encoder.text_model.encoder.layers.N.self_attn.{q,k,v,out}_proj.lora_linear_layer.{down,up}.weight
(the `unet.` prefix is optional: diffusers' `save_attn_procs` leaves it out). A diffusers LoRA file uses the same
names, with down (r × d_in) and up (d_out × r); `from_official` tells the two apart by shape (see `_classify`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from ..architectures import architecture_from_context_widths
from ..errors import KronaError
from .adapter import Adapter, DiffuseKronALayer
from .native import canonical_name

_UNET_KEY = re.compile(
    r"^(?:unet\.)?(?P<path>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight$"
)
_TEXT_KEY = re.compile(
    r"^(?P<component>text_encoder(?:_2)?)\.(?P<path>(?:text_model\.)?encoder\.layers\.\d+\.self_attn)\."
    r"(?P<proj>q_proj|k_proj|v_proj|out_proj)\.lora_linear_layer\.(?P<part>down|up)\.weight$"
)
# Any key in the official naming, including projections krona does not read (feed-forward, add_k_proj, ...): such
# files are still recognised as official, so that reading them names the key krona cannot use.
_OFFICIAL_LIKE = re.compile(r"(?:\.processor\.[A-Za-z0-9_.]+_lora|\.lora_linear_layer)\.(?:down|up)\.weight$")

# Role of each projection in its attention module: query, key, value, output.
_ROLE = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out": "o"}
_ROLE |= {"q_proj": "q", "k_proj": "k", "v_proj": "v", "out_proj": "o"}
_UNET_MODULE = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}


def is_official(keys: Iterable[str]) -> bool:
    """Whether tensor names are in the official DiffuseKronA (diffusers 0.21 attention-processor) naming.

    True when any key is of the form `...processor.to_{q,k,v,out}_lora.{down,up}.weight` or
    `...lora_linear_layer.{down,up}.weight`. diffusers LoRA files share this naming; `from_official` refuses them.
    """
    return any(_OFFICIAL_LIKE.search(k) for k in keys)


def _parse_key(key: str) -> tuple[str, str, str, str] | None:
    """(component, module path in the adapter, role, down|up) for a key krona reads, else None."""
    match = _UNET_KEY.match(key)
    if match:
        path, proj = match["path"], match["proj"]
        return "unet", f"{path}.{_UNET_MODULE[proj]}", _ROLE[proj], match["part"]
    match = _TEXT_KEY.match(key)
    if match:
        component = match["component"]
        module = canonical_name(component, f"{match['path']}.{match['proj']}")
        return component, module, _ROLE[match["proj"]], match["part"]
    return None


def _attention_of(component: str, module: str) -> str:
    """The attention module a projection belongs to (its path without the projection)."""
    module = module.removesuffix(".0") if module.endswith("to_out.0") else module
    return f"{component}:{module.rpartition('.')[0]}"


def _self_attention(component: str, attention: str) -> bool | None:
    """True for self-attention (key/value read the hidden states), False for cross-attention, None if unknown."""
    if component.startswith("text_encoder") or attention.endswith(".attn1"):
        return True
    if attention.endswith(".attn2"):
        return False
    return None


def _structure_problem(layers: dict, dims: dict) -> str | None:
    """Why the per-layer (d_out, d_in) in `dims` cannot be the projections of SD/SDXL attention modules, or None.

    Within one attention module: to_q and to_out are square, q/k/v give the same output width and to_out reads it;
    in self-attention (attn1, CLIP) k and v are square too; in cross-attention k and v read the same context width.
    """
    modules: dict[str, dict[str, str]] = {}
    for layer, (component, _module, role) in layers.items():
        modules.setdefault(_attention_of(component, _module), {})[role] = layer
    for attention, roles in sorted(modules.items()):
        component, _, path = attention.partition(":")
        inner = None
        for role in ("q", "k", "v", "o"):
            if role not in roles:
                continue
            layer = roles[role]
            d_out, d_in = dims[layer]
            if role in ("q", "o") or (role in ("k", "v") and _self_attention(component, path)):
                if d_out != d_in:
                    return f"layer '{layer}' would be {d_out}x{d_in} (out x in), but this projection is square"
            width = d_in if role == "o" else d_out
            if inner is None:
                inner = width
            elif width != inner:
                return (
                    f"layer '{layer}' would be {d_out}x{d_in} (out x in), which does not fit the "
                    f"{inner}-wide projections beside it"
                )
        if "k" in roles and "v" in roles and dims[roles["k"]][1] != dims[roles["v"]][1]:
            return f"layers '{roles['k']}' and '{roles['v']}' would read inputs of different widths"
    return None


def _classify(source: str, layers: dict, shapes: dict) -> None:
    """Raise unless the down/up shapes identify an official DiffuseKronA file (rather than a LoRA one).

    The rule: read as DiffuseKronA (down = a2 × a1, up = b1 × b2), each layer is (b1·a1) × (b2·a2); read as LoRA
    (down = r × d_in, up = d_out × r), it is up[0] × down[1] and needs down[0] == up[1]. Only one reading can
    usually fit the structure of an attention module (see `_structure_problem`); a LoRA file read as DiffuseKronA
    gives to_q an output of d² and an input of r², which is square only at full rank. When both fit (possible only
    when every width is a perfect square and a1 = a2 = its root, or with nothing square to check), the file is
    ambiguous and refused.
    """
    official_dims = {layer: (up[0] * down[1], up[1] * down[0]) for layer, (down, up) in shapes.items()}
    lora_rank_fits = all(down[0] == up[1] for down, up in shapes.values())
    official_problem = _structure_problem(layers, official_dims)
    lora_problem = (
        _structure_problem(layers, {layer: (up[0], down[1]) for layer, (down, up) in shapes.items()})
        if lora_rank_fits
        else "ranks differ"
    )
    if official_problem is None and lora_problem is None:
        raise KronaError(
            f"'{source}' could be a LoRA file as well as a DiffuseKronA one: its down/up shapes fit both readings. "
            "krona reads official DiffuseKronA files only when their shapes identify them; if it is a LoRA, use a "
            "LoRA tool"
        )
    if official_problem is not None:
        if lora_rank_fits:
            raise KronaError(
                f"'{source}' looks like a LoRA file, not DiffuseKronA: every down.weight is (r, d_in) and up.weight "
                f"(d_out, r) with the same r ({official_problem} as DiffuseKronA); use a LoRA tool for it"
            )
        raise KronaError(
            f"'{source}' is not a consistent DiffuseKronA file: {official_problem} "
            "(down.weight must be (a2, a1) and up.weight (d_out/a1, d_in/a2)); the file is damaged or of another kind"
        )


def _guess_architecture(layers: dict, dims: dict) -> str | None:
    widths = {
        dims[layer][1]
        for layer, (component, module, role) in layers.items()
        if component == "unet" and role in ("k", "v") and module.rpartition(".")[0].endswith(".attn2")
    }
    return architecture_from_context_widths(widths)


def from_official(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str) -> Adapter:
    """An Adapter of DiffuseKronALayers (layout "diffusekrona") from the tensors of an official DiffuseKronA checkpoint.

    A = down.weightᵀ and B = up.weight (float32); module names are diffusers' (`...attn1.to_q`,
    `...attn1.to_out.0`, `text_model.encoder.layers.N.self_attn.q_proj`); scale 1.0, as the official code applies
    none. KronaError for keys krona does not read, layers with only one factor, shapes that do not fit together,
    and LoRA files in the same naming. `metadata` (diffusers writes only {"format": "pt"}) is not used.
    """
    del metadata
    if not tensors:
        raise KronaError(f"'{source}' holds no tensors; it is not a DiffuseKronA adapter")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    layers: dict[str, tuple[str, str, str]] = {}  # "<component>.<module>" -> (component, module, role)
    keys_of: dict[str, dict[str, str]] = {}
    for key, t in tensors.items():
        parsed = _parse_key(key)
        if parsed is None:
            raise KronaError(
                f"'{source}' holds an unexpected tensor '{key}'; krona reads official DiffuseKronA files whose "
                "tensors are the down/up factors of the UNet to_q/to_k/to_v/to_out (and CLIP q/k/v/out_proj) layers"
            )
        component, module, role, part = parsed
        layer = f"{component}.{module}"
        if part in parts.setdefault(layer, {}):
            raise KronaError(f"'{source}' holds two tensors for '{key}' (with and without the 'unet.' prefix)")
        if t.dim() != 2 or 0 in t.shape or not t.is_floating_point():
            raise KronaError(
                f"'{source}': tensor '{key}' has shape {tuple(t.shape)} and dtype {t.dtype}; a DiffuseKronA factor "
                "is a non-empty floating-point matrix. The file is damaged or of another kind"
            )
        parts[layer][part] = t
        keys_of.setdefault(layer, {})[part] = key
        layers[layer] = (component, module, role)
    shapes = {}
    for layer, found in sorted(parts.items()):
        if len(found) != 2:
            have = next(iter(found))
            missing = "up" if have == "down" else "down"
            raise KronaError(
                f"'{source}': layer '{layer}' has '{keys_of[layer][have]}' but no {missing}.weight; "
                "each DiffuseKronA layer needs both factors. The file is incomplete"
            )
        shapes[layer] = (tuple(found["down"].shape), tuple(found["up"].shape))
    _classify(source, layers, shapes)

    adapter_layers: dict[str, dict[str, DiffuseKronALayer]] = {}
    for layer, (component, module, _role) in sorted(layers.items()):
        down, up = parts[layer]["down"], parts[layer]["up"]
        adapter_layers.setdefault(component, {})[module] = DiffuseKronALayer(
            down.detach().float().t().contiguous(), up.detach().float().contiguous()
        )
    dims = {layer: (up[0] * down[1], up[1] * down[0]) for layer, (down, up) in shapes.items()}
    return Adapter(
        adapter_layers,
        scale=1.0,
        base_model=None,
        architecture=_guess_architecture(layers, dims),
        targets={component: "attn" if component == "unet" else "text" for component in adapter_layers},
        key_format="diffusers-processor",
    )
