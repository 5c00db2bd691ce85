"""LoRA files: read (diffusers/peft, older diffusers, kohya) and written (a Kronecker adapter turned into a LoRA by
truncated SVD, for tools that load LoRA but not LoKr).

A LoRA layer holds down (r × d_in) and up (d_out × r) with ΔW = multiplier · up @ down. Key formats read:

* diffusers / peft, as `StableDiffusionXLPipeline.save_lora_weights` and diffusers' DreamBooth LoRA scripts write them
  today: `unet.<module>.lora_A.weight` (down) / `.lora_B.weight` (up), and the same under `text_encoder.` and
  `text_encoder_2.`. Text-encoder modules are spelled with or without `text_model.` (diffusers 0.42 under
  transformers 5 writes `text_encoder.encoder.layers.N...`). Keys without a component prefix
  (`UNet2DConditionModel.save_lora_adapter`) are the UNet's. The multiplier is 1 (diffusers' convention: alpha = r)
  unless the file carries diffusers' `lora_adapter_metadata` (the peft LoraConfig per component, e.g.
  `unet.lora_alpha`), which gives alpha / r per module (`alpha_pattern`, `rank_pattern`, alpha / √r with
  `use_rslora`), exactly as peft builds the layers when diffusers loads the file.
* older diffusers: `unet.<module>.lora.down.weight` / `.lora.up.weight`, with text encoders as
  `text_encoder.<module>.lora_linear_layer.down.weight` / `.up.weight`. The processor naming
  (`...processor.to_q_lora.down.weight`) is not read here: official DiffuseKronA checkpoints use it (official.py).
  A file holding only `lora_linear_layer` keys is not recognised by `is_lora` for the same reason.
* kohya: `<lora name>.lora_down.weight` / `.lora_up.weight` / `.alpha` (multiplier alpha / r, 1 without alpha), lora
  names as in kohya_names.py: `lora_unet_` + the diffusers module path with `_`, `lora_te1_` / `lora_te2_` for SDXL's
  text encoders and `lora_te_` for SD 1.x's, and the SGM-named UNet layers of kohya's SDXL files
  (`lora_unet_input_blocks_4_1_...`, key_format `kohya-sgm`).

Conv LoRA (4-D weights), DoRA (`dora_scale`, `lora_magnitude_vector`), biases, LoCon/LoHa/LoKr keys and anything else
are refused with a KronaError naming the key. Everything is read into float32.

Export (`to_lora`, `save_lora`) writes, by default, kohya's layout, which ComfyUI, A1111/Forge, kohya's scripts and
diffusers' `load_lora_weights` all load: `<lora name>.lora_down.weight`, `.lora_up.weight` and `.alpha` = their rank,
the same in every layer (every loader's multiplier alpha / r is then exactly 1), lora names with diffusers' UNet paths
and `text_model.` text-encoder paths. `layout="peft"` writes diffusers' own naming instead:
`<component>.<module>.lora_A.weight` (down) and `.lora_B.weight` (up), no alpha (multiplier 1), for diffusers and peft;
some UIs skip those keys (ComfyUI: "lora key not loaded"). Both carry krona's settings and the modelspec / kohya `ss_`
keys UIs show (ui_metadata.py).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_save

from .. import __version__
from ..atomic import write_bytes_atomic
from ..dtypes import dtype_from_name
from ..errors import KronaError
from .adapter import LAYOUT_DIFFUSEKRONA, LAYOUT_STANDARD, Adapter, LoraLayer
from .kohya_names import NameReader, check_text_prefixes, kohya_prefix, lora_name, two_text_encoders
from .native import COMPONENTS, METADATA_KEY, canonical_name, json_metadata, krona_metadata
from .ui_metadata import describe_adapter, guess_architecture, ui_metadata

__all__ = ["from_lora", "is_lora", "save_lora", "to_lora"]

EXPORT_FORMAT = "lora"
EXPORT_FORMAT_VERSION = 1
# The key layouts `to_lora` writes: kohya's (every UI and diffusers load it) and diffusers' own peft naming.
LAYOUTS = ("kohya", "peft")
# kohya's `ss_network_module` for a LoRA (sd-scripts' `networks.lora`).
NETWORK_MODULE = "networks.lora"
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
    r"^(?:(?P<component>unet|text_encoder|text_encoder_2)\.)?(?P<module>.+?)\."
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
    r"(?:^lora_(?:unet|te|te1|te2)_[A-Za-z0-9_]+\.lora_(?:down|up)\.weight$)"
    r"|(?:\.lora_[AB]\.weight$)"
    r"|(?:\.lora\.(?:down|up)\.weight$)"
)
_DORA = ("dora_scale", "lora_magnitude_vector")
_SUPPORTED = (
    "LoRA on linear layers: diffusers/peft `lora_A`/`lora_B` keys, older diffusers `lora.down`/`lora.up` keys, "
    "or kohya `lora_down`/`lora_up`/`alpha` keys"
)


# --- reading -------------------------------------------------------------------------------------------------------


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
        if not module.startswith(_UNET_ROOTS):
            raise KronaError(
                f"'{source}' holds '{key}' without a component prefix (unet., text_encoder., text_encoder_2.) and "
                "it is not a UNet module; krona cannot tell which model it adapts"
            )
        component = "unet"
    if suffix.startswith("lora_linear_layer") and component == "unet":
        raise _unknown(key, source)
    return component, canonical_name(component, module), part, key_format


def _matrix(t: torch.Tensor, key: str, source: str) -> torch.Tensor:
    if t.dim() == 4:
        raise KronaError(
            f"'{source}' holds '{key}' of shape {tuple(t.shape)}, a conv LoRA weight: krona reads LoRA on linear "
            "layers only (2-D down/up matrices)"
        )
    if t.dim() != 2 or 0 in t.shape or not t.is_floating_point():
        raise KronaError(
            f"'{source}' holds '{key}' of shape {tuple(t.shape)} and dtype {t.dtype}; a LoRA factor is a non-empty "
            "floating-point matrix. The file is damaged or of another kind"
        )
    return t.to(torch.float32, copy=True).contiguous()


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


def from_lora(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str, unet_config: Mapping | None = None
) -> Adapter:
    """The Adapter of LoraLayers held by a LoRA file's tensors and metadata (formats: see the module docstring).

    Multipliers: kohya alpha / r (1 without alpha); diffusers formats 1, or alpha / r from diffusers'
    `lora_adapter_metadata` where present. A file krona exported carries its base model and architecture in the
    `krona` metadata; otherwise the architecture comes from `ss_base_model_version`, a second text encoder, or the
    UNet's cross-attention width. SGM-named UNet layers (kohya's SDXL files) are mapped to diffusers paths with
    `unet_config` (kohya_names.py).
    """
    if not tensors:
        raise KronaError(f"'{source}' holds no tensors; it is not a LoRA adapter")
    names = NameReader(tensors, metadata, source, unet_config, "LoRA")
    parts: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    keys_of: dict[tuple[str, str], dict[str, str]] = {}
    formats: set[str] = set()
    for key, t in tensors.items():
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
                f"('{keys_of[(component, module)][part]}' and '{key}'); the file is damaged"
            )
        found[part] = t
        keys_of.setdefault((component, module), {})[part] = key
    if "kohya" in formats and len(formats) > 1:
        raise KronaError(
            f"'{source}' mixes kohya (lora_unet_...) and diffusers (unet....) LoRA keys; the file is damaged"
        )
    kohya_prefixes = names.prefixes
    check_text_prefixes(kohya_prefixes, source)

    peft_configs = json_metadata(metadata, DIFFUSERS_METADATA_KEY, source) if "kohya" not in formats else None
    layers: dict[str, dict[str, LoraLayer]] = {}
    for (component, module), found in sorted(parts.items()):
        where = f"{component}.{module}"
        have = keys_of[(component, module)]
        for needed in ("down", "up"):
            if needed not in found:
                raise KronaError(
                    f"'{source}': layer '{where}' has {', '.join(repr(k) for k in have.values())} but no {needed} "
                    "weight; each LoRA layer needs both. The file is incomplete"
                )
        down, up = _matrix(found["down"], have["down"], source), _matrix(found["up"], have["up"], source)
        if down.shape[0] != up.shape[1]:
            raise KronaError(
                f"'{source}': layer '{where}' has down {tuple(down.shape)} and up {tuple(up.shape)}, which do not "
                "multiply (down must be r × d_in, up d_out × r); the file is damaged"
            )
        rank = down.shape[0]
        multiplier = 1.0
        if "alpha" in found:
            alpha = found["alpha"]
            if alpha.numel() != 1 or alpha.dtype.is_complex:
                raise KronaError(f"'{source}': '{have['alpha']}' of shape {tuple(alpha.shape)} is not one number")
            value = float(alpha.float().reshape(-1)[0])
            if not math.isfinite(value):
                raise KronaError(f"'{source}': '{have['alpha']}' is {value}; the file is damaged")
            multiplier = value / rank
        elif peft_configs is not None:
            config = {k[len(component) + 1 :]: v for k, v in peft_configs.items() if k.startswith(f"{component}.")}
            if config:
                multiplier = _peft_multiplier(config, component, module, rank, source)
        layers.setdefault(component, {})[module] = LoraLayer(down, up, multiplier)

    meta = json_metadata(metadata, METADATA_KEY, source)
    targets, training = {}, None
    if meta is not None and meta.get("format") == EXPORT_FORMAT:  # krona's export: the source adapter's settings
        base_model, architecture = meta.get("base_model"), meta.get("architecture")
        origin = meta.get("source") if isinstance(meta.get("source"), dict) else {}
        targets, training = origin.get("targets") or {}, origin.get("training")
    else:
        sdxl_text_encoders = "text_encoder_2" in layers or "lora_te2_" in kohya_prefixes
        base_model, architecture = None, guess_architecture(metadata, sdxl_text_encoders, False, layers)
    if "kohya" in formats:
        key_format = names.key_format
    else:
        key_format = "diffusers" if "diffusers" in formats else "diffusers-old"
    return Adapter(layers, 1.0, base_model, architecture, targets, training, key_format, format_version=None)


# --- export by truncated SVD ---------------------------------------------------------------------------------------


def to_lora(
    adapter: Adapter, rank: int, dtype: str = "fp32", layout: str = "kohya", title: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str], dict]:
    """The tensors and metadata of a LoRA file approximating `adapter`, and a report.

    Per layer ΔW is the adapter's update (layout standard: s·(A ⊗ B); layout diffusekrona: a row permutation of
    it, kron.diffusekrona_delta) and the LoRA is its truncated SVD (`KronLayer.low_rank`), split evenly:
    up = U_r·√S_r, down = √S_r·V_rᵀ, so that up @ down is the best rank-r approximation (Frobenius norm). The SVD
    comes exactly and cheaply from the SVDs of A and B (kron.kron_svd): the singular values of A ⊗ B are the
    products σ_i(A)·σ_j(B). Hence rank(A ⊗ B) = rank(A)·rank(B), and a
    LoRA of that rank is exact: with 64x4 factors (A 64×4, rank ≤ 4) and B of rank ≤ min(b_out, b_in), a rank
    4·rank(B) LoRA reproduces ΔW up to float rounding. The rank used per layer is min(rank, min(a_out, a_in)·
    min(b_out, b_in)) (never above min(d_out, d_in)): beyond it every singular value is zero, so a larger rank would
    only add zeros.

    Keys (`layout`, see the module docstring): `kohya` (the default, which ComfyUI, A1111/Forge, kohya and diffusers
    all load) writes `<lora name>.lora_down.weight` (R × d_in), `.lora_up.weight` (d_out × R) and `.alpha` = R in
    float32 whatever `dtype`, R the largest rank of any layer, a layer of smaller rank getting zero rows and columns:
    every loader's multiplier alpha / R is then exactly 1 in every layer; `peft` writes diffusers'
    `<component>.<module>.lora_A.weight` (down, r × d_in) / `.lora_B.weight` (up, d_out × r), each layer at its own
    rank r, with no alpha (multiplier 1). Metadata: {"format": "pt"} as diffusers writes, krona's JSON under `krona`
    ({"format": "lora", key_format, rank, error, base model, architecture, and the source adapter's own metadata})
    and the modelspec and kohya `ss_` keys UIs show (ui_metadata.py; `title` is the modelspec title and kohya output
    name, by default "krona LoRA"); diffusers' loader reads only `lora_adapter_metadata`, so none of them confuses it.

    The report: {"rank" (the largest rank written: at most the update's own), "requested_rank", "dtype", "error",
    "layers": {component: {module: {"rank", "error"}}}, "parameters"}, with each
    layer's SVD rank r, the numbers stored in the file, and the relative error ‖ΔW − ΔW_r‖_F / ‖ΔW‖_F of the factors as
    written (after rounding to `dtype`) per layer (0 for a layer whose ΔW is 0) and in total, sqrt(Σ‖ΔW − ΔW_r‖²) /
    sqrt(Σ‖ΔW‖²).
    """
    scale = _export_scale(adapter, rank, layout)
    written, report_layers, total_err2, total_norm2 = _low_rank_layers(adapter, scale, rank, dtype_from_name(dtype))
    tensors, stored_rank = _lora_tensors(written, layout, two_text_encoders(adapter))
    params = sum(t.numel() for key, t in tensors.items() if not key.endswith(".alpha"))
    total = math.sqrt(total_err2 / total_norm2) if total_norm2 > 0 else 0.0
    report = {
        "rank": stored_rank,  # what the file holds: a rank above the update's own adds only zeros, so none is written
        "requested_rank": rank,
        "dtype": dtype,
        "error": total,
        "layers": report_layers,
        "parameters": params,
    }
    metadata = _lora_metadata(adapter, stored_rank, layout, total, stored_rank, title)
    return tensors, metadata, report


def _export_scale(adapter: Adapter, rank: int, layout: str) -> float:
    """The adapter's scale as a float, once `rank`, `layout` and the adapter are known to be exportable as LoRA."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise KronaError(f"LoRA rank {rank!r} must be a whole number of at least 1, e.g. 16")
    if layout not in LAYOUTS:
        raise KronaError(f"unknown LoRA key layout '{layout}'; use {' or '.join(LAYOUTS)}")
    if not adapter.kronecker:
        raise KronaError(
            f"adapter layout '{adapter.layout}' cannot be exported as LoRA; krona exports the "
            f"'{LAYOUT_STANDARD}' and '{LAYOUT_DIFFUSEKRONA}' layouts"
        )
    scale = float(adapter.scale)
    if not math.isfinite(scale):
        raise KronaError(f"adapter scale {adapter.scale} is not a finite number; export with a finite --scale")
    return scale


def _low_rank_layers(
    adapter: Adapter, scale: float, rank: int, torch_dtype: torch.dtype
) -> tuple[list[tuple[str, str, torch.Tensor, torch.Tensor]], dict[str, dict[str, dict]], float, float]:
    """Every layer's truncated SVD (`KronLayer.low_rank`): [(component, module, up, down)], the report's layers
    ({component: {module: {"rank", "error"}}}), and Σ‖ΔW − ΔW_r‖² and Σ‖ΔW‖² over all layers."""
    written: list[tuple[str, str, torch.Tensor, torch.Tensor]] = []  # component, module, up, down
    report_layers: dict[str, dict[str, dict]] = {}
    total_err2 = total_norm2 = 0.0
    for component, mods in adapter.layers.items():
        if component not in COMPONENTS:
            raise KronaError(f"the adapter holds an unknown component '{component}'; the adapter is damaged")
        for module, layer in mods.items():
            up, down, err2, norm2 = layer.low_rank(scale, rank, torch_dtype)
            written.append((component, module, up, down))
            report_layers.setdefault(component, {})[module] = {
                "rank": down.shape[0],
                "error": math.sqrt(err2 / norm2) if norm2 > 0 else 0.0,
            }
            total_err2 += err2
            total_norm2 += norm2
    if not written:
        raise KronaError("the adapter holds no layers; there is nothing to export")
    return written, report_layers, total_err2, total_norm2


def _lora_tensors(
    written: list[tuple[str, str, torch.Tensor, torch.Tensor]], layout: str, sdxl: bool
) -> tuple[dict[str, torch.Tensor], int]:
    """The file's tensors under `layout`'s keys, and the rank R of the largest layer (every kohya layer's rank)."""
    # kohya: every layer at the file's largest rank R (zero columns / rows added, which change nothing) with alpha R,
    # so alpha / r is exactly 1 everywhere and is the same number in every layer, which diffusers' loader needs: it
    # turns kohya alphas into peft's, and those of UNet attention layers under names that match no module, so that
    # every layer gets the most common alpha.
    stored_rank = max(down.shape[0] for _, _, _, down in written)
    tensors: dict[str, torch.Tensor] = {}
    for component, module, up, down in written:
        if layout == "kohya":
            name = lora_name(component, module, sdxl)
            pad = stored_rank - down.shape[0]
            tensors[f"{name}.lora_down.weight"] = torch.cat([down, down.new_zeros(pad, down.shape[1])]).contiguous()
            tensors[f"{name}.lora_up.weight"] = torch.cat([up, up.new_zeros(up.shape[0], pad)], dim=1).contiguous()
            tensors[f"{name}.alpha"] = torch.tensor(float(stored_rank))
        else:
            name = f"{component}.{canonical_name(component, module)}"
            tensors[f"{name}.lora_A.weight"] = down.contiguous()
            tensors[f"{name}.lora_B.weight"] = up.contiguous()
    return tensors, stored_rank


def _lora_metadata(
    adapter: Adapter, rank: int, layout: str, error: float, stored_rank: int, title: str | None
) -> dict[str, str]:
    """The file's metadata: {"format": "pt"}, krona's JSON under `krona`, and the modelspec / kohya `ss_` keys."""
    krona_meta = {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "krona_version": __version__,
        "key_format": "kohya" if layout == "kohya" else "diffusers",
        "method": "truncated SVD of the Kronecker update",
        "rank": rank,
        "relative_error": error,
        "base_model": adapter.base_model,
        "architecture": adapter.architecture,
        "source": krona_metadata(adapter),
    }
    exported_as = f"exported as a rank-{rank} LoRA by truncated SVD (relative error of ΔW {error:.3g})"
    network = None
    if layout == "kohya":
        network = {"module": NETWORK_MODULE, "dim": str(stored_rank), "alpha": str(stored_rank)}
    return {
        "format": "pt",
        METADATA_KEY: json.dumps(krona_meta, sort_keys=True),
        **ui_metadata(
            "lora",
            title or "krona LoRA",
            adapter.architecture,
            adapter.base_model,
            adapter.training,
            describe_adapter(adapter.base_model, adapter.training, exported_as),
            network,
        ),
    }


def save_lora(
    path: str | Path, adapter: Adapter, rank: int, dtype: str = "fp32", layout: str = "kohya", title: str | None = None
) -> dict:
    """Write `adapter` as a LoRA .safetensors file of the given rank and key layout (kohya or peft), atomically (see
    `to_lora`); dtype is fp32, fp16 or bf16; `title` defaults to the file's name. Returns the report, its errors
    measured on the factors as written."""
    tensors, metadata, report = to_lora(adapter, rank, dtype, layout, title or Path(path).stem)
    write_bytes_atomic(path, safetensors_save(tensors, metadata=metadata))
    return report
