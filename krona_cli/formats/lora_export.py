"""LoRA files written from a Kronecker adapter by truncated SVD, for tools that load LoRA but not LoKr (read by
lora.py).

Export (`to_lora`, `save_lora`) writes an SD 1.x/2.x or SDXL adapter, by default, in kohya's layout, which ComfyUI,
A1111/Forge, kohya's scripts and diffusers' `load_lora_weights` all load: `<lora name>.lora_down.weight`,
`.lora_up.weight` and `.alpha` = their rank, the same in every layer (every loader's multiplier alpha / r is then
exactly 1), lora names with diffusers' UNet paths and `text_model.` text-encoder paths. `layout="peft"` writes
diffusers' own naming instead: `<component>.<module>.lora_A.weight` (down) and `.lora_B.weight` (up), no alpha
(multiplier 1), for diffusers and peft; some UIs skip those keys (ComfyUI: "lora key not loaded"). A FLUX.1 adapter
is written in diffusers' naming by default (`transformer.<module>.lora_A.weight`, which ComfyUI maps for FLUX and
FluxPipeline loads), or with `kohya` in kohya's FLUX names (flux_names.py). The family decides the names (naming.py).
Both carry krona's settings and the modelspec / kohya `ss_` keys UIs show (ui_metadata.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .. import __version__
from ..atomic import write_bytes_atomic
from ..errors import KronaError
from .lora_outline import EXPORT_FORMAT
from .naming import Naming, naming_for
from .native import krona_metadata
from .native_outline import COMPONENTS, METADATA_KEY
from .outline import LAYOUT_DIFFUSEKRONA, LAYOUT_STANDARD, Adapter
from .safetensors_file import safetensors_bytes
from .ui_metadata import describe_adapter, ui_metadata

__all__ = ["save_lora", "to_lora"]

EXPORT_FORMAT_VERSION = 1
# The key layouts `to_lora` writes: kohya's (every UI and diffusers load it) and diffusers' own peft naming. Which
# is the default, and what each names, is the adapter's family's (naming.py).
LAYOUTS = ("kohya", "peft")
# kohya's `ss_network_module` for a LoRA (sd-scripts' `networks.lora`).
NETWORK_MODULE = "networks.lora"


def to_lora(
    adapter: Adapter, rank: int, dtype: str = "fp32", layout: str | None = None, title: str | None = None
) -> tuple[dict[str, np.ndarray], dict[str, str], dict]:
    """The tensors and metadata of a LoRA file approximating `adapter`, and a report. The tensors are float32 numpy
    arrays holding the numbers a file in `dtype` stores (`save_lora` writes them in `dtype`, alphas in float32).

    Per layer ΔW is the adapter's update (layout standard: s·(A ⊗ B); layout diffusekrona: a row permutation of
    it, kron.diffusekrona_delta) and the LoRA is its truncated SVD (`KronLayer.low_rank`), split evenly:
    up = U_r·√S_r, down = √S_r·V_rᵀ, so that up @ down is the best rank-r approximation (Frobenius norm). The SVD
    comes exactly and cheaply from the SVDs of A and B (kron.kron_svd): the singular values of A ⊗ B are the
    products σ_i(A)·σ_j(B). Hence rank(A ⊗ B) = rank(A)·rank(B), and a
    LoRA of that rank is exact: with 64x4 factors (A 64×4, rank ≤ 4) and B of rank ≤ min(b_out, b_in), a rank
    4·rank(B) LoRA reproduces ΔW up to float rounding. The rank used per layer is min(rank, min(a_out, a_in)·
    min(b_out, b_in)) (never above min(d_out, d_in)): beyond it every singular value is zero, so a larger rank would
    only add zeros.

    Keys (`layout`, see the module docstring; None: the family's default, naming.py: `kohya` for SD 1.x/2.x and SDXL,
    `peft` for FLUX.1, whose kohya names are Black Forest Labs' fused modules, each part's LoRA stacked into one of
    rank their sum): `kohya` writes `<lora name>.lora_down.weight` (R × d_in), `.lora_up.weight` (d_out × R) and
    `.alpha` = R in
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
    naming = naming_for(adapter)
    layout = layout or naming.lora_layouts[0]
    scale = _export_scale(adapter, rank, layout, naming)
    written, report_layers, total_err2, total_norm2 = _low_rank_layers(adapter, scale, rank, dtype)
    tensors, stored_rank = _lora_tensors(written, layout, naming)
    params = sum(t.size for key, t in tensors.items() if not key.endswith(".alpha"))
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


def _export_scale(adapter: Adapter, rank: int, layout: str, naming: Naming) -> float:
    """The adapter's scale as a float, once `rank`, `layout` and the adapter are known to be exportable as LoRA."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise KronaError(f"LoRA rank {rank!r} must be a whole number of at least 1, e.g. 16")
    if layout not in naming.lora_layouts:
        raise KronaError(f"unknown LoRA key layout '{layout}'; use {' or '.join(naming.lora_layouts)}")
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
    adapter: Adapter, scale: float, rank: int, dtype: str
) -> tuple[list[tuple[str, str, np.ndarray, np.ndarray]], dict[str, dict[str, dict]], float, float]:
    """Every layer's truncated SVD (`KronLayer.low_rank`): [(component, module, up, down)], the report's layers
    ({component: {module: {"rank", "error"}}}), and Σ‖ΔW − ΔW_r‖² and Σ‖ΔW‖² over all layers."""
    written: list[tuple[str, str, np.ndarray, np.ndarray]] = []  # component, module, up, down
    report_layers: dict[str, dict[str, dict]] = {}
    total_err2 = total_norm2 = 0.0
    for component, mods in adapter.layers.items():
        if component not in COMPONENTS:
            raise KronaError(f"the adapter holds an unknown component '{component}'; the adapter is damaged")
        for module, layer in mods.items():
            up, down, err2, norm2 = layer.low_rank(scale, rank, dtype)
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
    written: list[tuple[str, str, np.ndarray, np.ndarray]], layout: str, naming: Naming
) -> tuple[dict[str, np.ndarray], int]:
    """The file's tensors under `layout`'s keys (the family's names, naming.py), and the rank R of the largest file
    layer (every kohya layer's rank)."""
    # kohya: every layer at the file's largest rank R (zero columns / rows added, which change nothing) with alpha R,
    # so alpha / r is exactly 1 everywhere and is the same number in every layer, which diffusers' loader needs: it
    # turns kohya alphas into peft's, and those of UNet attention layers under names that match no module, so that
    # every layer gets the most common alpha.
    named = naming.lora_layers(written, layout)
    stored_rank = max(down.shape[0] for _, _, down in named)
    tensors: dict[str, np.ndarray] = {}
    for name, up, down in named:
        if layout == "kohya":
            pad = stored_rank - down.shape[0]
            tensors[f"{name}.lora_down.weight"] = np.pad(down, ((0, pad), (0, 0)))
            tensors[f"{name}.lora_up.weight"] = np.pad(up, ((0, 0), (0, pad)))
            tensors[f"{name}.alpha"] = np.array(stored_rank, dtype=np.float32)
        else:
            tensors[f"{name}.lora_A.weight"] = down
            tensors[f"{name}.lora_B.weight"] = up
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
    path: str | Path,
    adapter: Adapter,
    rank: int,
    dtype: str = "fp32",
    layout: str | None = None,
    title: str | None = None,
) -> dict:
    """Write `adapter` as a LoRA .safetensors file of the given rank and key layout (kohya or peft; None: the
    family's default), atomically (see `to_lora`); dtype is fp32, fp16 or bf16; `title` defaults to the file's name.
    Returns the report, its errors measured on the factors as written."""
    tensors, metadata, report = to_lora(adapter, rank, dtype, layout, title or Path(path).stem)
    alphas = [key for key in tensors if key.endswith(".alpha")]
    write_bytes_atomic(path, safetensors_bytes(tensors, dtype, metadata, float32_keys=alphas))
    return report
