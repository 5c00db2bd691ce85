"""The `krona` command line: parse, call one library function, print. Only this module prints."""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import os
import shlex
import sys
import traceback
import warnings
from pathlib import Path
from typing import Annotated, Optional

# The libraries' own chatter (progress bars, info and advisory logs) stays out of krona's output however krona was
# installed; set before any of them is imported. A user's own setting wins.
for _name, _value in (
    ("TRANSFORMERS_VERBOSITY", "error"),
    ("DIFFUSERS_VERBOSITY", "error"),
    ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
    ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
    ("HF_HUB_DISABLE_TELEMETRY", "1"),
    ("TOKENIZERS_PARALLELISM", "false"),
):
    os.environ.setdefault(_name, _value)

import typer  # noqa: E402
import typer.core  # noqa: E402
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__
from .errors import KronaError
from .training.config import with_train_options

# bitsandbytes warns on import that an optional CPU 4-bit kernel package is missing; krona does not use it.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# transformers says on every model load that it falls back to PIL image processors without torchvision: krona uses PIL.
logging.getLogger("transformers.utils.import_utils").setLevel(logging.ERROR)


class _Command(typer.core.TyperCommand):
    """Plain help that reads at 80 columns (long flag names on their own line, never cut), options grouped under
    their panels, and every default written one way: `[default: X]`."""

    def format_options(self, ctx, formatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                title = getattr(param, "rich_help_panel", None) or (
                    "Arguments" if param.param_type_name == "argument" else "Options"
                )
                sections.setdefault(title, []).append((record[0], _help_with_default(param)))
        for title, rows in sections.items():
            with formatter.section(title):
                formatter.write_dl(rows)


def _help_with_default(param) -> str:
    """A parameter's help with its default appended as `[default: X]` (switches: on/off; unset values: what they
    mean, from show_default)."""
    text = (param.help or "").strip()
    shown = param.show_default
    if isinstance(shown, str):
        default = shown
    elif (
        shown is False
        or param.default in (None, [], "")
        or getattr(param, "is_flag", False)
        and param.default is False
        and not param.secondary_opts
    ):
        return text
    elif isinstance(param.default, bool):
        default = "on" if param.default else "off"
    else:
        default = ",".join(map(str, param.default)) if isinstance(param.default, (list, tuple)) else str(param.default)
    return f"{text}  [default: {default}]"


app = typer.Typer(
    name="krona",
    help="Personalise SDXL and SD 1.x/2.x with Kronecker-product adapters (DiffuseKronA), DreamBooth-style.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    cls=None,
)


def command(name: str):
    """`@app.command(name)` with krona's help format."""
    return app.command(name, cls=_Command)


# Piped output (files, CI logs) has no width to respect: give tables room instead of rich's 80-column default.
_PIPE_WIDTH = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 160
console = Console(width=_PIPE_WIDTH)
err_console = Console(stderr=True, width=_PIPE_WIDTH)
_state = {"debug": False}

_LIBRARIES = r"(diffusers|transformers|huggingface_hub|accelerate|torch|peft|bitsandbytes|lycoris|safetensors)(\.|$)"
EXIT_OK, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 130  # bad input exits with KronaError.exit_code, 2
# The base class of typer's usage errors (typer ships its own copy of click, whose classes it does not export).
_UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


def _version(value: bool) -> None:
    if value:
        console.print(f"krona {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show the Python traceback of internal errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    _state["debug"] = debug


def _quiet_model_loading() -> None:
    """diffusers' and transformers' own loading bars would interleave with krona's output."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def _renamed(old: str, new: str, value):
    """A flag renamed for one meaning per name across commands: the old spelling still works, with a line saying so."""
    if value is not None:
        err_console.print(
            f"[yellow]warning:[/] {old} is now {new} (the old name goes in the next release)", highlight=False
        )
    return value


@contextlib.contextmanager
def _locked(output: Path, command: str, flag: str):
    """Hold the output's lock for a command (one command per output); say so when a dead run's lock is taken over."""
    from .lock import OutputLock

    with OutputLock(output, command, flag) as lock:
        if lock.took_over:
            err_console.print(
                f"[yellow]warning:[/] took over the lock of `{lock.took_over.get('command')}` (pid "
                f"{lock.took_over.get('pid')}, since {lock.took_over.get('started')}), which is gone",
                highlight=False,
            )
        yield


def _split(values: list[str]) -> list[str]:
    """Repeatable options also take comma-separated lists: --factors 64x4,8x64."""
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


@command("make-tiny")
def make_tiny_cmd(
    directory: Annotated[
        Path, typer.Argument(help="Folder to write the pipeline to (created, or replaced with --overwrite).")
    ],
    arch: Annotated[str, typer.Option(help="Architecture: sdxl or sd15.")] = "sdxl",
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace a tiny pipeline written here before.")] = False,
) -> None:
    """Build a tiny random-weight SDXL or SD 1.5 pipeline (for tests and demos; no download)."""
    from .pipeline.tiny import make_tiny

    with _locked(directory, "krona make-tiny", "DIRECTORY"):
        path = make_tiny(directory, arch=arch, seed=seed, overwrite=overwrite)
    console.print(f"tiny {arch} pipeline written to [bold]{path}[/]")


@command("make-toy")
def make_toy_cmd(
    directory: Annotated[
        Path, typer.Argument(help="Folder to write the pipeline to (created, or replaced with --overwrite).")
    ],
    arch: Annotated[str, typer.Option(help="Architecture: sdxl or sd15.")] = "sdxl",
    overwrite: Annotated[bool, typer.Option(help="Replace a toy pipeline written here before.")] = False,
) -> None:
    """Write a small SDXL or SD 1.5 pipeline pretrained on the toy world (coloured shapes on plain backgrounds; a few
    MB, no download): a base that draws what it is asked, to see personalisation work on a CPU."""
    from .pipeline.toy import make_toy

    with _locked(directory, "krona make-toy", "DIRECTORY"):
        path = make_toy(directory, arch=arch, overwrite=overwrite)
    console.print(f"toy {arch} pipeline written to [bold]{path}[/]")


@command("plan")
def plan_cmd(
    arch: Annotated[str, typer.Option(help="Architecture: sdxl or sd15.")] = "sdxl",
    factors: Annotated[
        list[str],
        typer.Option("--factors", metavar="OxI", help="Factor settings to compare (repeatable or comma-separated)."),
    ] = ["64x4"],  # noqa: B006 (typer reads the default)
    targets: Annotated[str, typer.Option(help="attn, attn-ff, text, or a regular expression.")] = "attn",
    strict_factors: Annotated[bool, typer.Option(help="Error where factors do not divide a layer.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Adapter parameters and file sizes per block group, beside LoRA ranks 4, 8 and 16 (no weights needed)."""
    from .inference.plan import FP16_BYTES, FP32_BYTES, LORA_RANKS, file_size, plan

    settings = _split(factors)
    groups = plan(arch, settings, targets, strict_factors)
    if as_json:
        out = {
            name: {
                "layers": g.layers,
                "kron": g.kron,
                "lora": {f"r{r}": v for r, v in g.lora.items()},
                "factors_used": {k: sorted(v) for k, v in g.used.items()},
            }
            for name, g in groups.items()
        }
        console.print_json(json.dumps({"arch": arch, "targets": targets, "groups": out}))
        return
    table = Table(title=f"krona plan: {arch}, targets {targets} (parameters; file sizes in MiB)", box=box.SIMPLE_HEAD)
    table.add_column("block group", no_wrap=True)
    table.add_column("layers", justify="right", no_wrap=True)
    total = groups["total"]
    for s in settings:  # labelled with what is really used where the request does not divide every layer
        used = sorted(total.used[s])
        label = s if used == [s] else f"{s}, fitted:\n" + ", ".join(used[:3]) + (", …" if len(used) > 3 else "")
        table.add_column(f"kron\n{label}", justify="right", style="bold green", no_wrap=True)
    for r in LORA_RANKS:
        table.add_column(f"LoRA\nr{r}", justify="right", no_wrap=True)
    for name, g in groups.items():
        cells = [f"{g.kron[s]:,}" for s in settings] + [f"{g.lora[r]:,}" for r in LORA_RANKS]
        if name == "total":
            table.add_section()
            table.add_row("[bold]total[/]", f"{g.layers:,}", *cells)
        else:
            table.add_row(name, f"{g.layers:,}", *cells)
    for label, nbytes in (("fp32 file", FP32_BYTES), ("fp16 file", FP16_BYTES)):
        sizes = [total.kron[s] for s in settings] + [total.lora[r] for r in LORA_RANKS]
        table.add_row(label, "", *[f"{file_size(p, nbytes) / 2**20:.2f}M" for p in sizes])
    console.print(table)


@command("presets")
def presets_cmd(
    name: Annotated[Optional[str], typer.Argument(help="A preset to show in full.")] = None,
) -> None:
    """List the presets of `krona train --config NAME`, or show one (its YAML, ready to copy and edit)."""
    from .architectures import CONFIGS_DIR
    from .training.config import CONFIG_PRESETS

    if name is not None:
        if name not in CONFIG_PRESETS:
            raise KronaError(f"no preset '{name}'; the presets are {', '.join(CONFIG_PRESETS)}")
        console.print((CONFIGS_DIR / f"{name}.yaml").read_text(), end="", highlight=False, markup=False)
        return
    for preset in CONFIG_PRESETS:
        first = (CONFIGS_DIR / f"{preset}.yaml").read_text().splitlines()[0].lstrip("# ")
        console.print(f"[bold]{preset:6}[/] {escape(first)}", highlight=False)
    console.print("krona presets NAME shows one; krona train --config NAME uses it (flags override it)")


@command("inspect")
def inspect_cmd(
    file: Annotated[Path, typer.Argument(help="An adapter .safetensors file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show an adapter file's format, settings, layers, factors, parameter count, dtype, scale and base model.

    Reads krona's own files, LyCORIS/kohya LoKr files and official DiffuseKronA checkpoints."""
    from .formats import describe

    info = describe(file)
    if as_json:
        console.print_json(json.dumps(info))
        return
    table = Table(title=f"adapter {file.name}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    version = f" v{info['format_version']}" if info["format"] == "native" else ""
    table.add_row("format", f"{info['format']}{version} ({info['layout']} layout)")
    table.add_row("key names", str(info["key_format"]))
    table.add_row("base model", str(info["base_model"]))
    table.add_row("architecture", str(info["architecture"]))
    for component, n in info["layers"].items():
        factors = ", ".join(f"{f} × {c}" for f, c in info["factors"][component].items())
        target = info["targets"].get(component, "")
        table.add_row(f"{component} layers", f"{n} ({factors})" + (f", targets {target}" if target else ""))
    table.add_row("parameters", f"{info['parameters']:,}")
    table.add_row("dtype", ", ".join(info["dtype"]))
    table.add_row("scale", f"{info['scale']:g}")
    table.add_row("size", f"{info['size_bytes'] / 2**20:.2f} MiB")
    table.add_row("sha256", info["sha256"][:16])
    if info["training"]:
        table.add_row("training", json.dumps(info["training"], sort_keys=True))
    console.print(table)


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
            help="diffusers (a pipeline folder) or single-file (one checkpoint in the "
            "original layout, for A1111, Forge and ComfyUI).",
            show_default="single-file with --output, else diffusers",
        ),
    ] = "",
    pretrained_model: Annotated[
        Optional[str],
        typer.Option(help="Base model: folder, .safetensors file or hub id.", show_default="the adapter's"),
    ] = None,
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
    from .inference.merge import merge_to_file, merge_to_folder, parse_adapter_spec

    format = format or ("single-file" if output is not None else "diffusers")
    if format not in ("diffusers", "single-file"):
        raise KronaError(f"--format must be diffusers or single-file; got '{format}'")
    destination = output_dir if format == "diffusers" else output
    if destination is None or (output_dir is not None and output is not None):
        raise KronaError(
            "give --output-dir FOLDER for a diffusers pipeline or --output NAME.safetensors for a "
            "single-file checkpoint (one of them)"
        )
    if format == "diffusers" and output is not None or format == "single-file" and output_dir is not None:
        raise KronaError(f"--format {format} writes to --{'output-dir' if format == 'diffusers' else 'output'}")
    multiplier = _renamed("--scale", "--multiplier", scale) or multiplier
    specs = [parse_adapter_spec(a) for a in adapter]
    _quiet_model_loading()
    save = merge_to_folder if format == "diffusers" else merge_to_file
    with _locked(destination, "krona merge", "--output-dir" if format == "diffusers" else "--output"):
        summary = save(
            [(path, s * multiplier) for path, s in specs],
            destination,
            pretrained_model,
            dtype=dtype or ("fp32" if format == "diffusers" else "fp16"),
            overwrite=overwrite,
        )
    console.print(
        f"merged {len(specs)} adapter(s) into {summary['layers_changed']} layers of {summary['base_model']} "
        f"({summary['architecture']}, {summary['dtype']}) -> [bold]{escape(summary['output'])}[/]"
    )


@command("sample")
def sample_cmd(
    adapter: Annotated[
        list[str],
        typer.Option(
            "--adapter",
            metavar="FILE[:SCALE]",
            help="Adapter file, optionally with a scale (repeatable; SCALE 0 gives the base model's images). "
            "None: the base model alone (needs --pretrained-model).",
        ),
    ] = [],  # noqa: B006 (typer reads the default)
    prompt: Annotated[list[str], typer.Option("--prompt", metavar="TEXT", help="A prompt (repeatable).")] = [],  # noqa: B006
    prompts_file: Annotated[Optional[Path], typer.Option(help="A text file with one prompt per line.")] = None,
    pretrained_model: Annotated[
        Optional[str],
        typer.Option(help="Base model: folder, .safetensors file or hub id.", show_default="the adapter's"),
    ] = None,
    negative_prompt: Annotated[str, typer.Option(help="Negative prompt for every image.")] = "",
    num_images: Annotated[int, typer.Option("--num-images", "-n", help="Images per prompt.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of each prompt's first image; image i uses SEED + i.")] = 0,
    sample_steps: Annotated[int, typer.Option(help="Denoising steps.")] = 30,
    steps: Annotated[Optional[int], typer.Option(hidden=True, help="Old name of --sample-steps.")] = None,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = 7.0,
    scheduler: Annotated[str, typer.Option(help="euler, euler-a, dpm++ or ddim.")] = "euler",
    width: Annotated[Optional[int], typer.Option(help="Image width.", show_default="the model's native size")] = None,
    height: Annotated[Optional[int], typer.Option(help="Image height.", show_default="the model's native size")] = None,
    batch_size: Annotated[
        int, typer.Option(help="Images per pipeline call (the images stay the same, up to float rounding).")
    ] = 1,
    output_dir: Annotated[Path, typer.Option(help="Folder for the images and the grid.")] = Path("samples"),
    overwrite: Annotated[bool, typer.Option(help="Replace the images of an earlier run in --output-dir.")] = False,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:N.", show_default="cuda when present")] = None,
    dtype: Annotated[
        Optional[str], typer.Option(help="Weights: fp32, fp16 or bf16.", show_default="fp16 on GPUs, fp32 on the CPU")
    ] = None,
) -> None:
    """Sample images with adapters merged into the base weights (costs what the base model costs).

    Writes every image and one grid (rows: prompts, columns: seeds) as PNG files whose metadata hold the prompt,
    seed, steps, guidance, scheduler, size, base model and each adapter's file, hash and scale."""
    import torch

    from .inference.merge import parse_adapter_spec
    from .inference.sampling import SampleConfig, generate, load_prompts, prepare_pipeline, sample_folder

    config = SampleConfig(
        num_images=num_images,
        seed=seed,
        steps=_renamed("--steps", "--sample-steps", steps) or sample_steps,
        guidance=guidance,
        scheduler=scheduler,
        negative_prompt=negative_prompt,
        width=width,
        height=height,
        batch_size=batch_size,
    ).validate()
    prompts = load_prompts(prompt, prompts_file)
    specs = [parse_adapter_spec(a) for a in adapter]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("fp32" if device == "cpu" else "fp16")
    with _locked(output_dir, "krona sample", "--output-dir"):
        earlier = sample_folder(output_dir, overwrite)
        _quiet_model_loading()
        with console.status("loading the base model and merging adapters"):
            pipe, info = prepare_pipeline(specs, pretrained_model, device, dtype)
        for old in earlier:  # --overwrite: no image of an earlier run stays beside the new ones
            old.unlink()
        with _sampling_progress(config, len(prompts)) as progress:
            result = generate(pipe, config, prompts, info, output_dir, progress=progress)
    adapters = ", ".join(f"{Path(a.file).name}:{a.scale:g} ({a.sha256[:12]})" for a in info.adapters) or "none"
    console.print(
        f"{len(result.images)} images ({result.width}x{result.height}, {config.steps} steps, {config.scheduler}, "
        f"guidance {config.guidance:g}, seeds {result.seeds[0]}..{result.seeds[-1]}) from {info.base_model} "
        f"with adapters {adapters} -> [bold]{Path(output_dir)}[/]; grid: [bold]{result.grid}[/]"
    )


@contextlib.contextmanager
def _sampling_progress(config, num_prompts: int):
    """A progress bar over the images of a `krona sample` run; yields the callback `generate` reports to."""
    from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.text import Text

    from .inference.sampling import ceil_batches

    calls, total = ceil_batches(config, num_prompts), num_prompts * config.num_images

    class _Rate(ProgressColumn):  # denoising steps of one pipeline call per second, as diffusers counts "it"
        def render(self, task) -> Text:
            if not task.speed:
                return Text("-- it/s")
            return Text(f"{task.speed * config.steps * calls / total:.2f} it/s")

    columns = (
        TextColumn("sampling"),
        BarColumn(),
        TextColumn("{task.fields[done]}/{task.total:.0f} images"),
        _Rate(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("sampling", total=total, done=0)
        yield lambda done, _total: bar.update(task, completed=done, done=int(done))


@command("export")
def export_cmd(
    adapter: Annotated[Path, typer.Option(help="The adapter to convert (any format krona reads).")],
    to: Annotated[
        str,
        typer.Option(
            "--to",
            help="native, lycoris (LyCORIS/kohya LoKr, exact) or lora (truncated SVD, "
            "kohya layout: ComfyUI, A1111/Forge, kohya and diffusers all load it).",
        ),
    ],
    output: Annotated[Path, typer.Option(help="The file to write (.safetensors).")],
    rank: Annotated[Optional[int], typer.Option(help="LoRA rank (only with --to lora).")] = None,
    lora_layout: Annotated[
        Optional[str],
        typer.Option(
            help="With --to lora: kohya (lora_unet_* keys with lora_down, lora_up and alpha) or "
            "peft (diffusers' unet.*.lora_A and lora_B names).",
            show_default="kohya",
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
    from .inference.export import export_adapter

    summary = export_adapter(
        adapter, to, output, rank=rank, dtype=dtype, report_path=report, lora_layout=lora_layout, overwrite=overwrite
    )
    console.print(f"wrote {summary['layers']} layers as {to} -> [bold]{summary['output']}[/]")
    report = summary.get("report")
    if report:
        errors = [(f"{c}.{m}", v["error"]) for c, layers in report["layers"].items() for m, v in layers.items()]
        worst = max(errors, key=lambda e: e[1])
        console.print(
            f"LoRA rank {report['rank']}: relative error of ΔW {report['error']:.4f} in total, "
            f"worst layer {worst[1]:.4f} ({worst[0]}); {report['parameters']:,} parameters"
        )


@command("eval")
def eval_cmd(
    images: Annotated[
        Path, typer.Option(help="Folder of generated images (PNG prompts are read from their metadata).")
    ],
    reference: Annotated[
        Optional[Path],
        typer.Option(help="Folder of the subject's real photos (the instance images); --scorer clip needs it."),
    ] = None,
    scorer: Annotated[
        str,
        typer.Option(
            help="clip: CLIP-I, CLIP-T and DINO (downloaded scorer models); toy: the toy world's subject fidelity, "
            "prompt fidelity and class scores (no model; for pictures of krona make-toy pipelines)."
        ),
    ] = "clip",
    prompt: Annotated[
        Optional[str], typer.Option(help="The prompt of every generated image (else their metadata).")
    ] = None,
    prompts_file: Annotated[
        Optional[Path], typer.Option(help="One prompt per generated image, in file-name order.")
    ] = None,
    output: Annotated[Path, typer.Option(help="Write the metrics here as JSON.")] = Path("metrics.json"),
    identifier: Annotated[
        str, typer.Option(help="The subject's identifier token, removed from prompts for CLIP-T.")
    ] = "sks",
    clip_model: Annotated[
        str, typer.Option(help="CLIP model: hub id or local folder.")
    ] = "openai/clip-vit-base-patch32",
    dino_model: Annotated[str, typer.Option(help="DINO model: hub id or local folder.")] = "facebook/dino-vits16",
    batch_size: Annotated[int, typer.Option(help="Images per model call.")] = 16,
) -> None:
    """Score generated images: CLIP-I and DINO (similarity to the subject's photos) and CLIP-T (to the prompt), or
    with --scorer toy the toy world's scores, read from the pictures themselves."""
    from .evaluation.compare import METRICS
    from .images import scan_images

    if scorer not in METRICS:
        raise KronaError(f"--scorer must be one of {', '.join(METRICS)}, not {scorer!r}")
    if scorer == "clip" and reference is None:
        raise KronaError("--scorer clip needs --reference, the folder of the subject's real photos")
    generated, _ = scan_images(images, "images")
    photos = scan_images(reference, "reference")[0] if reference is not None else []
    if scorer == "clip":  # the scorer models are found (a folder, or a hub id cached or reachable) before any loads
        from .pipeline.hub import model_source

        model_source(clip_model, "--clip-model", "CLIP")
        model_source(dino_model, "--dino-model", "DINO")
    from .atomic import write_bytes_atomic
    from .inference.sampling import load_prompts
    from .scoring.metrics import is_sample_grid, read_prompt

    generated = [p for p in generated if not is_sample_grid(p)]  # krona sample's grid.png repeats its images
    if not generated:
        raise KronaError(f"--images '{images}' holds only sample grids; give the folder of the single images")

    prompts = None
    if prompt is not None or prompts_file is not None:
        prompts = load_prompts([prompt] if prompt else [], prompts_file)
        if len(prompts) not in (1, len(generated)):
            raise KronaError(f"{len(prompts)} prompts for {len(generated)} images; give one prompt, or one per image")
    settings = {"images_dir": str(images), "reference_dir": None if reference is None else str(reference)}
    if scorer == "toy":
        from .evaluation.toy import score_files

        if prompts is not None and len(prompts) == 1:
            prompts = prompts * len(generated)
        metrics = score_files(generated, prompts or [read_prompt(p) for p in generated], identifier)
        result = metrics.to_dict() | settings | {"scorer": "toy", "identifier": identifier}
        title = f"{metrics.subject_images} pictures of the subject, {metrics.class_images} of its class"
    else:
        metrics = _clip_scores(generated, photos, prompts, identifier, clip_model, dino_model, batch_size)
        result = metrics.to_dict() | settings | {"clip_model": clip_model, "dino_model": dino_model}
        result["identifier"] = identifier
        title = f"{metrics.generated} images against {metrics.reference} reference photos"
    columns = {name: getattr(metrics, key) for key, name in METRICS[scorer]}
    write_bytes_atomic(output, json.dumps(result, indent=2).encode())
    table = Table(title=title, box=box.SIMPLE_HEAD)
    for column in columns:
        table.add_column(column, justify="right")
    table.add_row(*("-" if v is None else f"{v:.4f}" for v in columns.values()))
    console.print(table)
    console.print(f"metrics -> [bold]{output}[/]")


def _clip_scores(generated, photos, prompts, identifier, clip_model, dino_model, batch_size):
    """CLIP-I, CLIP-T and DINO of the generated images, with a progress bar."""
    from rich.progress import Progress

    from .scoring.metrics import Embedder, evaluate

    _quiet_model_loading()
    with console.status("loading the CLIP and DINO models"):
        clip, dino = Embedder.clip(clip_model), Embedder.dino(dino_model)
    with Progress(console=console) as bar:
        task = bar.add_task("scoring", total=None)
        return evaluate(
            generated,
            photos,
            prompts,
            identifier=identifier,
            clip=clip,
            dino=dino,
            batch_size=batch_size,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
        )


@command("compare")
def compare_cmd(
    output_dir: Annotated[Path, typer.Option(help="Folder for the runs, report.md, grids and the plot.")],
    instance_dir: Annotated[
        Optional[str],
        typer.Option(help="Folder of photos of the subject.", show_default="with --study: the toy subject's"),
    ] = None,
    prompt: Annotated[
        Optional[str],
        typer.Option(help="Instance prompt, e.g. 'a photo of sks dog'.", show_default="with --study: the toy one"),
    ] = None,
    class_prompt: Annotated[
        Optional[str], typer.Option(help="Class prompt (prior preservation for both methods).")
    ] = None,
    study: Annotated[
        bool,
        typer.Option(
            "--study",
            help="Run the whole krona-vs-LoRA study on the toy world instead (docs/fidelity.md): an lr sweep over "
            "seeds, then both at equal budgets and peft's LoKr at krona's factors. Resumable: run the same command "
            "again to continue.",
        ),
    ] = False,
    lrs: Annotated[
        Optional[str], typer.Option(help="--study: learning rates, comma-separated.", show_default="1e-5 to 1e-2")
    ] = None,
    factors: Annotated[
        Optional[str], typer.Option(help="--study: krona's factor settings.", show_default="2x4,4x4,...,64x4")
    ] = None,
    ranks: Annotated[Optional[str], typer.Option(help="--study: LoRA's ranks.", show_default="1,2,4,8,16")] = None,
    seeds: Annotated[int, typer.Option(help="--study: seeds per setting.", min=1)] = 3,
    config: Annotated[
        Optional[str], typer.Option(help="Training settings shared by both methods: YAML file or preset.")
    ] = None,
    pretrained_model: Annotated[Optional[str], typer.Option(help="Base model (overrides the config's).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Training steps of every run (overrides the config's).")] = None,
    sweep: Annotated[
        Optional[str], typer.Option(help="Repeat over settings: lr=1e-4,5e-4,1e-3, factors=..., rank=....")
    ] = None,
    prompt_set: Annotated[str, typer.Option(help="DreamBench prompts: object or live (25 each).")] = "live",
    identifier: Annotated[str, typer.Option(help="The subject's identifier token in the prompt.")] = "sks",
    class_noun: Annotated[
        Optional[str], typer.Option(help="The subject's class noun.", show_default="the word after the identifier")
    ] = None,
    num_images: Annotated[
        Optional[int], typer.Option(help="Images (seeds) per prompt and run.", show_default="2; 4 with --study", min=1)
    ] = None,
    sample_steps: Annotated[int, typer.Option(help="Denoising steps of the scored samples.")] = 30,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance of the scored samples.")] = 7.0,
    clip_model: Annotated[
        str, typer.Option(help="CLIP model: hub id or local folder.")
    ] = "openai/clip-vit-base-patch32",
    dino_model: Annotated[str, typer.Option(help="DINO model: hub id or local folder.")] = "facebook/dino-vits16",
    scorer: Annotated[
        str, typer.Option(help="clip (CLIP-I, CLIP-T, DINO) or toy (the toy world's scores, for make-toy pipelines).")
    ] = "clip",
) -> None:
    """Train krona and the LoRA baseline on the same subject and budget, sample the same prompts and seeds, score
    both (CLIP-I, CLIP-T, DINO, or the toy world's scores) and write report.md with the table, side-by-side grids
    and a plot. With --study: the whole study on the toy world (report.md, results.json, lr/pareto/steps plots)."""
    from .evaluation.compare import compare
    from .training.config import load_config

    if study:
        plan = dict(lrs=lrs, factors=factors, ranks=ranks, seeds=seeds, per_prompt=num_images or 4)
        _study(output_dir, instance_dir, prompt, class_prompt, config, pretrained_model, steps, plan)
        return
    if lrs or factors or ranks:
        raise KronaError("--lrs, --factors and --ranks size the --study; one comparison sweeps with --sweep")
    if instance_dir is None or prompt is None:
        raise KronaError("krona compare needs --instance-dir and --prompt (or --study, which brings its own)")
    overrides = {
        "instance_dir": instance_dir,
        "prompt": prompt,
        "class_prompt": class_prompt,
        "steps": steps,
        "pretrained_model": pretrained_model,
        "output_dir": str(output_dir),
    }
    cfg = load_config(config, overrides)
    _quiet_model_loading()
    with console.status("comparing") as status:
        summary = compare(
            cfg,
            output_dir,
            sweep=sweep,
            prompts=prompt_set,
            identifier=identifier,
            noun=class_noun,
            num_images=num_images or 2,
            sample_steps=sample_steps,
            guidance=guidance,
            clip_model=clip_model,
            dino_model=dino_model,
            progress=lambda message: status.update(message),
            scorer=scorer,
        )
    table = Table(title="krona compare", box=box.SIMPLE_HEAD)
    metrics = summary["metrics"]
    for column in ("method", summary["sweep"] or "setting", "parameters", *(title for _, title in metrics)):
        table.add_column(column, justify="right")
    for run in summary["runs"]:
        table.add_row(
            run["method"],
            str(run["setting"] if run["setting"] is not None else "default"),
            f"{run['parameters']:,}",
            *(f"{run['metrics'][name]:.4f}" for name, _ in metrics),
        )
    console.print(table)
    console.print(f"report -> [bold]{summary['report']}[/]")


def _study(out: Path, instance_dir, prompt, class_prompt, config, pretrained, steps, options: dict) -> None:
    """`krona compare --study`: the toy world's base and photos unless given, the plan from the options, a progress
    bar over the runs, and the headline numbers."""
    import dataclasses

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .evaluation import study as toy_study
    from .training.config import load_config

    def listed(text: str | None, kind, default: tuple) -> tuple:
        try:
            return tuple(kind(v) for v in _split([text])) if text else default
        except ValueError as e:
            raise KronaError(f"cannot read '{text}' as a comma-separated list of {kind.__name__}s") from e

    plan = toy_study.StudyPlan(
        lrs=listed(options["lrs"], float, toy_study.LRS),
        factors=listed(options["factors"], str, toy_study.FACTORS),
        ranks=listed(options["ranks"], int, toy_study.RANKS),
        seeds=options["seeds"],
        per_prompt=options["per_prompt"],
    ).check()  # before anything is written
    _quiet_model_loading()
    with console.status("preparing the toy world"):
        base, photos = toy_study.study_inputs(out.expanduser(), pretrained, instance_dir)
    overrides = {
        "pretrained_model": base,
        "instance_dir": photos,
        "prompt": prompt or "a photo of sks square",
        "class_prompt": class_prompt or "a photo of a square",
        # the study's own budget, not the toy preset's (which the study set): the same command, the same study
        "steps": steps or toy_study.StudyPlan.steps,
        "output_dir": str(out),
    }
    cfg = load_config(config or "toy", overrides)
    plan = dataclasses.replace(plan, steps=cfg.steps, validate_every=max(cfg.steps // 4, 1))
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("study", total=None)
        results = toy_study.study(
            cfg, out, plan, lambda done, total, name: bar.update(task, completed=done, total=total, description=name)
        )
    summary = results["summary"]
    for method, r in summary["robustness"].items():
        if r["best_lr"] is not None:
            console.print(
                f"{method}: best lr {r['best_lr']:g}, subject fidelity {r['best']:.3f}, "
                f"robust over {r['decades']:.2f} decades of lr"
            )
    console.print(f"{summary['runs']} runs, {summary['hours']:.2f} h; report -> [bold]{out / 'report.md'}[/]")


class _RichReporter:
    """Draws a training run: the summary table, class-image and step progress bars, saved files, warnings."""

    def __init__(self):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
        )
        self.tasks: dict[str, int] = {}

    def _task(self, name: str, total: int, completed: int = 0) -> int:
        if name not in self.tasks:
            self.tasks[name] = self.progress.add_task(name, total=total, completed=completed, info="", rate="")
        return self.tasks[name]

    def start(self, summary: list[tuple[str, str]]) -> None:
        table = Table(title="krona train", show_header=False, box=box.SIMPLE_HEAD)
        table.add_column("setting", style="bold", no_wrap=True)
        table.add_column("value")
        for key, value in summary:
            table.add_row(key, value)
        console.print(table)

    def warn(self, message: str) -> None:
        err_console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)

    def class_images(self, done: int, total: int) -> None:
        self.progress.start()
        self.progress.update(self._task("class images", total), completed=done, total=total)

    def step(self, step: int, total: int, loss: float, lr: float) -> None:
        self.progress.start()
        task = self._task("training", total, completed=step - 1)
        self.progress.update(task, completed=step, total=total, info=f"loss {loss:.4f}  lr {lr:.2e}")
        speed = self.progress.tasks[task].speed
        self.progress.update(task, rate=f"{speed:.2f} it/s" if speed else "")

    def saved(self, what: str, path: Path) -> None:
        self.progress.console.print(f"{what}: [bold]{path}[/]", highlight=False)

    def validated(self, step: int, point: dict) -> None:
        names = {
            "instance_loss": "loss on the photos",
            "class_loss": "on the class images",
            "subject_fidelity": "subject fidelity",
            "prompt_fidelity": "prompt fidelity",
        }
        values = ", ".join(f"{name} {point[key]:.4f}" for key, name in names.items() if point.get(key) is not None)
        self.progress.console.print(f"validation at step {step}: {values}", highlight=False)

    def close(self) -> None:
        self.progress.stop()


@command("train")
@with_train_options
def train_cmd(config: Optional[str] = None, **overrides) -> None:
    """Train a Kronecker adapter (or a LoRA baseline) on photos of one subject, DreamBooth-style.

    Every option is also a key of a YAML config (--config FILE or a preset: sdxl, sd15, tiny); flags override it."""
    from .training.config import load_config
    from .training.train import train

    notes: list[str] = []  # renamed settings used under their old names (--adapter is now --adapter-type)
    cfg = load_config(config, overrides, notes)
    for note in notes:
        err_console.print(f"[yellow]warning:[/] {escape(note)}", highlight=False)
    _quiet_model_loading()
    reporter = _RichReporter()
    # one run per output folder; under accelerate only the first process holds the lock (RANK is set by the launcher)
    lock = (
        _locked(Path(cfg.output_dir), "krona train", "--output-dir")
        if int(os.environ.get("RANK", "0")) == 0
        else contextlib.nullcontext()
    )
    try:
        with lock:
            result = train(cfg, reporter)
    finally:
        reporter.close()
    if not result.main_process:
        return
    if cfg.dry_run:
        console.print("dry run: data, model, adapter and output folder are fine; nothing was trained")
        return
    if result.processes_agree > 1:
        console.print(f"all {result.processes_agree} processes hold bit-identical adapter weights")
    done = result.step - result.start_step
    trained = f"trained {done} step{'s' * (done != 1)}" + (
        f", from step {result.start_step} (resumed) to {result.step}" if result.start_step else ""
    )
    if result.start_step and result.step == result.start_step:  # --resume of a run that had finished
        trained = f"already at step {result.step} of {cfg.steps}: nothing to train (raise --steps to train longer)"
    if result.best is not None:
        kept = f" -> [bold]{result.best_adapter}[/]" if result.best_adapter else " (not kept: --keep last)"
        console.print(f"best step {result.best.step}: {escape(result.best.why)}{kept}")
    console.print(
        f"{trained} -> [bold]{result.adapter}[/]\n"
        f"samples: {result.output_dir / 'samples'}   checkpoints: {result.output_dir / 'checkpoints'}   "
        f"model card: {result.output_dir / 'README.md'}"
    )
    console.print(
        escape(_next_steps(result.adapter, cfg.prompt, result.output_dir.name)), highlight=False, soft_wrap=True
    )


def _next_steps(adapter: Path, prompt: str, name: str) -> str:
    """What to do with a trained adapter: the commands, ready to paste."""
    a = shlex.quote(str(adapter))
    return (
        "next:\n"
        f"  krona sample --adapter {a} --prompt {shlex.quote(prompt)} -n 4\n"
        f"  krona merge --adapter {a} --output {shlex.quote(name + '.safetensors')}   "
        "# one checkpoint for A1111, Forge, ComfyUI\n"
        f"  krona export --adapter {a} --to lycoris --output {shlex.quote(name + '-lokr.safetensors')}   "
        "# for their LoRA loaders"
    )


def _usage_line(e, args: list[str]) -> str:
    """typer's usage error as one line, with the closest flag for an unknown one (and the DreamBooth scripts'
    names of train's settings, e.g. --learning-rate -> --lr)."""
    message = e.format_message() if hasattr(e, "format_message") else str(e)
    option = getattr(e, "option_name", None)
    if option:
        flags = [
            o
            for p in (e.ctx.command.params if e.ctx else [])
            for o in (*p.opts, *p.secondary_opts)
            if not getattr(p, "hidden", False)
        ]
        close = next(iter(difflib.get_close_matches(option, flags, n=1)), None)
        if e.ctx and e.ctx.command.name == "train":  # the DreamBooth scripts' names: --learning-rate is --lr
            from .training.config import suggestion

            close = f"--{suggestion(option)}" if suggestion(option) else close
        message = f"no such option: {option}" + (f"; did you mean {close}?" if close else "")
    command = " ".join(e.ctx.command_path.split()[1:]) if e.ctx else ""
    return f"{message} (krona {command + ' ' if command else ''}-h lists the options)"


def _print_error(e: KronaError, debug: bool) -> None:
    label = "[yellow]interrupted:[/]" if e.exit_code == EXIT_INTERRUPTED else "[bold red]error:[/]"
    if debug and e.__cause__ is not None:  # the library error krona turned into this line
        traceback.print_exception(e.__cause__)
    err_console.print(f"{label} {escape(str(e))}", highlight=False, soft_wrap=True)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: runs the app and turns failures into one line and an exit code (2 bad input, 1 bug, 130 ^C).
    `--debug` may stand anywhere on the command line."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    _state["debug"] = debug
    if not debug:  # deprecation notes and other warnings of the libraries are for developers, not for users
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", module=_LIBRARIES)
    stopped_by_krona = False  # an interrupted run that said how to resume: no second line
    try:
        result = app(args=args, prog_name="krona", standalone_mode=False)
        code = result if isinstance(result, int) else EXIT_OK
    except KronaError as e:
        _print_error(e, debug)
        code, stopped_by_krona = e.exit_code, e.exit_code == EXIT_INTERRUPTED
    except typer.Exit as e:
        code = e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        code = EXIT_INTERRUPTED
    except _UsageError as e:  # unknown option, missing argument, bad value
        err_console.print(f"[bold red]error:[/] {escape(_usage_line(e, args))}", highlight=False, soft_wrap=True)
        code = e.exit_code
    except Exception as e:  # a bug: one line, the traceback only with --debug
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (rerun with --debug for the traceback)"
        err_console.print(
            f"[bold red]internal error:[/] {type(e).__name__}: {escape(str(e))}{hint}", highlight=False, soft_wrap=True
        )
        code = EXIT_INTERNAL
    if code == EXIT_INTERRUPTED and not stopped_by_krona:  # typer itself turns Ctrl-C into exit code 130
        err_console.print("[yellow]interrupted[/]")
    if argv is None:
        sys.exit(code)
    return code
