"""LyCORIS / kohya LoKr files read without torch: which keys are LoKr keys (`is_lycoris`), what each names, and the
outline of the adapter a file holds (`lycoris_outline`: per layer the shapes of A = w1 and B = w2, the keys that make
them, the loaders' scale of a decomposed factor; the settings). lycoris.py fills it with the tensors and writes the
format; its docstring describes the keys."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping

from .. import families
from ..errors import KronaError
from ..kron import TARGET_PRESETS
from . import flux_names
from .kohya_names import NameReader, check_text_prefixes
from .native_outline import METADATA_KEY, json_metadata
from .outline import Adapter, KronOutline, TensorInfo

# Tensor suffixes krona reads. Anything else (Tucker `lokr_t1`/`lokr_t2`, DoRA `dora_scale`, LoRA keys) is refused.
_FULL = ("lokr_w1", "lokr_w2")
_DECOMPOSED = ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b")
SUFFIXES = (*_FULL, *_DECOMPOSED, "alpha")
_SUPPORTED = (
    "LoKr on linear layers with `lokr_w1` or `lokr_w1_a`/`lokr_w1_b`, `lokr_w2` or `lokr_w2_a`/`lokr_w2_b`, and `alpha`"
)
_LOKR_KEY = re.compile(
    r"^(?:lora_(?:unet|te|te1|te2|transformer)|lycoris)_[A-Za-z0-9_]+\.lokr_(w1|w2|w1_a|w1_b|w2_a|w2_b|t1|t2)$"
)


def is_lycoris(keys: Iterable[str]) -> bool:
    """True when the keys look like a kohya/LyCORIS LoKr file (`lora_unet_...lokr_w1`, FLUX.1's `lycoris_...` and
    `lora_transformer_...` etc.)."""
    return any(_LOKR_KEY.match(k) for k in keys)


def _split_key(key: str, names: NameReader, source: str) -> tuple[str, str, str]:
    """(component, module path, suffix) of a LoKr key; KronaError for anything krona does not read."""
    name, dot, suffix = key.partition(".")
    found = names.module(name, key) if dot else None
    if found is None:
        raise KronaError(
            f"'{source}' holds a tensor '{key}' that is not a kohya/LyCORIS key (lora_unet_..., lora_te_..., "
            f"lora_te1_..., lora_te2_..., lycoris_..., lora_transformer_...); krona reads {_SUPPORTED}"
        )
    if suffix not in SUFFIXES:
        raise KronaError(
            f"'{source}' holds '{key}', which krona does not read: it supports {_SUPPORTED} "
            "(no Tucker `lokr_t2`, DoRA `dora_scale`, conv layers or other algorithms)"
        )
    _prefix, component, module = found
    return component, module, suffix


def _matrix(info: TensorInfo, key: str, source: str) -> TensorInfo:
    if info.dim() != 2:
        raise KronaError(
            f"'{source}' holds '{key}' of shape {info.shape}: krona reads LoKr factors of linear layers "
            "(2-D matrices), not conv-shaped or Tucker factors"
        )
    return info


def _factor(
    parts: dict[str, str], infos: Mapping[str, TensorInfo], side: str, where: str, source: str
) -> tuple[TensorInfo, dict[str, str], int | None]:
    """The full factor `side` (w1 or w2) as it will be read (float32), the keys that make it (role `w1`, or `w1_a`
    and `w1_b`), and its inner rank when it is stored decomposed."""
    full, a, b = parts.get(f"lokr_{side}"), parts.get(f"lokr_{side}_a"), parts.get(f"lokr_{side}_b")
    if full is not None and (a is not None or b is not None):
        raise KronaError(f"'{source}' stores both lokr_{side} and lokr_{side}_a/_b for '{where}'; the file is damaged")
    if full is not None:
        return TensorInfo("float32", _matrix(infos[full], f"{where}.lokr_{side}", source).shape), {side: full}, None
    if a is None or b is None:
        raise KronaError(
            f"'{source}' lacks lokr_{side} (or the pair lokr_{side}_a/lokr_{side}_b) for '{where}'; "
            "the file is damaged or incomplete"
        )
    shape_a = _matrix(infos[a], f"{where}.lokr_{side}_a", source).shape
    shape_b = _matrix(infos[b], f"{where}.lokr_{side}_b", source).shape
    if shape_a[1] != shape_b[0]:
        raise KronaError(
            f"'{source}' has lokr_{side}_a {shape_a} and lokr_{side}_b {shape_b} at '{where}', "
            "which do not multiply; the file is damaged"
        )
    return TensorInfo("float32", (shape_a[0], shape_b[1])), {f"{side}_a": a, f"{side}_b": b}, shape_b[0]


def _infer_targets(component: str, modules: Iterable[str], architecture: str | None) -> str:
    """A preset (the architecture's family's) when it covers every adapted module, else a regular expression for
    exactly these modules."""
    modules = list(modules)
    table = families.get(architecture).target_presets if architecture else TARGET_PRESETS
    denoisers = {family.denoiser for family in families.FAMILIES}
    presets = ("attn", "attn-ff") if component in denoisers else ("text",)
    for preset in presets:
        pattern = re.compile(table[preset])
        if all(pattern.search(m) for m in modules):
            return preset
    return "^(?:" + "|".join(re.escape(m) for m in modules) + ")$"


def _grouped(infos: Mapping[str, TensorInfo], names: NameReader, source: str) -> dict[tuple[str, str], dict[str, str]]:
    """{(component, module): {suffix: key}} of a LoKr file's keys."""
    grouped: dict[tuple[str, str], dict[str, str]] = {}
    for key in infos:
        component, module, suffix = _split_key(key, names, source)
        parts = grouped.setdefault((component, module), {})
        if suffix in parts:
            check_text_prefixes(names.prefixes, source)  # the likelier cause, named first
            raise KronaError(f"'{source}' holds two '{suffix}' tensors for '{component}.{module}'; the file is damaged")
        parts[suffix] = key
    if not grouped:
        raise KronaError(f"'{source}' holds no tensors; it is not a LoKr adapter")
    check_text_prefixes(names.prefixes, source)
    return grouped


def _part_rows(rows: tuple[tuple[int, int], ...], w2_rows: int, where: str, source: str) -> int:
    """How many rows of w1 make a fused LoKr layer's part (the ranges of its update's rows `rows`), which must each
    be whole blocks of w2's rows: w1[rows] ⊗ w2 is then exactly those rows of w1 ⊗ w2."""
    if any(start % w2_rows or stop % w2_rows for start, stop in rows):
        raise KronaError(
            f"'{source}' holds a LoKr layer '{where}' over a fused weight whose parts' row ranges {list(rows)} are not "
            f"whole multiples of its w2's {w2_rows} rows, so it does not split into the modules krona adapts"
        )
    return sum(stop - start for start, stop in rows) // w2_rows


def _layers(
    grouped: dict[tuple[str, str], dict[str, str]],
    infos: Mapping[str, TensorInfo],
    value: Callable[[str], float],
    source: str,
) -> dict[str, dict[str, KronOutline]]:
    """Each file layer's outline by component and module (A = w1, B = w2, the loaders' multiplier), a FLUX.1
    transformer's fused layer (kohya's BFL names) split into the diffusers modules it stacks."""
    layers: dict[str, dict[str, KronOutline]] = {}
    for (component, module), parts in grouped.items():
        where = f"{component}.{module}"
        w1, keys1, r1 = _factor(parts, infos, "w1", where, source)
        w2, keys2, r2 = _factor(parts, infos, "w2", where, source)
        # ComfyUI's and A1111's rule: alpha / r when a factor is decomposed (w2's rank when both are), else 1.
        rank = r2 if r2 is not None else r1
        alpha = parts.get("alpha")
        ui_scale = 1.0 if rank is None or alpha is None else value(alpha) / rank
        split = [(module, None)]
        if component == flux_names.TRANSFORMER:
            d_out, d_in = w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]
            split = flux_names.parts(module, d_out, d_in)
        for part, rows in split:
            a = w1
            if rows is not None:
                a = TensorInfo("float32", (_part_rows(rows, w2.shape[0], where, source), w1.shape[1]))
            if part in layers.get(component, {}):
                raise KronaError(f"'{source}' holds two LoKr layers for '{component}.{part}'; the file is damaged")
            layers.setdefault(component, {})[part] = KronOutline(a, w2, keys1 | keys2, multiplier=ui_scale, rows=rows)
    return layers


def lycoris_outline(
    infos: Mapping[str, TensorInfo],
    metadata: Mapping[str, str],
    source: str,
    unet_config: Mapping | None,
    value: Callable[[str], float],
) -> Adapter:
    """The outline of the standard-layout adapter a LyCORIS/kohya LoKr file holds, from its tensors' shapes and its
    metadata (`value(key)`: the first number of a tensor, read only for the alpha of a decomposed factor).

    Per layer: A = w1 and B = w2, a decomposed factor multiplied out (w2 = w2_a @ w2_b), and the multiplier of A: the
    loaders' scale alpha / r (r the decomposed factor's inner rank, w2's when both are; 1 when none is). With krona's
    own metadata the scale s is restored (lycoris.py divides A by it); without, the scale is 1, the architecture comes
    from a FLUX.1 transformer's layers, `ss_base_model_version`, the text-encoder prefixes or the cross-attention
    width, and the targets are inferred from the adapted modules. SGM-named UNet layers (kohya's SDXL files) are mapped
    to diffusers paths with `unet_config` (kohya_names.py); a fused FLUX.1 layer (kohya's `img_attn.qkv`, `linear1`)
    becomes the diffusers modules it stacks, A their blocks of w1's rows (flux_names.py).
    """
    names = NameReader(infos, metadata, source, unet_config, "LoKr")
    grouped = _grouped(infos, names, source)
    meta = json_metadata(metadata, METADATA_KEY, source)
    scale = 1.0
    if meta is not None:
        s = meta.get("scale", 1.0)
        if isinstance(s, (int, float)) and math.isfinite(s) and s != 0:
            scale = float(s)

    layers = _layers(grouped, infos, value, source)
    flux_names.check_components(layers, source, meta.get("architecture") if meta is not None else None)
    if meta is not None:
        architecture = meta.get("architecture")
        targets = meta.get("targets") or {}
        base_model, training = meta.get("base_model"), meta.get("training")
    else:
        prefixes = names.prefixes
        text_encoders = 2 if prefixes & {"lora_te1_", "lora_te2_"} else 1 if "lora_te_" in prefixes else None
        architecture = families.recognise_adapter(metadata, layers, text_encoders)
        targets = {component: _infer_targets(component, mods, architecture) for component, mods in layers.items()}
        base_model, training = None, None
    return Adapter(
        layers,
        scale=scale,
        base_model=base_model,
        architecture=architecture,
        targets=targets,
        training=training,
        key_format=names.key_format,
    )
