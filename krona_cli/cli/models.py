"""Commands that write base pipelines: `make-tiny` (random weights, for plumbing) and `make-toy` (pretrained on the
toy world)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..families import tiny_archs
from .app import command, console, locked

Directory = Annotated[
    Path, typer.Argument(help="Folder to write the pipeline to (created, or replaced with --overwrite).")
]
TinyArch = Annotated[str, typer.Option("--arch", help=f"Architecture: {', '.join(tiny_archs())}.")]
ToyArch = Annotated[str, typer.Option("--arch", help="Architecture: sdxl, sd15 or flux.")]


@command("make-tiny")
def make_tiny_cmd(
    directory: Directory,
    arch: TinyArch = "sdxl",
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace a tiny pipeline written here before.")] = False,
) -> None:
    """Build a tiny random-weight pipeline of a model family (for tests and demos; no download)."""
    from ..pipeline.tiny import make_tiny

    with locked(directory, "krona make-tiny", "DIRECTORY"):
        path = make_tiny(directory, arch=arch, seed=seed, overwrite=overwrite)
    console.print(f"tiny {arch} pipeline written to [bold]{path}[/]")


@command("make-toy")
def make_toy_cmd(
    directory: Directory,
    arch: ToyArch = "sdxl",
    overwrite: Annotated[bool, typer.Option(help="Replace a toy pipeline written here before.")] = False,
) -> None:
    """Write a small SDXL, SD 1.5 or FLUX.1 pipeline pretrained on the toy world (coloured shapes on plain
    backgrounds; a few MB, no download): a base that draws what it is asked, to see personalisation work on a CPU."""
    from ..pipeline.toy import make_toy

    with locked(directory, "krona make-toy", "DIRECTORY"):
        path = make_toy(directory, arch=arch, overwrite=overwrite)
    console.print(f"toy {arch} pipeline written to [bold]{path}[/]")
