"""The LyCORIS / kohya LoKr file format, read and written, so that ComfyUI, A1111 and LyCORIS itself load krona's
adapters and krona reads LoKr files made by other trainers.

A LoKr file is one .safetensors with, per adapted module, `<lora name>.lokr_w1`, `.lokr_w2` and a 0-d `.alpha`,
where ΔW = kron(w1, w2) (torch.kron semantics, the same as krona's A ⊗ B). The lora name is a prefix plus the
module path with `.` replaced by `_`: `lora_unet_` for the UNet (diffusers module paths), `lora_te1_` / `lora_te2_`
for SDXL's text_encoder / text_encoder_2 and `lora_te_` for SD 1.x/2.x's text_encoder (transformers 4 paths,
`text_model.encoder.layers.0.self_attn.q_proj`): see kohya_names.py.

Either factor may instead be stored decomposed (`lokr_w1_a` @ `lokr_w1_b`, `lokr_w2_a` @ `lokr_w2_b`). ComfyUI and
A1111 then scale ΔW by alpha / r (r the inner rank of the decomposed factor) and by 1.0 when neither is decomposed,
whatever alpha says. krona always writes both factors full, so its scale s is baked into w1 (w1 = s·A, w2 = B).

Lora names, including the SGM-named UNet layers of kohya's SDXL files, are read by kohya_names.py. Written files carry
the modelspec and kohya `ss_` keys UIs show (ui_metadata.py) beside krona's own settings.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_save

from ..atomic import write_bytes_atomic
from ..dtypes import dtype_from_name
from ..errors import KronaError
from ..kron import TARGET_PRESETS
from .adapter import LAYOUT_STANDARD, Adapter, KronLayer
from .kohya_names import NameReader, check_text_prefixes, lora_name, two_text_encoders
from .native import METADATA_KEY, json_metadata, krona_metadata
from .ui_metadata import describe_adapter, guess_architecture, ui_metadata

__all__ = ["from_lycoris", "is_lycoris", "save_lycoris", "to_lycoris"]

# What kohya's sd-scripts writes for a LyCORIS network (`--network_module lycoris.kohya --network_args algo=lokr
# full_matrix=True`): network_args as JSON of the strings given on its command line.
NETWORK_MODULE = "lycoris.kohya"
NETWORK_ARGS = {"algo": "lokr", "full_matrix": "True"}

# The alpha written for every module. Both factors are full, so ComfyUI and A1111 ignore alpha (scale 1.0), and
# LyCORIS itself does too: `LokrModule` forces alpha = lora_dim when w1 and w2 are both full, so its scale is 1, and
# `make_module_from_state_dict` infers lora_dim = 1 for such a module, so 1 is exactly the alpha buffer LyCORIS
# would save for it (alpha·lora_dim/r_factor = 1). Its functional form (`functional.lokr.diff_weight(gamma=alpha)`)
# divides alpha by itself when nothing is decomposed, which is 1 for any alpha but 0 (0/0). A reader that naively
# divides alpha by a rank of 1 also gets 1. So alpha = 1 gives scale 1 under every convention in use.
ALPHA = 1.0
# kohya's `ss_network_dim` / `ss_network_alpha` for such a file: the lora_dim LyCORIS infers for it, and its alpha.
NETWORK_DIM = 1

# Tensor suffixes krona reads. Anything else (Tucker `lokr_t1`/`lokr_t2`, DoRA `dora_scale`, LoRA keys) is refused.
_FULL = ("lokr_w1", "lokr_w2")
_DECOMPOSED = ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b")
SUFFIXES = (*_FULL, *_DECOMPOSED, "alpha")
_SUPPORTED = (
    "LoKr on linear layers with `lokr_w1` or `lokr_w1_a`/`lokr_w1_b`, `lokr_w2` or `lokr_w2_a`/`lokr_w2_b`, and `alpha`"
)
_LOKR_KEY = re.compile(r"^lora_(unet|te|te1|te2)_[A-Za-z0-9_]+\.lokr_(w1|w2|w1_a|w1_b|w2_a|w2_b|t1|t2)$")


# --- detection ----------------------------------------------------------------------------------------------------


def is_lycoris(keys: Iterable[str]) -> bool:
    """True when the keys look like a kohya/LyCORIS LoKr file (`lora_unet_...lokr_w1` etc.)."""
    return any(_LOKR_KEY.match(k) for k in keys)


# --- writing ------------------------------------------------------------------------------------------------------


def to_lycoris(adapter: Adapter, title: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of the LoKr file that holds `adapter` (standard layout only).

    Per layer: `lokr_w1` = s·A, `lokr_w2` = B and `alpha` = 1, so every LoKr loader builds ΔW = s·(A ⊗ B).
    The metadata carries krona's own settings under `krona`, and the modelspec and kohya `ss_*` keys UIs show
    (ui_metadata.py; `title` is the modelspec title and kohya output name, by default "krona LoKr").
    """
    if adapter.layout != LAYOUT_STANDARD:
        raise KronaError(
            f"adapter layout '{adapter.layout}' cannot be exported as LyCORIS LoKr: only '{LAYOUT_STANDARD}' "
            "adapters (ΔW = s·A⊗B per layer) are plain Kronecker updates; retrain with the standard layout"
        )
    scale = float(adapter.scale)
    if scale == 0.0 or not math.isfinite(scale):
        raise KronaError(
            f"adapter scale {adapter.scale} cannot be exported: LoKr files hold s·A, so a zero or non-finite scale "
            "would lose A; export with a finite, non-zero --scale"
        )
    tensors: dict[str, torch.Tensor] = {}
    sdxl = two_text_encoders(adapter)
    for component, layers in adapter.layers.items():
        for module, layer in layers.items():
            name = lora_name(component, module, sdxl)
            # s·A in float32; multiplying by 1 or a power of two is exact, so reading back gives A bit for bit.
            tensors[f"{name}.lokr_w1"] = (layer.a.float() * scale).contiguous()
            tensors[f"{name}.lokr_w2"] = layer.b.float().clone().contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(ALPHA)
    network = {
        "module": NETWORK_MODULE,
        "dim": str(NETWORK_DIM),
        "alpha": f"{ALPHA:g}",
        "args": json.dumps(NETWORK_ARGS),
    }
    description = describe_adapter(adapter.base_model, adapter.training, "exported as LyCORIS LoKr (exact)")
    metadata = {
        METADATA_KEY: json.dumps(krona_metadata(adapter), sort_keys=True),
        **ui_metadata(
            "lycoris",
            title or "krona LoKr",
            adapter.architecture,
            adapter.base_model,
            adapter.training,
            description,
            network,
        ),
    }
    return tensors, metadata


def save_lycoris(path: str | Path, adapter: Adapter, dtype: str = "fp32", title: str | None = None) -> Path:
    """Write `adapter` as one LyCORIS LoKr .safetensors file, atomically; dtype is fp32, fp16 or bf16; `title`
    (modelspec title, kohya output name) defaults to the file's name."""
    torch_dtype = dtype_from_name(dtype)
    tensors, metadata = to_lycoris(adapter, title or Path(path).stem)
    data = safetensors_save({k: t.to(torch_dtype).contiguous() for k, t in tensors.items()}, metadata=metadata)
    return write_bytes_atomic(path, data)


# --- reading ------------------------------------------------------------------------------------------------------


def _split_key(key: str, names: NameReader, source: str) -> tuple[str, str, str]:
    """(component, module path, suffix) of a LoKr key; KronaError for anything krona does not read."""
    name, dot, suffix = key.partition(".")
    found = names.module(name, key) if dot else None
    if found is None:
        raise KronaError(
            f"'{source}' holds a tensor '{key}' that is not a kohya/LyCORIS key (lora_unet_..., lora_te_..., "
            f"lora_te1_..., lora_te2_...); krona reads {_SUPPORTED}"
        )
    if suffix not in SUFFIXES:
        raise KronaError(
            f"'{source}' holds '{key}', which krona does not read: it supports {_SUPPORTED} "
            "(no Tucker `lokr_t2`, DoRA `dora_scale`, conv layers or other algorithms)"
        )
    _prefix, component, module = found
    return component, module, suffix


def _matrix(t: torch.Tensor, key: str, source: str) -> torch.Tensor:
    if t.dim() != 2:
        raise KronaError(
            f"'{source}' holds '{key}' of shape {tuple(t.shape)}: krona reads LoKr factors of linear layers "
            "(2-D matrices), not conv-shaped or Tucker factors"
        )
    return t.to(torch.float32, copy=True)


def _product(parts: dict[str, torch.Tensor], side: str, where: str, source: str) -> tuple[torch.Tensor, int | None]:
    """The full factor `side` (w1 or w2) and the inner rank when it is stored decomposed."""
    full, a, b = parts.get(f"lokr_{side}"), parts.get(f"lokr_{side}_a"), parts.get(f"lokr_{side}_b")
    if full is not None and (a is not None or b is not None):
        raise KronaError(f"'{source}' stores both lokr_{side} and lokr_{side}_a/_b for '{where}'; the file is damaged")
    if full is not None:
        return _matrix(full, f"{where}.lokr_{side}", source), None
    if a is None or b is None:
        raise KronaError(
            f"'{source}' lacks lokr_{side} (or the pair lokr_{side}_a/lokr_{side}_b) for '{where}'; "
            "the file is damaged or incomplete"
        )
    a, b = _matrix(a, f"{where}.lokr_{side}_a", source), _matrix(b, f"{where}.lokr_{side}_b", source)
    if a.shape[1] != b.shape[0]:
        raise KronaError(
            f"'{source}' has lokr_{side}_a {tuple(a.shape)} and lokr_{side}_b {tuple(b.shape)} at '{where}', "
            "which do not multiply; the file is damaged"
        )
    return a @ b, b.shape[0]


def _infer_targets(component: str, modules: Iterable[str]) -> str:
    """A preset when it covers every adapted module, else a regular expression for exactly these modules."""
    modules = list(modules)
    presets = ("attn", "attn-ff") if component == "unet" else ("text",)
    for preset in presets:
        pattern = re.compile(TARGET_PRESETS[preset])
        if all(pattern.search(m) for m in modules):
            return preset
    return "^(?:" + "|".join(re.escape(m) for m in modules) + ")$"


def from_lycoris(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str, unet_config: Mapping | None = None
) -> Adapter:
    """The standard-layout Adapter held by a LyCORIS/kohya LoKr file's tensors and metadata.

    Each layer gives A = w1 and B = w2, a decomposed factor being multiplied out first (w2 = w2_a @ w2_b) with the
    loaders' scale alpha / r (r its inner rank; 1 when no factor is decomposed) folded into A. With krona's own
    metadata (a file that `to_lycoris` wrote) the scale s is restored and A = w1 / s: native -> LyCORIS -> native then
    gives back the same tensors bit for bit when s is 1 or any power of two, and equal up to float rounding (one
    multiplication and one division by s) otherwise. Without it the scale is 1, the architecture comes from
    `ss_base_model_version` or the text-encoder prefixes, and the targets are inferred from the adapted modules.
    SGM-named UNet layers (kohya's SDXL files) are mapped to diffusers paths with `unet_config` (kohya_names.py).
    Tensors are returned in float32 whatever the file's dtype.
    """
    names = NameReader(tensors, metadata, source, unet_config, "LoKr")
    grouped: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        component, module, suffix = _split_key(key, names, source)
        parts = grouped.setdefault((component, module), {})
        if suffix in parts:
            check_text_prefixes(names.prefixes, source)  # the likelier cause, named first
            raise KronaError(f"'{source}' holds two '{suffix}' tensors for '{component}.{module}'; the file is damaged")
        parts[suffix] = t
    if not grouped:
        raise KronaError(f"'{source}' holds no tensors; it is not a LoKr adapter")
    prefixes = names.prefixes
    check_text_prefixes(prefixes, source)

    meta = json_metadata(metadata, METADATA_KEY, source)
    scale = 1.0
    if meta is not None:
        s = meta.get("scale", 1.0)
        if isinstance(s, (int, float)) and math.isfinite(s) and s != 0:
            scale = float(s)

    layers: dict[str, dict[str, KronLayer]] = {}
    for (component, module), parts in grouped.items():
        where = f"{component}.{module}"
        w1, r1 = _product(parts, "w1", where, source)
        w2, r2 = _product(parts, "w2", where, source)
        # ComfyUI's and A1111's rule: alpha / r when a factor is decomposed (w2's rank when both are), else 1.
        rank = r2 if r2 is not None else r1
        alpha = parts.get("alpha")
        ui_scale = 1.0 if rank is None or alpha is None else float(alpha.float().reshape(-1)[0]) / rank
        a = w1 if ui_scale == 1.0 else w1 * ui_scale
        if scale != 1.0:
            a = a / scale
        layers.setdefault(component, {})[module] = KronLayer(a.contiguous(), w2.contiguous())

    if meta is not None:
        architecture = meta.get("architecture")
        targets = meta.get("targets") or {}
        base_model, training = meta.get("base_model"), meta.get("training")
    else:
        architecture = guess_architecture(
            metadata, bool(prefixes & {"lora_te1_", "lora_te2_"}), "lora_te_" in prefixes, layers
        )
        targets = {component: _infer_targets(component, mods) for component, mods in layers.items()}
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
