"""`krona compare`: krona against the LoRA baseline on one subject, with the same data, steps, seeds and prompts.

For each setting of an optional sweep (one key: lr, factors or rank), both methods are trained, sample the same
prompt set with the same seeds, and are scored with CLIP-I, CLIP-T and DINO (`metrics.py`). The report (`report.md`)
holds the metric table, a side-by-side grid per setting and a plot of each metric against the setting per method: the
paper's robustness picture, on the user's own subject.

Library code: raises KronaError, never prints; progress goes to a callback.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import stopping
from ..errors import KronaError
from ..paths import expand

METHODS = ("kron", "lora")
#: (key, title) of each scorer's metrics, the columns of `krona compare` and `krona eval`: clip (CLIP-I, CLIP-T,
#: DINO) or toy (the toy world's scores, no model).
METRICS = {
    "clip": (("clip_i", "CLIP-I"), ("clip_t", "CLIP-T"), ("dino", "DINO")),
    "toy": (
        ("subject_fidelity", "subject fidelity"),
        ("prompt_fidelity", "prompt fidelity"),
        ("class_accuracy", "class accuracy"),
        ("class_look_rate", "class look rate"),
    ),
}
SWEEP_KEYS = {"lr": float, "factors": str, "rank": int}  # factors applies to kron only, rank to LoRA only

# The 25 DreamBench prompts (Ruiz et al., DreamBooth, 2023): {0} is the identifier, {1} the class noun.
_COMMON = [
    "a {0} {1} in the jungle",
    "a {0} {1} in the snow",
    "a {0} {1} on the beach",
    "a {0} {1} on a cobblestone street",
    "a {0} {1} on top of pink fabric",
    "a {0} {1} on top of a wooden floor",
    "a {0} {1} with a city in the background",
    "a {0} {1} with a mountain in the background",
    "a {0} {1} with a blue house in the background",
    "a {0} {1} on top of a purple rug in a forest",
]
_ATTRIBUTES = ["a red {0} {1}", "a purple {0} {1}", "a shiny {0} {1}", "a wet {0} {1}", "a cube shaped {0} {1}"]
PROMPT_SETS = {
    "object": _COMMON
    + [
        "a {0} {1} with a wheat field in the background",
        "a {0} {1} with a tree and autumn leaves in the background",
        "a {0} {1} with the Eiffel Tower in the background",
        "a {0} {1} floating on top of water",
        "a {0} {1} floating in an ocean of milk",
        "a {0} {1} on top of green grass with sunflowers around it",
        "a {0} {1} on top of a mirror",
        "a {0} {1} on top of the sidewalk in a crowded street",
        "a {0} {1} on top of a dirt road",
        "a {0} {1} on top of a white rug",
    ]
    + _ATTRIBUTES,
    "live": _COMMON
    + [
        "a {0} {1} wearing a red hat",
        "a {0} {1} wearing a santa hat",
        "a {0} {1} wearing a rainbow scarf",
        "a {0} {1} wearing a black top hat and a monocle",
        "a {0} {1} in a chef outfit",
        "a {0} {1} in a firefighter outfit",
        "a {0} {1} in a police outfit",
        "a {0} {1} wearing pink glasses",
        "a {0} {1} wearing a yellow shirt",
        "a {0} {1} in a purple wizard outfit",
    ]
    + _ATTRIBUTES,
}


def parse_sweep(text: str | None) -> tuple[str | None, list]:
    """`lr=1e-4,5e-4,1e-3` -> ("lr", [1e-4, 5e-4, 1e-3]); None -> (None, [None])."""
    if not text:
        return None, [None]
    key, sep, values = text.partition("=")
    key = key.strip()
    if not sep or key not in SWEEP_KEYS or not values.strip():
        raise KronaError(f"--sweep '{text}' is not KEY=V1,V2,...; KEY is one of {', '.join(SWEEP_KEYS)}")
    try:
        parsed = [SWEEP_KEYS[key](v.strip()) for v in values.split(",") if v.strip()]
    except ValueError as e:
        raise KronaError(f"--sweep {key} values must be {SWEEP_KEYS[key].__name__}s, got '{values}'") from e
    return key, parsed


def class_noun(prompt: str, identifier: str) -> str:
    """The word after the identifier in the instance prompt ('a photo of sks dog' -> 'dog')."""
    match = re.search(rf"\b{re.escape(identifier)}\s+([\w-]+)", prompt, flags=re.IGNORECASE)
    if not match:
        raise KronaError(
            f"the prompt '{prompt}' has no word after the identifier '{identifier}'; pass --class-noun "
            "(e.g. dog) or --identifier"
        )
    return match.group(1)


def prompt_set(name: str, identifier: str, noun: str) -> list[str]:
    if name not in PROMPT_SETS:
        raise KronaError(f"--prompt-set must be one of {', '.join(PROMPT_SETS)}; got '{name}'")
    return [template.format(identifier, noun) for template in PROMPT_SETS[name]]


@dataclass
class Run:
    method: str
    setting: object  # the sweep value, or None
    adapter: str
    parameters: int
    train_seconds: float
    samples: str
    grid: str
    metrics: dict = field(default_factory=dict)


def _applies(method: str, key: str | None) -> bool:
    return key is None or key == "lr" or (key == "factors") == (method == "kron")


def compare(
    train_config,
    output_dir: str | Path,
    sweep: str | None = None,
    prompts: str = "live",
    identifier: str = "sks",
    noun: str | None = None,
    num_images: int = 2,
    sample_steps: int | None = None,  # None: the model's (its family's sampling defaults)
    guidance: float | None = None,
    clip_model: str | None = None,
    dino_model: str | None = None,
    progress: Callable[[str], None] | None = None,
    scorer: str = "clip",
) -> dict:
    """Train, sample and score both methods for each sweep setting; write report.md, results.json, grids and a plot.

    `scorer` "toy" scores with the toy world's scorers (world/scorers.py) on its evaluation prompts instead of CLIP
    and DINO on a DreamBench prompt set: for toy pipelines (pipeline/toy.py) and the toy subject.

    `train_config` is a validated config.TrainConfig (data, model and budget shared by every run); each run trains
    in `output_dir/runs/<method>[-<key>-<value>]` with the class images shared in `output_dir/class-images`.
    """
    from ..images import scan_images
    from ..inference.sampling import SampleConfig, generate, prepare_pipeline
    from ..scoring.metrics import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL, Embedder, evaluate, read_prompt
    from ..training.train import train

    say = progress or (lambda message: None)
    if scorer not in METRICS:
        raise KronaError(f"--scorer must be one of {', '.join(METRICS)}; got '{scorer}'")
    key, values = parse_sweep(sweep)
    out = expand(output_dir)
    reference, _ = scan_images(train_config.instance_dir, "instance")
    if scorer == "toy":
        from ..world.scenes import eval_prompts
        from .toy import score_files

        sample_prompts = eval_prompts(identifier)
    else:
        noun = noun or class_noun(train_config.prompt, identifier)
        sample_prompts = prompt_set(prompts, identifier, noun)
        # load the scorers first: a missing model fails before any training
        clip = Embedder.clip(clip_model or DEFAULT_CLIP_MODEL)
        dino = Embedder.dino(dino_model or DEFAULT_DINO_MODEL)
    sample_config = SampleConfig(
        num_images=num_images, seed=train_config.seed, steps=sample_steps, guidance=guidance, batch_size=num_images
    ).validate()
    runs: list[Run] = []
    with stopping.deferred():  # a stop request is answered within a sampler or training step; no run is kept
        try:
            for value in values:
                for method in METHODS:
                    if not _applies(method, key) and value != values[0]:
                        continue  # a setting this method does not have: one run of it is the reference
                    name = method + (f"-{key}-{value}" if key and _applies(method, key) else "")
                    run_dir = out / "runs" / name
                    say(f"training {name}")
                    started = time.perf_counter()
                    result = train(_run_config(train_config, out, run_dir, method, key, value))
                    seconds = time.perf_counter() - started
                    say(f"sampling {name}")
                    pipe, info = prepare_pipeline([(result.adapter, 1.0)], train_config.pretrained_model)
                    sampled = generate(pipe, sample_config, sample_prompts, info, run_dir / "eval-samples")
                    say(f"scoring {name}")
                    if scorer == "toy":
                        metrics = score_files(sampled.images, [read_prompt(p) for p in sampled.images], identifier)
                    else:
                        metrics = evaluate(sampled.images, reference, identifier=identifier, clip=clip, dino=dino)
                    runs.append(
                        Run(
                            method,
                            value if _applies(method, key) else None,
                            str(result.adapter),
                            adapter_parameters(result.adapter),
                            round(seconds, 2),
                            str(run_dir / "eval-samples"),
                            str(sampled.grid),
                            {k: getattr(metrics, k) for k, _ in METRICS[scorer]},
                        )
                    )
        except (stopping.StopRequest, stopping.Stopped):
            raise stopping.Stopped(
                f"stopped by {stopping.signal_name()} after {len(runs)} run(s); krona compare keeps none (its report "
                f"needs them all): run the same command again: {stopping.rerun()}"
            ) from None
    report = _write_report(out, runs, key, values, train_config, sample_prompts, num_images, METRICS[scorer])
    return {
        "report": str(report),
        "runs": [asdict(r) for r in runs],
        "sweep": key,
        "values": values,
        "metrics": [list(m) for m in METRICS[scorer]],
    }


def _run_config(train_config, out: Path, run_dir: Path, method: str, key: str | None, value):
    """The training settings of one method at one sweep value, trained in `run_dir`."""
    import dataclasses

    changes = {
        "adapter_type": method,
        "output_dir": str(run_dir),
        "overwrite": True,
        "resume": None,
        "class_dir": train_config.class_dir or str(out / "class-images"),
    }
    if key and _applies(method, key):
        changes[key] = value
    if method == "lora" and key != "lr":
        changes["lr"] = train_config.lr  # None -> each method's own default
    return dataclasses.replace(train_config, **changes).validate()


def adapter_parameters(adapter: str) -> int:
    """The trainable parameters an adapter file holds."""
    from ..formats import load_adapter

    return load_adapter(adapter).num_params()  # Kronecker and LoRA adapters both count their own


def _side_by_side(left: Path, right: Path, target: Path) -> Path:
    """The two methods' grids next to each other, with their names above (PIL only)."""
    from PIL import Image, ImageDraw

    from ..atomic import write_bytes_atomic
    from ..inference.sampling import png_bytes

    images = [Image.open(left).convert("RGB"), Image.open(right).convert("RGB")]
    label = 14
    width, height = sum(i.width for i in images) + 8, max(i.height for i in images) + label
    canvas = Image.new("RGB", (width, height), "white")
    x = 0
    for name, image in zip(METHODS, images):
        canvas.paste(image, (x, label))
        ImageDraw.Draw(canvas).text((x + 2, 1), name, fill="black")
        x += image.width + 8
    return write_bytes_atomic(target, png_bytes(canvas, {"left": str(left), "right": str(right)}))


def _plot(out: Path, runs: list[Run], key: str | None, values: list, metrics) -> Path:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..atomic import write_bytes_atomic

    figure, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.6))
    for axis, (metric, title) in zip(axes, metrics):
        for method in METHODS:
            mine = [r for r in runs if r.method == method]
            if key and len(mine) > 1:
                xs = [str(r.setting) for r in mine]
                axis.plot(xs, [r.metrics[metric] for r in mine], marker="o", label=method)
            else:
                spread = [str(v) for v in values] if key else [""]
                axis.plot(spread, [mine[0].metrics[metric]] * len(spread), linestyle="--", marker="o", label=method)
        axis.set_title(title)
        axis.set_xlabel(key or "")
        axis.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return write_bytes_atomic(out / "plot.png", buffer.getvalue())


def _write_report(out: Path, runs: list[Run], key, values, cfg, prompts: list[str], num_images: int, metrics) -> Path:
    from ..atomic import write_bytes_atomic

    plot = _plot(out, runs, key, values, metrics)
    titles = " | ".join(title for _, title in metrics)
    lines = [
        f"# krona compare: `{cfg.prompt}`",
        "",
        f"Both methods trained {cfg.steps} steps on `{cfg.instance_dir}` from `{cfg.pretrained_model}`"
        + (f" with prior preservation (`{cfg.class_prompt}`)" if cfg.class_prompt else "")
        + f", seed {cfg.seed}; each sampled {len(prompts)} prompts × {num_images} seeds.",
        "",
        "| method | " + (f"{key} | " if key else "") + f"parameters | {titles} | train s |",
        "|---|" + ("---|" if key else "") + "---|" * (len(metrics) + 2),
    ]
    for r in runs:
        setting = f"{r.setting if r.setting is not None else 'default'} | " if key else ""
        scores = " | ".join(f"{r.metrics[name]:.4f}" for name, _ in metrics)
        lines.append(f"| {r.method} | {setting}{r.parameters:,} | {scores} | {r.train_seconds:.1f} |")
    lines += ["", f"![metrics against {key or 'method'}]({plot.name})", ""]
    for value in values:
        kron, lora = (next(r for r in runs if r.method == m and r.setting in (value, None)) for m in METHODS)
        label = f"{key}-{value}" if key else "default"
        grid = _side_by_side(Path(kron.grid), Path(lora.grid), out / "grids" / f"{label}.png")
        lines += [
            f"## {label}: kron (left) and LoRA (right)",
            "",
            f"![{label}]({grid.relative_to(out).as_posix()})",
            "",
        ]
    results = {"runs": [asdict(r) for r in runs], "sweep": key, "values": values, "prompts": prompts}
    write_bytes_atomic(out / "results.json", json.dumps(results, indent=2).encode())
    return write_bytes_atomic(out / "report.md", "\n".join(lines).encode())
