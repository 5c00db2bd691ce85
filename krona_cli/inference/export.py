"""`krona export`: write an adapter in another file format (krona's own, LyCORIS/kohya LoKr, or LoRA by SVD, in
kohya's key layout by default)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from ..atomic import write_bytes_atomic
from ..choices import EXPORT_FORMATS
from ..errors import KronaError
from ..formats.adapter import numpy_array
from ..formats.lora_export import save_lora
from ..formats.lycoris import save_lycoris
from ..formats.native import save_adapter
from ..formats.read import load_adapter
from ..outputs import output_file

TARGETS = tuple(EXPORT_FORMATS)


def export_adapter(
    source: str | Path,
    to: str,
    output: str | Path,
    rank: int | None = None,
    dtype: str = "fp32",
    report_path: str | Path | None = None,
    lora_layout: str | None = None,
    unet_config: Mapping | None = None,
    overwrite: bool = False,
) -> dict:
    """Read `source` (any format krona reads) and write it to `output` as `to`; return a summary.

    `lora` approximates each layer's update by truncated SVD at `rank` and reports the relative error per layer and
    in total (also written to `report_path` as JSON when given); its keys follow `lora_layout`: `kohya` (the SD
    families' default, which ComfyUI, A1111/Forge, kohya and diffusers all load; FLUX.1's fused modules in Black Forest
    Labs' names) or `peft` (diffusers' own naming; FLUX.1's default). The other targets are
    exact. Everything is read, computed and written with numpy, without torch. An existing output is replaced only
    with `overwrite`. Every output carries the modelspec and kohya `ss_` keys UIs show, titled with the output's file
    name.
    `unet_config` numbers the SGM-named UNet layers of a kohya SDXL source (see formats/kohya_names.py).
    """
    if to not in TARGETS:
        raise KronaError(f"unknown export format '{to}'; use one of {', '.join(TARGETS)}")
    if Path(output).resolve() == Path(source).resolve():
        raise KronaError("the output would overwrite the input adapter; choose another --output")
    output_file(output, "--output", ".safetensors", overwrite)
    if report_path is not None:
        output_file(report_path, "--report", ".json", overwrite)
    if to != "lora" and lora_layout is not None:
        raise KronaError("--lora-layout only applies to --to lora")
    adapter = load_adapter(source, unet_config, numpy_array)  # numpy throughout: no torch
    if not adapter.kronecker:
        raise KronaError(f"'{source}' is not a Kronecker adapter; only Kronecker adapters can be exported")
    summary = {"source": str(source), "format": to, "output": str(output), "layers": sum(adapter.num_layers().values())}
    if to == "lora":
        if rank is None:
            raise KronaError("exporting to LoRA needs --rank (e.g. --rank 16)")
        summary["report"] = save_lora(output, adapter, rank, dtype=dtype, layout=lora_layout)
        if report_path is not None:
            write_bytes_atomic(report_path, json.dumps(summary["report"], indent=2).encode())
    elif rank is not None or report_path is not None:
        raise KronaError("--rank and --report only apply to --to lora; the other formats are exact")
    elif to == "lycoris":
        save_lycoris(output, adapter, dtype=dtype)
    else:
        save_adapter(output, adapter, dtype=dtype)
    return summary
