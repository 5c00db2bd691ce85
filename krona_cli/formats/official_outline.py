"""Official DiffuseKronA checkpoints read without torch: their key names (diffusers 0.21's attention-processor naming,
see official.py), the check that their down/up shapes make a DiffuseKronA file rather than a LoRA one in the same
naming (`_classify`), and the outline of the adapter a file holds (`official_outline`). official.py fills it with the
tensors."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from .. import families
from ..errors import KronaError
from .native_outline import canonical_name
from .outline import LAYOUT_DIFFUSEKRONA, Adapter, KronOutline, TensorInfo

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
    return families.by_context_width(widths)


def _layer_parts(infos: Mapping[str, TensorInfo], source: str) -> tuple[dict, dict]:
    """{"<component>.<module>": {down|up: key}} of an official file's keys, and each layer's (component, module,
    role); KronaError for keys krona does not read and tensors that are not non-empty floating-point matrices."""
    parts: dict[str, dict[str, str]] = {}
    layers: dict[str, tuple[str, str, str]] = {}  # "<component>.<module>" -> (component, module, role)
    for key, info in infos.items():
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
        if info.dim() != 2 or 0 in info.shape or not info.is_floating_point():
            raise KronaError(
                f"'{source}': tensor '{key}' has shape {info.shape} and dtype {info.dtype}; a DiffuseKronA factor "
                "is a non-empty floating-point matrix. The file is damaged or of another kind"
            )
        parts[layer][part] = key
        layers[layer] = (component, module, role)
    return parts, layers


def official_outline(infos: Mapping[str, TensorInfo], source: str) -> Adapter:
    """The outline of the adapter (layout "diffusekrona") an official DiffuseKronA checkpoint holds, from its tensors'
    shapes: per layer A = down.weightᵀ and B = up.weight (roles `down`, `up`); module names are diffusers'
    (`...attn1.to_q`, `...attn1.to_out.0`, `text_model.encoder.layers.N.self_attn.q_proj`); scale 1.0, as the official
    code applies none. KronaError for keys krona does not read, layers with only one factor, shapes that do not fit
    together, and LoRA files in the same naming."""
    if not infos:
        raise KronaError(f"'{source}' holds no tensors; it is not a DiffuseKronA adapter")
    parts, layers = _layer_parts(infos, source)
    shapes = {}
    for layer, found in sorted(parts.items()):
        if len(found) != 2:
            have = next(iter(found))
            missing = "up" if have == "down" else "down"
            raise KronaError(
                f"'{source}': layer '{layer}' has '{found[have]}' but no {missing}.weight; "
                "each DiffuseKronA layer needs both factors. The file is incomplete"
            )
        shapes[layer] = (infos[found["down"]].shape, infos[found["up"]].shape)
    _classify(source, layers, shapes)

    adapter_layers: dict[str, dict[str, KronOutline]] = {}
    for layer, (component, module, _role) in sorted(layers.items()):
        (a2, a1), up = shapes[layer]
        a, b = TensorInfo("float32", (a1, a2)), TensorInfo("float32", up)
        adapter_layers.setdefault(component, {})[module] = KronOutline(a, b, parts[layer], LAYOUT_DIFFUSEKRONA)
    dims = {layer: (up[0] * down[1], up[1] * down[0]) for layer, (down, up) in shapes.items()}
    return Adapter(
        adapter_layers,
        scale=1.0,
        base_model=None,
        architecture=_guess_architecture(layers, dims),
        targets={component: "attn" if component == "unet" else "text" for component in adapter_layers},
        key_format="diffusers-processor",
    )
