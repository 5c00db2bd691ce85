"""Commands that measure: `eval` (scores of generated images) and `compare` (krona against LoRA on one subject, or
with --study the whole study on the toy world)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from ..errors import KronaError
from .app import command, console
from .render import compare_table, counting_bar, scores_table

# options eval and compare share
Identifier = Annotated[str, typer.Option(help="The subject's identifier token in its prompt (removed for CLIP-T).")]
ClipModel = Annotated[str, typer.Option(help="CLIP model: hub id or local folder.")]
DinoModel = Annotated[str, typer.Option(help="DINO model: hub id or local folder.")]
Scorer = Annotated[
    str,
    typer.Option(
        help="clip: CLIP-I, CLIP-T and DINO (downloaded scorer models); toy: the toy world's subject fidelity, "
        "prompt fidelity and class scores (no model; for pictures of krona make-toy pipelines)."
    ),
]
CLIP, DINO = "openai/clip-vit-base-patch32", "facebook/dino-vits16"


@command("eval")
def eval_cmd(
    images: Annotated[
        Path, typer.Option(help="Folder of generated images (PNG prompts are read from their metadata).")
    ],
    reference: Annotated[
        Optional[Path],
        typer.Option(help="Folder of the subject's real photos (the instance images); --scorer clip needs it."),
    ] = None,
    scorer: Scorer = "clip",
    prompt: Annotated[
        Optional[str], typer.Option(help="The prompt of every generated image (else their metadata).")
    ] = None,
    prompts_file: Annotated[
        Optional[Path], typer.Option(help="One prompt per generated image, in file-name order.")
    ] = None,
    output: Annotated[Path, typer.Option(help="Write the metrics here as JSON.")] = Path("metrics.json"),
    overwrite: Annotated[bool, typer.Option(help="Replace a metrics file krona eval wrote before.")] = False,
    identifier: Identifier = "sks",
    clip_model: ClipModel = CLIP,
    dino_model: DinoModel = DINO,
    batch_size: Annotated[int, typer.Option(help="Images per model call.")] = 16,
) -> None:
    """Score generated images: CLIP-I and DINO (similarity to the subject's photos) and CLIP-T (to the prompt), or
    with --scorer toy the toy world's scores, read from the pictures themselves."""
    from ..evaluation.images import score_images
    from .quiet import no_loading_bars

    prompts = None
    if prompt is not None or prompts_file is not None:
        from ..inference.sampling import load_prompts

        prompts = load_prompts([prompt] if prompt else [], prompts_file)
    # the clip scorers' models take a while: a bar; the toy world's scores are read from the pixels at once
    progress = counting_bar("scoring") if scorer == "clip" else contextlib.nullcontext(lambda done, total: None)
    with progress as bar:
        scores = score_images(
            images,
            reference,
            scorer,
            prompts,
            output,
            identifier,
            clip_model,
            dino_model,
            batch_size,
            overwrite,
            loading=no_loading_bars,
            progress=bar,
        )
    console.print(scores_table(scores.title, scores.columns))
    console.print(f"metrics -> [bold]{escape(str(scores.output))}[/]")


StudyArch = Annotated[str, typer.Option(help="--study: the toy pipeline studied: sdxl, sd15 or flux.")]
StudyOptimizers = Annotated[
    Optional[str],
    typer.Option(
        help="--study: krona's optimizers in the lr sweep, e.g. adamw,prodigy,adamw-schedulefree.", show_default="adamw"
    ),
]
StudyMultipliers = Annotated[
    Optional[str],
    typer.Option(help="--study: Prodigy's lr grid (multipliers of its own step size).", show_default="0.1,0.3,1,3,10"),
]
StudyInits = Annotated[
    Optional[str], typer.Option(help="--study: the --kron-init values of the transfer part.", show_default="normal")
]
StudyTransfer = Annotated[
    Optional[str],
    typer.Option(
        help="--study: factor settings of the transfer part (does the best lr hold?), e.g. 4x4,16x4,32x4.",
        show_default="no transfer part",
    ),
]
StudyTransferLrs = Annotated[
    Optional[str], typer.Option(help="--study: the transfer part's learning rates, comma-separated.")
]
ScoredSteps = Annotated[
    Optional[int], typer.Option(help="Denoising steps of the scored samples.", show_default="the model's: SD 30")
]
ScoredGuidance = Annotated[
    Optional[float], typer.Option(help="Guidance of the scored samples.", show_default="the model's: SD 7.0")
]


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
    arch: StudyArch = "sdxl",
    optimizers: StudyOptimizers = None,
    multipliers: StudyMultipliers = None,
    inits: StudyInits = None,
    transfer: StudyTransfer = None,
    transfer_lrs: StudyTransferLrs = None,
    config: Annotated[
        Optional[str], typer.Option(help="Training settings shared by both methods: YAML file or preset.")
    ] = None,
    pretrained_model: Annotated[Optional[str], typer.Option(help="Base model (overrides the config's).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Training steps of every run (overrides the config's).")] = None,
    sweep: Annotated[
        Optional[str], typer.Option(help="Repeat over settings: lr=1e-4,5e-4,1e-3, factors=..., rank=....")
    ] = None,
    prompt_set: Annotated[str, typer.Option(help="DreamBench prompts: object or live (25 each).")] = "live",
    identifier: Identifier = "sks",
    class_noun: Annotated[
        Optional[str], typer.Option(help="The subject's class noun.", show_default="the word after the identifier")
    ] = None,
    num_images: Annotated[
        Optional[int], typer.Option(help="Images (seeds) per prompt and run.", show_default="2; 4 with --study", min=1)
    ] = None,
    sample_steps: ScoredSteps = None,
    guidance: ScoredGuidance = None,
    clip_model: ClipModel = CLIP,
    dino_model: DinoModel = DINO,
    scorer: Scorer = "clip",
) -> None:
    """Train krona and the LoRA baseline on the same subject and budget, sample the same prompts and seeds, score
    both (CLIP-I, CLIP-T, DINO, or the toy world's scores) and write report.md with the table, side-by-side grids
    and a plot. With --study: the whole study on the toy world (report.md, results.json, lr/pareto/steps plots)."""
    from ..evaluation.compare import compare
    from ..training.config import load_config
    from .quiet import no_loading_bars

    if study:
        inputs = dict(config=config, pretrained=pretrained_model, instance_dir=instance_dir, prompt=prompt)
        grid = dict(lrs=lrs, factors=factors, ranks=ranks, optimizers=optimizers, multipliers=multipliers, inits=inits)
        grid |= dict(transfer=transfer, transfer_lrs=transfer_lrs)
        _study(output_dir, grid, seeds, num_images or 4, inputs | dict(class_prompt=class_prompt, steps=steps), arch)
        return
    if any(v is not None for v in (lrs, factors, ranks, optimizers, multipliers, inits, transfer, transfer_lrs)):
        raise KronaError(
            "--lrs, --factors, --ranks and the transfer options size the --study; one comparison sweeps with --sweep"
        )
    if instance_dir is None or prompt is None:
        raise KronaError("krona compare needs --instance-dir and --prompt (or --study, which brings its own)")
    overrides = dict(instance_dir=instance_dir, prompt=prompt, class_prompt=class_prompt, steps=steps)
    overrides |= dict(pretrained_model=pretrained_model, output_dir=str(output_dir))
    cfg = load_config(config, overrides)
    no_loading_bars()
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
    console.print(compare_table(summary))
    console.print(f"report -> [bold]{escape(str(summary['report']))}[/]")


def _study(out: Path, grid: dict, seeds: int, per_prompt: int, inputs: dict, arch: str) -> None:
    """`krona compare --study`: a progress bar over the runs, and the headline numbers. `grid`: the comma-separated
    options that size the study, by StudyPlan field (None: the plan's default)."""
    from ..evaluation import study as toy_study
    from .quiet import no_loading_bars

    kinds = dict(lrs=float, factors=str, ranks=int, optimizers=str, multipliers=float, inits=str, transfer=str)
    kinds["transfer_lrs"] = float
    defaults = toy_study.StudyPlan()
    plan = toy_study.StudyPlan(
        **{name: toy_study.listed(grid[name], kinds[name], getattr(defaults, name)) for name in kinds},
        seeds=seeds,
        per_prompt=per_prompt,
        arch=arch,
    ).check()  # before anything is written
    no_loading_bars()
    with console.status("preparing the toy world"):
        cfg, plan = toy_study.study_setup(out, plan, **inputs)
    with counting_bar("study") as bar:
        results = toy_study.study(cfg, out, plan, bar)
    summary = results["summary"]
    for method, r in summary["robustness"].items():
        if r["best_lr"] is not None:
            console.print(
                f"{method}: best lr {r['best_lr']:g}, subject fidelity {r['best']:.3f}, "
                f"robust over {r['decades']:.2f} decades of lr"
            )
    for init, part in summary.get("transfer", {}).items():
        if part["moves"] is not None:
            console.print(f"kron, --kron-init {init}: the best lr moves {part['moves']:.2f} decades across factors")
    console.print(
        f"{summary['runs']} runs, {summary['hours']:.2f} h; report -> [bold]{escape(str(out / 'report.md'))}[/]"
    )
