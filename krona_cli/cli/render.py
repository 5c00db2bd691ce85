"""What krona draws: the tables of plan, inspect, eval and compare, the progress bars of sampling and the study, and
the reporter that draws a training run. Pure presentation: the numbers come from the library."""

from __future__ import annotations

import contextlib
import json
import shlex
from pathlib import Path

from rich import box
from rich.markup import escape
from rich.table import Table

from ..training.config import drop_t5_flag
from .app import console, warn


def plural(n: int, word: str) -> str:
    """`1 image`, `2 images`."""
    return f"{n} {word}{'s' * (n != 1)}"


def plan_table(arch: str, targets: str, settings: list[str], groups: dict) -> Table:
    from ..inference.plan import FP16_BYTES, FP32_BYTES, LORA_RANKS, file_size

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
    return table


def plan_json(arch: str, targets: str, groups: dict) -> str:
    out = {
        name: {
            "layers": g.layers,
            "kron": g.kron,
            "lora": {f"r{r}": v for r, v in g.lora.items()},
            "factors_used": {k: sorted(v) for k, v in g.used.items()},
        }
        for name, g in groups.items()
    }
    return json.dumps({"arch": arch, "targets": targets, "groups": out})


def inspect_table(name: str, info: dict) -> Table:
    table = Table(title=f"adapter {name}", show_header=False)
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
    return table


def scores_table(title: str, columns: dict[str, float | None]) -> Table:
    """One row of scores (eval)."""
    table = Table(title=title, box=box.SIMPLE_HEAD)
    for column in columns:
        table.add_column(column, justify="right")
    table.add_row(*("-" if v is None else f"{v:.4f}" for v in columns.values()))
    return table


def compare_table(summary: dict) -> Table:
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
    return table


@contextlib.contextmanager
def counting_bar(description: str):
    """A progress bar over a count that may grow (the study's runs, scored images); yields the callback
    `(done, total, name=None)`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int | None, name: str | None = None) -> None:
            bar.update(task, completed=done, total=total, description=name or description)

        yield update


@contextlib.contextmanager
def sampling_progress(steps: int, calls: int, total: int):
    """A progress bar over the images of a `krona sample` run (`calls` pipeline calls of `steps` steps draw `total`
    images); yields the callback `generate` reports to."""
    from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from rich.text import Text

    class _Rate(ProgressColumn):  # denoising steps of one pipeline call per second, as diffusers counts "it"
        def render(self, task) -> Text:
            if not task.speed:
                return Text("-- it/s")
            return Text(f"{task.speed * steps * calls / total:.2f} it/s")

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


class TrainReporter:
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
        warn(message)

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
        self.progress.console.print(f"{what}: [bold]{escape(str(path))}[/]", highlight=False)

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


def next_steps(adapter: Path, prompt: str, name: str, family, drop_t5: bool = False) -> str:
    """What to do with a trained adapter: the commands, ready to paste (a merge into the single file the family has:
    a whole checkpoint, or its denoiser alone; sampling as it was trained, `--drop-t5` where it was)."""
    a = shlex.quote(str(adapter))
    drop = drop_t5_flag(drop_t5)
    merge = f"--output {shlex.quote(name + '.safetensors')}   # one checkpoint for A1111, Forge, ComfyUI"
    if family.single_file.denoiser_only:
        merge = f"--output {shlex.quote(name + '.safetensors')}{drop}   # {family.single_file.holds}, for ComfyUI"
    return (
        "next:\n"
        f"  krona sample --adapter {a} --prompt {shlex.quote(prompt)} -n 4{drop}\n"
        f"  krona merge --adapter {a} {merge}\n"
        f"  krona export --adapter {a} --to lycoris --output {shlex.quote(name + '-lokr.safetensors')}   "
        "# for their LoRA loaders"
    )
