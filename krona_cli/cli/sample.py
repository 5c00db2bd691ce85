"""`krona sample`: images from a base model with adapters baked in."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..families import in_words
from ..training.config import DROP_T5
from .app import TransformerFile, command, console, locked, renamed
from .render import plural, sampling_progress


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
    transformer: TransformerFile = None,
    drop_t5: Annotated[bool, typer.Option("--drop-t5", help=DROP_T5)] = False,
    sample_steps: Annotated[
        Optional[int],
        typer.Option(
            help="Denoising steps.",
            show_default="the model's: " + in_words(lambda f: {v: d.steps for v, d in f.samplers.items()}),
        ),
    ] = None,
    steps: Annotated[Optional[int], typer.Option(hidden=True, help="Old name of --sample-steps.")] = None,
    guidance: Annotated[
        Optional[float],
        typer.Option(
            help="Guidance scale (classifier-free, or the distilled guidance a model takes as an input).",
            show_default="the model's: " + in_words(lambda f: {v: d.guidance for v, d in f.samplers.items()}),
        ),
    ] = None,
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

    from ..inference.merge import parse_adapter_spec
    from ..inference.sampling import SampleConfig, ceil_batches, generate, load_prompts, prepare_pipeline, sample_folder
    from .quiet import no_loading_bars

    config = SampleConfig(
        num_images=num_images,
        seed=seed,
        steps=renamed("--steps", "--sample-steps", steps) or sample_steps,
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
    with locked(output_dir, "krona sample", "--output-dir"):
        earlier = sample_folder(output_dir, overwrite)
        no_loading_bars()
        with console.status("loading the base model and merging adapters"):
            pipe, info = prepare_pipeline(specs, pretrained_model, device, dtype, transformer, drop_t5)
            config = config.for_model(pipe)
        for old in earlier:  # --overwrite: no image of an earlier run stays beside the new ones
            old.unlink()
        bar = sampling_progress(config.steps, ceil_batches(config, len(prompts)), len(prompts) * config.num_images)
        with bar as progress:
            result = generate(pipe, config, prompts, info, output_dir, progress=progress)
    adapters = ", ".join(f"{Path(a.file).name}:{a.scale:g} ({a.sha256[:12]})" for a in info.adapters) or "none"
    console.print(
        f"{plural(len(result.images), 'image')} ({result.width}x{result.height}, {config.steps} steps, "
        f"{config.scheduler}, guidance {config.guidance:g}, seeds {result.seeds[0]}..{result.seeds[-1]}) from "
        f"{info.base_model} with adapters {adapters} -> [bold]{Path(output_dir)}[/]; grid: [bold]{result.grid}[/]",
        highlight=False,
    )
