"""The `krona` typer app and what its commands share: the command decorator, the consoles, the output lock, lists
given as repeatable or comma-separated options, renamed flags."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from .. import __version__
from .help import KronaCommand

# `--transformer` of sample and merge (train's comes from TrainConfig)
TransformerFile = Annotated[
    Optional[str],
    typer.Option(
        help="FLUX.1 only: one transformer .safetensors (Black Forest Labs', ComfyUI's or diffusers' layout) in place "
        "of the base's own; the rest from the base model."
    ),
]

app = typer.Typer(
    name="krona",
    help="Personalise SDXL and SD 1.x/2.x with Kronecker-product adapters (DiffuseKronA), DreamBooth-style.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    cls=None,
)


def command(name: str, help: str | None = None):
    """`@app.command(name)` with krona's help format (`help`: when the text is built from lists, not a docstring)."""
    return app.command(name, cls=KronaCommand, help=help)


# Piped output (files, CI logs) is never wrapped: a path stays one line to copy. Tables get room (160 columns)
# instead of rich's 80-column default.
_TERMINAL = sys.stdout.isatty() or "COLUMNS" in os.environ
console = Console(width=None if _TERMINAL else 160, soft_wrap=not _TERMINAL)
err_console = Console(stderr=True, width=None if _TERMINAL else 160, soft_wrap=not _TERMINAL)


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
    """`--debug` is read by `errors.main` wherever it stands; listed here for --help."""


def warn(message: str) -> None:
    """One warning line on stderr (the message is plain text, not rich markup)."""
    from rich.markup import escape

    err_console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def renamed(old: str, new: str, value):
    """A flag renamed for one meaning per name across commands: the old spelling still works, with a line saying so."""
    if value is not None:
        warn(f"{old} is now {new} (the old name goes in the next release)")
    return value


@contextlib.contextmanager
def locked(output: Path, command: str, flag: str):
    """Hold the output's lock for a command (one command per output); say so when a dead run's lock is taken over."""
    from ..lock import OutputLock

    with OutputLock(output, command, flag) as lock:
        if lock.took_over:
            warn(
                f"took over the lock of `{lock.took_over.get('command')}` (pid {lock.took_over.get('pid')}, "
                f"since {lock.took_over.get('started')}), which is gone"
            )
        yield


def split(values: list[str]) -> list[str]:
    """Repeatable options also take comma-separated lists: --factors 64x4,8x64."""
    return [v.strip() for value in values for v in value.split(",") if v.strip()]
