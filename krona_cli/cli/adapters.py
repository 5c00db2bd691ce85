"""Commands on adapter files that need no model (`plan`, `inspect`, `export`) and `merge`, which bakes them into a
base model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from ..choices import EXPORT_FORMATS, READ_FORMATS
from ..families import FAMILIES
from ..training.config import DROP_T5
from .app import TransformerFile, command, console, locked, renamed, split
from .render import inspect_table, plan_json, plan_table, plural


@command("merge")
def merge_cmd(
    adapter: Annotated[
        list[str],
        typer.Option("--adapter", metavar="FILE[:SCALE]", help="Adapter file, optionally with a scale (repeatable)."),
    ],
    output_dir: Annotated[
        Optional[Path], typer.Option(help="Folder for the merged diffusers pipeline (--format diffusers).")
    ] = None,
    output: Annotated[
        Optional[Path], typer.Option(help="The merged checkpoint file, NAME.safetensors (--format single-file).")
    ] = None,
    format: Annotated[
        str,
        typer.Option(
            "--format",
            help="diffusers (a pipeline folder) or single-file (one checkpoint in the original layout, for A1111, "
            "Forge and ComfyUI; for the transformer families the transformer alone in its makers' layout).",
            show_default="single-file with --output, else diffusers",
        ),
    ] = "",
    pretrained_model: Annotated[
        Optional[str],
        typer.Option(help="Base model: folder, .safetensors file or hub id.", show_default="the adapter's"),
    ] = None,
    transformer: TransformerFile = None,
    drop_t5: Annotated[bool, typer.Option("--drop-t5", help=DROP_T5 + " With --output alone.")] = False,
    multiplier: Annotated[float, typer.Option(help="Multiplies every adapter's scale.")] = 1.0,
    scale: Annotated[Optional[float], typer.Option(hidden=True, help="Old name of --multiplier.")] = None,
    dtype: Annotated[
        Optional[str],
        typer.Option(
            help="Saved weights: fp32, fp16 or bf16.", show_default="fp32 for a folder, fp16 for a single file"
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output folder or an existing file.")] = False,
) -> None:
    """Bake adapters into the base weights: a complete diffusers pipeline (plain diffusers loads it) or one
    single-file checkpoint (A1111, Forge and ComfyUI load it as a model)."""
    from ..inference.merge import merge, merge_destination, parse_adapter_spec
    from .quiet import no_loading_bars

    destination = merge_destination(output_dir, output, format or None)
    multiplier = renamed("--scale", "--multiplier", scale) or multiplier
    specs = [parse_adapter_spec(a) for a in adapter]
    no_loading_bars()
    with locked(destination.path, "krona merge", destination.flag):
        adapters = [(path, s * multiplier) for path, s in specs]
        summary = merge(
            adapters,
            destination,
            pretrained_model,
            dtype=dtype,
            overwrite=overwrite,
            transformer=transformer,
            drop_t5=drop_t5,
        )
    console.print(
        f"merged {plural(len(specs), 'adapter')} into {summary['layers_changed']} layers of {summary['base_model']} "
        f"({summary['architecture']}, {summary['dtype']}) -> [bold]{escape(summary['output'])}[/]"
    )


@command("export")
def export_cmd(
    adapter: Annotated[Path, typer.Option(help="The adapter to convert (any format krona reads).")],
    to: Annotated[str, typer.Option("--to", help="; ".join(f"{k}: {v}" for k, v in EXPORT_FORMATS.items()) + ".")],
    output: Annotated[Path, typer.Option(help="The file to write (.safetensors).")],
    rank: Annotated[Optional[int], typer.Option(help="LoRA rank (only with --to lora).")] = None,
    lora_layout: Annotated[
        Optional[str],
        typer.Option(
            help="With --to lora: kohya (lora_unet_* keys with lora_down, lora_up and alpha; FLUX.1's fused modules "
            "in Black Forest Labs' names) or peft (diffusers' unet.* or transformer.* lora_A and lora_B names).",
            show_default="kohya for SD and SDXL, peft for the transformer families (FLUX.1 also takes kohya)",
        ),
    ] = None,
    dtype: Annotated[str, typer.Option(help="Saved tensors: fp32, fp16 or bf16.")] = "fp32",
    report: Annotated[
        Optional[Path], typer.Option(help="With --to lora: write the per-layer approximation errors here as JSON.")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --output (and --report).")] = False,
) -> None:
    """Write an adapter in another format: LoKr for ComfyUI, A1111/Forge and kohya (lycoris, exact), or a LoRA for every
    client, tools that only load LoRA included (lora)."""
    from ..inference.export import export_adapter

    summary = export_adapter(
        adapter, to, output, rank=rank, dtype=dtype, report_path=report, lora_layout=lora_layout, overwrite=overwrite
    )
    console.print(f"wrote {plural(summary['layers'], 'layer')} as {to} -> [bold]{escape(summary['output'])}[/]")
    report = summary.get("report")
    if report:
        errors = [(f"{c}.{m}", v["error"]) for c, layers in report["layers"].items() for m, v in layers.items()]
        worst = max(errors, key=lambda e: e[1])
        capped = report["requested_rank"] > report["rank"]
        console.print(
            f"LoRA rank {report['rank']}"
            + (f" (--rank {report['requested_rank']} asked; ΔW has no higher rank, so this is exact)" if capped else "")
            + f": relative error of ΔW {report['error']:.4f} in total, "
            f"worst layer {worst[1]:.4f} ({worst[0]}); {report['parameters']:,} parameters"
        )


@command(
    "inspect",
    help="Show an adapter file's format, settings, layers, factors, parameter count, dtype, scale and base model.\n\n"
    f"Reads {', '.join(READ_FORMATS.values())}.",
)
def inspect_cmd(
    file: Annotated[Path, typer.Argument(help="An adapter .safetensors file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    from ..formats.description import describe  # the header alone: no torch

    info = describe(file)
    if as_json:
        console.print_json(json.dumps(info))
    else:
        console.print(inspect_table(file.name, info))


@command("plan")
def plan_cmd(
    arch: Annotated[
        str, typer.Option(help=f"Architecture: {', '.join(f.name for f in FAMILIES if f.layer_list)}.")
    ] = "sdxl",
    factors: Annotated[
        list[str],
        typer.Option("--factors", metavar="OxI", help="Factor settings to compare (repeatable or comma-separated)."),
    ] = ["64x4"],  # noqa: B006 (typer reads the default)
    targets: Annotated[str, typer.Option(help="attn, attn-ff, text, or a regular expression.")] = "attn",
    strict_factors: Annotated[bool, typer.Option(help="Error where factors do not divide a layer.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Adapter parameters and file sizes per block group, beside LoRA ranks 4, 8 and 16 (no weights needed)."""
    from ..inference.plan import plan

    settings = split(factors)
    groups = plan(arch, settings, targets, strict_factors)
    if as_json:
        console.print_json(plan_json(arch, targets, groups))
    else:
        console.print(plan_table(arch, targets, settings, groups))
