"""`krona export`: write an adapter in another file format (krona's own, LyCORIS/kohya LoKr, or LoRA by SVD)."""

from __future__ import annotations

import json
from pathlib import Path

from .atomic import write_bytes_atomic
from .errors import KronaError
from .formats import Adapter, load_adapter, save_adapter, save_lora, save_lycoris

TARGETS = ("native", "lycoris", "lora")


def export_adapter(
    source: str | Path,
    to: str,
    output: str | Path,
    rank: int | None = None,
    dtype: str = "fp32",
    report_path: str | Path | None = None,
) -> dict:
    """Read `source` (any format krona reads) and write it to `output` as `to`; return a summary.

    `lora` approximates each layer's update by truncated SVD at `rank` and reports the relative error per layer and
    in total (also written to `report_path` as JSON when given); the other targets are exact.
    """
    if to not in TARGETS:
        raise KronaError(f"unknown export format '{to}'; use one of {', '.join(TARGETS)}")
    if Path(output).resolve() == Path(source).resolve():
        raise KronaError("the output would overwrite the input adapter; choose another --output")
    adapter = load_adapter(source)
    if not isinstance(adapter, Adapter):
        raise KronaError(f"'{source}' is not a Kronecker adapter; only Kronecker adapters can be exported")
    summary = {"source": str(source), "format": to, "output": str(output), "layers": sum(adapter.num_layers().values())}
    if to == "lora":
        if rank is None:
            raise KronaError("exporting to LoRA needs --rank (e.g. --rank 16)")
        summary["report"] = save_lora(output, adapter, rank, dtype=dtype)
        if report_path is not None:
            write_bytes_atomic(report_path, json.dumps(summary["report"], indent=2).encode())
    elif rank is not None or report_path is not None:
        raise KronaError("--rank and --report only apply to --to lora; the other formats are exact")
    elif to == "lycoris":
        save_lycoris(output, adapter, dtype=dtype)
    else:
        save_adapter(output, adapter, dtype=dtype)
    return summary
