"""LoRA files read without torch: which keys are LoRA keys (`is_lora`), what each names (diffusers/peft, older
diffusers and kohya names, see lora.py's docstring), each layer's multiplier (kohya's alpha / r, or diffusers' peft
LoraConfig in the metadata), and the outline of the adapter a file holds (`lora_outline`). lora.py fills it with the
tensors and writes LoRA files."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping

from .. import families
from ..errors import KronaError
from . import flux_names
from .bfl_layout import is_linear
from .kohya_names import NameReader, check_text_prefixes, kohya_prefix
from .native_outline import METADATA_KEY, canonical_name, json_metadata
from .outline import Adapter, LoraOutline, TensorInfo

# What krona's own LoRA export records as its format (its `krona` metadata's "format").
EXPORT_FORMAT = "lora"
# diffusers' key for the peft LoraConfig of each component (`loaders.lora_base.LORA_ADAPTER_METADATA_KEY`).
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"

_KOHYA_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}

# diffusers formats: <component>.<module>.<suffix>; the component prefix may be missing for the UNet.
_DIFFUSERS_SUFFIXES = {
    "lora_A.weight": ("down", "diffusers"),
    "lora_B.weight": ("up", "diffusers"),
    "lora.down.weight": ("down", "diffusers-old"),
    "lora.up.weight": ("up", "diffusers-old"),
    "lora_linear_layer.down.weight": ("down", "diffusers-old"),
    "lora_linear_layer.up.weight": ("up", "diffusers-old"),
}
_DIFFUSERS_KEY = re.compile(
    r"^(?:(?P<component>unet|transformer|text_encoder|text_encoder_2)\.)?(?P<module>.+?)\."
    r"(?P<suffix>lora_A\.weight|lora_B\.weight|lora\.down\.weight|lora\.up\.weight|"
    r"lora_linear_layer\.down\.weight|lora_linear_layer\.up\.weight)$"
)
# Top-level modules of UNet2DConditionModel: where a key without a component prefix must start.
_UNET_ROOTS = (
    "down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_embedding.", "add_embedding.",
    "encoder_hid_proj", "class_embedding",
)  # fmt: skip

# What `is_lora` takes as LoRA: only names no other format krona reads uses.
_LORA_KEY = re.compile(
    r"(?:^lora_(?:unet|te|te1|te2|transformer)_[A-Za-z0-9_]+\.lora_(?:down|up)\.weight$)"
    r"|(?:\.lora_[AB]\.weight$)"
    r"|(?:\.lora\.(?:down|up)\.weight$)"
)
_DORA = ("dora_scale", "lora_magnitude_vector")
_SUPPORTED = (
    "LoRA on linear layers: diffusers/peft `lora_A`/`lora_B` keys, older diffusers `lora.down`/`lora.up` keys, "
    "or kohya `lora_down`/`lora_up`/`alpha` keys"
)


def is_lora(keys: Iterable[str]) -> bool:
    """True when any key is a LoRA key in a naming only LoRA files use (diffusers `lora_A`/`lora_B`, older diffusers
    `lora.down`/`lora.up`, kohya `lora_down`/`lora_up`). Files in the processor / `lora_linear_layer` naming alone
    are left to the official DiffuseKronA reader, which shares it."""
    return any(_LORA_KEY.search(k) for k in keys)


def _refuse_other_kinds(key: str, source: str) -> None:
    """KronaError for DoRA keys, with the reason; other unknown keys are refused where they are parsed."""
    if any(part in key for part in _DORA):
        raise KronaError(
            f"'{source}' holds '{key}', a DoRA magnitude: DoRA adapters are not plain LoRA (ΔW is renormalised per "
            f"column) and krona does not read them; krona reads {_SUPPORTED}"
        )


def _unknown(key: str, source: str) -> KronaError:
    return KronaError(
        f"'{source}' holds '{key}', which krona does not read as LoRA: it supports {_SUPPORTED} "
        "(no DoRA, biases, conv LoRA, LoCon/LoHa/LoKr or other algorithms)"
    )


def _parse_kohya(key: str, names: NameReader, source: str) -> tuple[str, str, str] | None:
    """(component, module, down|up|alpha) of a kohya key, None when the key is not kohya-named."""
    if kohya_prefix(key) is None:
        return None
    name, dot, suffix = key.partition(".")
    if not dot or suffix not in _KOHYA_SUFFIXES:
        raise _unknown(key, source)
    _prefix, component, module = names.module(name, key)
    return component, module, _KOHYA_SUFFIXES[suffix]


def _parse_diffusers(key: str, source: str) -> tuple[str, str, str, str]:
    """(component, module, down|up, key format) of a diffusers-format key; KronaError for anything else."""
    match = _DIFFUSERS_KEY.match(key)
    if not match:
        raise _unknown(key, source)
    component, module, suffix = match["component"], match["module"], match["suffix"]
    part, key_format = _DIFFUSERS_SUFFIXES[suffix]
    if component is None:
        if module.startswith(_UNET_ROOTS):
            component = "unet"
        elif is_linear(module, bfl=False):  # DiffSynth's bare FLUX.1 names
            component = flux_names.TRANSFORMER
        else:
            raise KronaError(
                f"'{source}' holds '{key}' without a component prefix (unet., transformer., text_encoder., "
                "text_encoder_2.) and it is not a UNet or FLUX.1 transformer module; krona cannot tell which model it "
                "adapts"
            )
    if suffix.startswith("lora_linear_layer") and component in ("unet", flux_names.TRANSFORMER):
        raise _unknown(key, source)
    if component == flux_names.TRANSFORMER:
        flux_names.check_module(module, key, source)
    return component, canonical_name(component, module), part, key_format


def _matrix(info: TensorInfo, key: str, source: str) -> TensorInfo:
    if info.dim() == 4:
        raise KronaError(
            f"'{source}' holds '{key}' of shape {info.shape}, a conv LoRA weight: krona reads LoRA on linear "
            "layers only (2-D down/up matrices)"
        )
    if info.dim() != 2 or 0 in info.shape or not info.is_floating_point():
        raise KronaError(
            f"'{source}' holds '{key}' of shape {info.shape} and dtype {info.dtype}; a LoRA factor is a non-empty "
            "floating-point matrix. The file is damaged or of another kind"
        )
    return info


def _pattern_value(patterns: dict, names: list[str], default, source: str):
    """peft's `get_pattern_key`: the first pattern p with `(.*\\.)?(p)$` matching the module name, else default."""
    for pattern, value in patterns.items():
        for name in names:
            try:
                if re.match(rf"(.*\.)?({pattern})$", name):
                    return value
            except re.error as e:
                raise KronaError(
                    f"'{source}' has an invalid module pattern '{pattern}' in its LoRA metadata; the file is damaged"
                ) from e
    return default


def _peft_multiplier(config: dict, component: str, module: str, rank: int, source: str) -> float:
    """alpha / r for one module from a component's peft LoraConfig (as diffusers stores it), like peft computes it."""
    if config.get("use_dora"):
        raise KronaError(
            f"'{source}' is a DoRA adapter (its {component} LoRA config says use_dora); DoRA is not plain LoRA and "
            f"krona does not read it; krona reads {_SUPPORTED}"
        )
    names = [module]
    if component.startswith("text_encoder") and module.startswith("text_model."):
        names.append(module[len("text_model.") :])
    r = _pattern_value(config.get("rank_pattern") or {}, names, config.get("r", 8), source)
    alpha = _pattern_value(config.get("alpha_pattern") or {}, names, config.get("lora_alpha", 8), source)
    if not isinstance(r, (int, float)) or not isinstance(alpha, (int, float)):
        raise KronaError(f"'{source}' has a non-numeric rank or alpha for '{component}.{module}'; the file is damaged")
    if r != rank:
        raise KronaError(
            f"'{source}': the LoRA metadata gives '{component}.{module}' rank {r}, its tensors have rank {rank}; "
            "the file is damaged"
        )
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _parts(
    infos: Mapping[str, TensorInfo], names: NameReader, source: str
) -> tuple[dict[tuple[str, str], dict[str, str]], set[str]]:
    """{(component, module): {down|up|alpha: key}} of a LoRA file's keys, and the key formats they use."""
    parts: dict[tuple[str, str], dict[str, str]] = {}
    formats: set[str] = set()
    for key in infos:
        _refuse_other_kinds(key, source)
        parsed = _parse_kohya(key, names, source)
        if parsed is not None:
            component, module, part = parsed
            formats.add("kohya")
        else:
            component, module, part, key_format = _parse_diffusers(key, source)
            formats.add(key_format)
        found = parts.setdefault((component, module), {})
        if part in found:
            raise KronaError(
                f"'{source}' holds two tensors for the {part} of '{component}.{module}' "
                f"('{found[part]}' and '{key}'); the file is damaged"
            )
        found[part] = key
    if "kohya" in formats and len(formats) > 1:
        raise KronaError(
            f"'{source}' mixes kohya (lora_unet_...) and diffusers (unet....) LoRA keys; the file is damaged"
        )
    check_text_prefixes(names.prefixes, source)
    return parts, formats


def _alpha_multiplier(info: TensorInfo, key: str, rank: int, value: Callable[[str], float], source: str) -> float:
    """kohya's multiplier alpha / r from the alpha tensor `key`, which must be one finite real number."""
    if info.numel() != 1 or info.is_complex():
        raise KronaError(f"'{source}': '{key}' of shape {info.shape} is not one number")
    alpha = value(key)
    if not math.isfinite(alpha):
        raise KronaError(f"'{source}': '{key}' is {alpha}; the file is damaged")
    return alpha / rank


def _layer(
    found: dict[str, str],
    infos: Mapping[str, TensorInfo],
    component: str,
    module: str,
    value: Callable[[str], float],
    peft_config: dict | None,
    source: str,
) -> LoraOutline:
    """One layer's outline from its keys (down, up, and alpha where there is one); `peft_config` is its component's
    LoraConfig from diffusers' metadata (None without)."""
    where = f"{component}.{module}"
    for needed in ("down", "up"):
        if needed not in found:
            raise KronaError(
                f"'{source}': layer '{where}' has {', '.join(repr(k) for k in found.values())} but no {needed} "
                "weight; each LoRA layer needs both. The file is incomplete"
            )
    down, up = _matrix(infos[found["down"]], found["down"], source), _matrix(infos[found["up"]], found["up"], source)
    if down.shape[0] != up.shape[1]:
        raise KronaError(
            f"'{source}': layer '{where}' has down {down.shape} and up {up.shape}, which do not "
            "multiply (down must be r × d_in, up d_out × r); the file is damaged"
        )
    rank = down.shape[0]
    multiplier = 1.0
    if "alpha" in found:
        multiplier = _alpha_multiplier(infos[found["alpha"]], found["alpha"], rank, value, source)
    elif peft_config:
        multiplier = _peft_multiplier(peft_config, component, module, rank, source)
    keys = {"down": found["down"], "up": found["up"]}
    return LoraOutline(TensorInfo("float32", down.shape), TensorInfo("float32", up.shape), keys, multiplier)


def _add_layer(
    layers: dict[str, dict[str, LoraOutline]], component: str, module: str, layer: LoraOutline, source: str
) -> None:
    """A file layer into `layers`; a FLUX.1 transformer's fused one (kohya's BFL names) as the diffusers modules it
    stacks, each with its rows of up and the whole down (flux_names.parts)."""
    split = [(module, None)]
    if component == flux_names.TRANSFORMER:
        split = flux_names.parts(module, layer.up.shape[0], layer.down.shape[1])
    for part, rows in split:
        if part in layers.get(component, {}):
            raise KronaError(f"'{source}' holds two LoRA layers for '{component}.{part}'; the file is damaged")
        if rows is not None:
            up = TensorInfo("float32", (sum(stop - start for start, stop in rows), layer.rank))
            layer = LoraOutline(layer.down, up, layer.keys, layer.multiplier, rows)
        layers.setdefault(component, {})[part] = layer


def lora_outline(
    infos: Mapping[str, TensorInfo],
    metadata: Mapping[str, str],
    source: str,
    unet_config: Mapping | None,
    value: Callable[[str], float],
) -> Adapter:
    """The outline of the adapter of LoRA layers a LoRA file holds, from its tensors' shapes and its metadata
    (`value(key)`: the first number of a tensor, read for kohya's alphas).

    Multipliers: kohya alpha / r (1 without alpha); diffusers formats 1, or alpha / r from diffusers'
    `lora_adapter_metadata` where present. A file krona exported carries its base model and architecture in the
    `krona` metadata; otherwise the architecture comes from a FLUX.1 transformer's layers, `ss_base_model_version`, a
    second text encoder, or the UNet's cross-attention width. A fused FLUX.1 layer (kohya's `img_attn.qkv`,
    `linear1`) becomes the diffusers modules it stacks: each its rows of up, the whole down (flux_names.py).
    SGM-named UNet layers (kohya's SDXL files) are mapped to diffusers paths with `unet_config` (kohya_names.py).
    """
    if not infos:
        raise KronaError(f"'{source}' holds no tensors; it is not a LoRA adapter")
    names = NameReader(infos, metadata, source, unet_config, "LoRA")
    parts, formats = _parts(infos, names, source)
    peft_configs = json_metadata(metadata, DIFFUSERS_METADATA_KEY, source) if "kohya" not in formats else None
    layers: dict[str, dict[str, LoraOutline]] = {}
    for (component, module), found in sorted(parts.items()):
        config = None
        if peft_configs is not None:
            config = {k[len(component) + 1 :]: v for k, v in peft_configs.items() if k.startswith(f"{component}.")}
        _add_layer(layers, component, module, _layer(found, infos, component, module, value, config, source), source)
    meta = json_metadata(metadata, METADATA_KEY, source)
    flux_names.check_components(layers, source, meta.get("architecture") if meta is not None else None)
    targets, training = {}, None
    if meta is not None and meta.get("format") == EXPORT_FORMAT:  # krona's export: the source adapter's settings
        base_model, architecture = meta.get("base_model"), meta.get("architecture")
        origin = meta.get("source") if isinstance(meta.get("source"), dict) else {}
        targets, training = origin.get("targets") or {}, origin.get("training")
    else:
        # a second text encoder's layers (diffusers' `text_encoder_2.`, kohya's `lora_te2_`) say the base has two
        text_encoders = 2 if "text_encoder_2" in layers or "lora_te2_" in names.prefixes else None
        base_model, architecture = None, families.recognise_adapter(metadata, layers, text_encoders)
    if "kohya" in formats:
        key_format = names.key_format
    else:
        key_format = "diffusers" if "diffusers" in formats else "diffusers-old"
    return Adapter(layers, 1.0, base_model, architecture, targets, training, key_format, format_version=None)
