"""`krona train` and the presets it reads (`krona presets`)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from ..errors import KronaError
from ..training.config import CONFIG_PRESETS, with_train_options
from .app import command, console, locked, warn
from .render import TrainReporter, next_steps, plural


@command(
    "train",
    help="Train a Kronecker adapter (or a LoRA baseline) on photos of one subject, DreamBooth-style.\n\n"
    f"Every option is also a key of a YAML config (--config FILE or a preset: {', '.join(CONFIG_PRESETS)}); flags "
    "override it.",
)
@with_train_options
def train_cmd(config: Optional[str] = None, **overrides) -> None:
    from ..training.config import load_config
    from ..training.train import train
    from .quiet import no_loading_bars

    notes: list[str] = []  # renamed settings used under their old names (--adapter is now --adapter-type)
    cfg = load_config(config, overrides, notes)
    for note in notes:
        warn(note)
    no_loading_bars()
    reporter = TrainReporter()
    # one run per output folder; under accelerate only the first process holds the lock (RANK is set by the launcher)
    lock = (
        locked(Path(cfg.output_dir), "krona train", "--output-dir")
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
    trained = f"trained {plural(done, 'step')}" + (
        f", from step {result.start_step} (resumed) to {result.step}" if result.start_step else ""
    )
    if result.start_step and result.step == result.start_step:  # --resume of a run that had finished
        trained = f"already at step {result.step} of {cfg.steps}: nothing to train (raise --steps to train longer)"
    if result.validation and cfg.scorer == "none":
        console.print(
            "validated without a scorer: the losses are in validation.json and no best step is chosen "
            "(--scorer toy or clip scores the grids and keeps the best step in best/)"
        )
    if result.best is not None:
        kept = f" -> [bold]{escape(str(result.best_adapter))}[/]" if result.best_adapter else " (not kept: --keep last)"
        console.print(f"best step {result.best.step}: {escape(result.best.why)}{kept}")
    console.print(
        f"{trained} -> [bold]{escape(str(result.adapter))}[/]\n"
        f"samples: {result.output_dir / 'samples'}   checkpoints: {result.output_dir / 'checkpoints'}   "
        f"model card: {result.output_dir / 'README.md'}"
    )
    console.print(
        escape(next_steps(result.adapter, cfg.prompt, result.output_dir.name, result.family, cfg.drop_t5)),
        highlight=False,
    )


@command("presets")
def presets_cmd(
    name: Annotated[Optional[str], typer.Argument(help="A preset to show in full.")] = None,
) -> None:
    """List the presets of `krona train --config NAME`, or show one (its YAML, ready to copy and edit)."""
    from ..architectures import CONFIGS_DIR

    if name is not None:
        if name not in CONFIG_PRESETS:
            raise KronaError(f"no preset '{name}'; the presets are {', '.join(CONFIG_PRESETS)}")
        console.print((CONFIGS_DIR / f"{name}.yaml").read_text(), end="", highlight=False, markup=False)
        return
    for preset in CONFIG_PRESETS:
        first = (CONFIGS_DIR / f"{preset}.yaml").read_text().splitlines()[0].lstrip("# ")
        console.print(f"[bold]{preset:6}[/] {escape(first)}", highlight=False, soft_wrap=True)
    console.print("krona presets NAME shows one; krona train --config NAME uses it (flags override it)")
