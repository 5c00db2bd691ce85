"""`krona train`: a DreamBooth training run with accelerate, for SDXL and SD 1.x/2.x. `_train` reads top to bottom:
preflight (settings, output folder, photos, resume point, environment), the base model (precision, casts,
quantization, VAE), the photos, the adapter, the summary the user sees (`summary`, a pure function), the class
images, the run (`run.Run`: data, encoder and caches, optimizer), the loop, and the adapter with its model card.

Every random draw comes from a generator seeded by what it is for, so a resumed run draws exactly what an
uninterrupted one does, whatever the process count: `run.py` states the rule, `run.batch_indices` the sample index.

Library code: raises KronaError, never prints; progress goes to a `Reporter`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import stopping
from ..atomic import write_bytes_atomic
from ..dtypes import DTYPES, compute_dtype
from ..errors import KronaError
from ..outputs import check_writable
from ..paths import expand
from . import optimizers, trainable
from .buckets import Bucket
from .config import TrainConfig
from .run import Data, Encoder, Run, Sampling, check_finite


class TrainingInterrupted(stopping.Stopped):
    """Ctrl-C or SIGTERM in the loop: a checkpoint was saved and the message says how to resume (exit code 130)."""


class Reporter:
    """What a training run tells its user; the CLI draws it with rich, tests ignore it."""

    def start(self, summary: list[tuple[str, str]]) -> None: ...
    def warn(self, message: str) -> None: ...
    def class_images(self, done: int, total: int) -> None: ...
    def step(self, step: int, total: int, loss: float, lr: float) -> None: ...
    def saved(self, what: str, path: Path) -> None: ...
    def validated(self, step: int, point: dict) -> None: ...


@dataclass
class TrainResult:
    output_dir: Path
    adapter: Path | None = None
    step: int = 0  # the step the run stands at when it ends
    start_step: int = 0  # the step it started from: 0, or the checkpoint's with --resume (== step: nothing trained)
    losses: list[float] = field(default_factory=list)  # one per optimizer step run by this call
    samples: list[Path] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)
    class_images_generated: int = 0
    summary: list[tuple[str, str]] = field(default_factory=list)
    main_process: bool = True  # the process that writes files and reports (the only one in a 1-process run)
    processes_agree: int = 0  # how many processes were checked to hold bit-identical adapter weights at the end
    bad_steps: int = 0  # steps skipped because the loss or gradients were not finite
    validation: list[dict] = field(default_factory=list)  # one record per validation (validation.json's "steps")
    best: Any = None  # validation.Choice: the step chosen as the best (with --scorer)
    best_adapter: Path | None = None  # its adapter file (with --keep both or best)
    family: Any = None  # the base model's family (families.Family)


RUN_MARKERS = ("config.yaml", "adapter.safetensors", "checkpoints")


def check_output_dir(cfg: TrainConfig) -> Path:
    """The output folder; KronaError if it holds another run and neither --resume nor --overwrite is given."""
    out = expand(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise KronaError(f"--output-dir '{out}' is a file; give a folder")
    check_writable(out, "--output-dir")
    found = [m for m in RUN_MARKERS if (out / m).exists()]
    if found and not cfg.resume and not cfg.overwrite:
        raise KronaError(
            f"--output-dir '{out}' already holds a training run ({', '.join(found)}); "
            "pass --resume latest to continue it, --overwrite to replace it, or choose another folder"
        )
    return out


_OOM_HINT = (
    "out of GPU memory; lower it with --gradient-checkpointing, --optimizer adamw8bit, --mixed-precision bf16, "
    "--cache-latents (the default), a smaller --resolution or --batch-size (with --grad-accum to keep the batch)"
)


def train(cfg: TrainConfig, reporter: Reporter | None = None) -> TrainResult:
    """Run (or, with cfg.dry_run, only check and plan) a training run; see the module docstring."""
    try:
        return _train(cfg, reporter or Reporter())
    except torch.OutOfMemoryError as e:
        raise KronaError(_OOM_HINT) from e


def _train(cfg: TrainConfig, reporter: Reporter) -> TrainResult:
    from .checkpoint import load_checkpoint

    # nothing is written until the class images: a stop request stops at once (the CLI says so)
    with stopping.immediate("while loading the base model and the photos"):
        pre = preflight(cfg, reporter)
        accelerator = _accelerator(cfg, pre.out)
        if not accelerator.is_main_process:
            reporter = Reporter()  # one process speaks
        base = load_base(cfg, accelerator.device)
        cfg = cfg.resolved(base.arch, pre.out)  # what the run uses, checkpoints and config.yaml record
        photos = load_photos(cfg, pre, base, reporter)
        adapter = trainable.trainable_adapter(
            base.pipe,
            base.family,
            cfg.adapter_type,
            cfg.targets,
            cfg.factors,
            cfg.rank,
            cfg.scale,
            cfg.train_text_encoder,
            cfg.text_encoder_factors,
            cfg.strict_factors,
            cfg.kron_init,
        )
        rows = summary(cfg, _plan(cfg, pre, base, photos, adapter, accelerator))
    result = TrainResult(output_dir=pre.out, summary=rows, main_process=accelerator.is_main_process, family=base.family)
    reporter.start(rows)
    if cfg.dry_run:
        return result
    # from here on a stop request is answered at the next sampler or training step, with what was kept
    with stopping.deferred():
        if cfg.overwrite and not cfg.resume and accelerator.is_main_process:
            _clear_run(pre.out)
        accelerator.wait_for_everyone()  # every process has counted the class images before any are made
        result.class_images_generated = _class_images(cfg, base, photos, accelerator, reporter)
        try:
            with stopping.deferred(checks=accelerator.num_processes == 1):
                run = _prepare(cfg, accelerator, base, photos, adapter, pre.out, reporter)
                if pre.resume_from is not None:
                    run.restore(load_checkpoint(pre.resume_from), pre.resume_from)
                stopping.check()
        except stopping.StopRequest:
            kept = " (the class images are kept)" if cfg.class_prompt is not None else ""
            raise stopping.Stopped(
                f"stopped by {stopping.signal_name()} before the first step: nothing new was trained{kept}; "
                f"continue with: {stopping.rerun()}"
            ) from None
        result.start_step = run.done
        finished = False
        try:
            result.processes_agree = _loop(run)
            finished = True
        finally:
            for tracker in accelerator.trackers:  # not end_training(): it also ends the process group
                tracker.finish()
        result.step, result.losses, result.bad_steps = run.done, run.losses, run.bad_steps
        result.samples, result.checkpoints = run.sample_grids, run.checkpoints
        if run.validation is not None:
            result.validation, result.best = run.validation.points, run.validation.choice()
        if finished and accelerator.is_main_process:
            result.adapter, result.best_adapter = _save_final(cfg, adapter, run, base, reporter)
    accelerator.wait_for_everyone()
    return result


def _loop(run: Run) -> int:
    """The steps from where the run stands to cfg.steps, samples, validations and a checkpoint (in that order, so
    that a checkpoint holds the validation of its step) whenever due and at the end, and a validation of the base
    model before the first step. A stop request is answered after the training step or sampler step it comes in,
    with a checkpoint at the step the run stands at (`TrainingInterrupted`): a sample grid or validation that it cut
    short is made when the run resumes (`_catch_up`). Returns how many processes hold the same weights."""
    cfg, accelerator, reporter = run.cfg, run.accelerator, run.reporter
    if accelerator.is_main_process:
        write_bytes_atomic(run.out / "config.yaml", cfg.to_yaml().encode())
        accelerator.init_trackers("krona", config=_tracker_config(cfg))
    try:
        _catch_up(run)
        while run.done < cfg.steps:
            loss, lr = run.step()
            accelerator.log({"loss": loss, "lr": lr}, step=run.done)
            reporter.step(run.done, cfg.steps, loss, lr)
            run.check_stop()
            validate = run.validation is not None and _due(cfg.validate_every, run.done, cfg.steps)
            sample = _due(cfg.sample_every, run.done, cfg.steps) or validate and run.scorer is not None
            images = run.samples() if sample else None
            if validate:
                run.validate(images)
            if _due(cfg.checkpoint_every, run.done, cfg.steps):
                run.checkpoint()
            run.check_stop()
        images = run.samples()
        if run.validation is not None and _missing(run)[1]:  # (a resumed run that had finished has it)
            run.validate(images)
    except stopping.StopRequest:
        cut = [what for what, missing in zip(("sample grid", "validation"), _missing(run)) if missing]
        if run.last_checkpoint != run.done:
            run.checkpoint()
        raise TrainingInterrupted(_stopped(run, " and ".join(cut))) from None
    run.checkpoint()
    return run.processes_agree()


def _missing(run: Run) -> tuple[bool, bool]:
    """(the sample grid, the validation) due at the step the run stands at and not made yet: the base model's
    validation at step 0, after the last step both, in between what --sample-every and --validate-every ask for."""
    cfg, done, history = run.cfg, run.done, run.validation
    last = done >= cfg.steps
    validate = history is not None and (done == 0 or last or _due(cfg.validate_every, done, cfg.steps))
    validate = validate and all(p["step"] != done for p in history.points)
    grid = done > 0 and (last or _due(cfg.sample_every, done, cfg.steps)) and not run.grid_path().exists()
    return grid, validate


def _catch_up(run: Run) -> None:
    """Before the first step: the base model's validation at step 0, or when resuming, the sample grid and the
    validation of the checkpoint's step that a stop request cut short (validation.json stays complete, and the run
    the same as one never stopped: the checkpoint's random state is the one they start from)."""
    if run.done >= run.cfg.steps:  # the end makes them
        return
    grid, validate = _missing(run)
    images = run.samples() if grid or validate and run.scorer is not None else None
    if validate:
        run.validate(images)


def _due(every: int, step: int, steps: int) -> bool:
    """Whether a periodic checkpoint or sample grid falls on `step` (the last step always gets both)."""
    return bool(every) and step % every == 0 and step < steps


def _stopped(run: Run, cut: str) -> str:
    """What a stopped run kept and the command that continues it."""
    redone = f" (the {cut} of that step is made when it resumes)" if cut else ""
    return (
        f"stopped by {stopping.signal_name()} at step {run.done} of {run.cfg.steps}; checkpoint "
        f"{run.out / 'checkpoints' / f'step-{run.done:06d}'} kept{redone}. Resume with: "
        f"krona train --config {run.out / 'config.yaml'} --resume latest"
    )


def _tracker_config(cfg: TrainConfig) -> dict:
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in cfg.to_dict().items()}


# --- the phases before the loop, in the order they run ------------------------------------------------------------


@dataclass
class Preflight:
    """What is known before any model loads: the output folder, the photos and their sizes, the resume point."""

    out: Path
    photos: list[Path]
    sizes: list[tuple[int, int]]  # (height, width) of each photo
    resume_from: Path | None  # the checkpoint to continue from


def preflight(cfg: TrainConfig, reporter: Reporter) -> Preflight:
    """Check the settings, the output folder, the photos (each decoded once: a broken one fails before the model
    loads), the resume point and what the environment must offer (CUDA for xformers, the tracker's package, the
    scorer models of --scorer clip)."""
    from ..images import check_images, scan_images
    from .checkpoint import incomplete_leftovers, resolve_resume

    cfg.validate()
    out = check_output_dir(cfg)
    photos, _ = scan_images(cfg.instance_dir, "instance")
    sizes = check_images(photos)
    resume_from = resolve_resume(out, cfg.resume) if cfg.resume else None
    for leftover in incomplete_leftovers(out):
        reporter.warn(f"ignoring an incomplete checkpoint left by a killed run: {leftover}")
    if cfg.resume and resume_from is None:
        reporter.warn(f"--resume {cfg.resume}: no checkpoint in '{out / 'checkpoints'}' yet; starting from step 0")
    if cfg.xformers and not torch.cuda.is_available():
        raise KronaError(
            "--xformers needs a CUDA GPU; leave it off (PyTorch's SDPA attention is the default and as fast)"
        )
    if cfg.scorer == "clip":  # the scorer models are found (a folder, or a hub id cached or reachable) before any loads
        from ..pipeline.hub import model_source

        model_source(cfg.clip_model, "--clip-model", "CLIP")
        model_source(cfg.dino_model, "--dino-model", "DINO")
    if cfg.report_to != "none" and importlib.util.find_spec(cfg.report_to) is None:
        raise KronaError(
            f"--report-to {cfg.report_to} needs the {cfg.report_to} package: pip install {cfg.report_to} "
            "(or pass --report-to none)"
        )
    return Preflight(out, photos, sizes, resume_from)


def _accelerator(cfg: TrainConfig, out: Path):
    """This run's accelerate state (precision, trackers, process group), TF32 as asked, and the global seed."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration, set_seed

    # accelerate keeps one state per process; each run (several in one process for tests and comparisons) sets its
    # own precision. The process group (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(
        # without an accelerator device, `accelerate launch --multi_gpu` processes join a gloo group only with cpu=True
        cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" or cfg.dry_run else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    if cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_seed(cfg.seed)
    return accelerator


@dataclass
class Base:
    """The base model as the run holds it: loaded, its frozen models cast or quantized, the VAE in fp32."""

    pipe: Any
    family: Any  # families.Family
    objective: Any  # its training objective for this model (families/ddpm.py, families/flow_match.py)
    resolution: int  # the training resolution (the architecture's default unless set)
    text_models: list[nn.Module]
    adapted: list[nn.Module]  # the models that carry adapters: the UNet, and the text encoders when trained
    compute: str  # fp32 | fp16 | bf16: what the forward pass runs in
    base_precision: str  # how the adapted models' frozen weights are stored (a dtype, int8 or nf4)
    weight_dtype: torch.dtype  # the compute dtype
    info: Any  # inference.sampling.ModelInfo, for the metadata of pictures

    @property
    def arch(self) -> str:
        return self.family.name

    @property
    def prediction(self) -> str:
        """epsilon | v_prediction"""
        return self.objective.name

    @property
    def denoiser(self) -> nn.Module:
        return getattr(self.pipe, self.family.denoiser)


def load_base(cfg: TrainConfig, device: torch.device) -> Base:
    """Load the base pipeline, check its prediction type, and put each model on `device` in its precision."""
    from .. import families
    from ..inference.sampling import ModelInfo
    from ..pipeline import models
    from ..pipeline.quantize import QUANTIZED, quantize

    weight_dtype = compute_dtype(cfg.mixed_precision)
    compute = {"no": "fp32"}.get(cfg.mixed_precision, cfg.mixed_precision)
    base_precision = cfg.base_precision or compute
    # a --transformer file under int8/nf4 is quantized layer by layer as it is read: FLUX.1's is 48 GB in fp32
    quantized = (base_precision, weight_dtype) if base_precision in QUANTIZED else None
    pipe, arch = models.load_pipeline(
        cfg.pretrained_model,
        vae=cfg.vae,
        revision=cfg.revision,
        variant=cfg.variant,
        transformer=cfg.transformer,
        quantized=quantized,
        drop_t5=cfg.drop_t5,
    )
    pipe.set_progress_bar_config(disable=True)
    settings = ("guidance", "max_sequence_length", "weighting_scheme")
    family = families.get(arch).configured(**{name: getattr(cfg, name) for name in settings})
    objective = family.objective(pipe.scheduler.config)
    _check_sizes(cfg, family, pipe)
    text_models = family.text_models(pipe)
    denoiser = getattr(pipe, family.denoiser)
    adapted = [denoiser] + (text_models if cfg.train_text_encoder else [])
    for model in [denoiser, *text_models]:
        if model not in adapted:
            models.cast(model, device, weight_dtype)
        elif base_precision in QUANTIZED:
            quantize(model, base_precision, weight_dtype, device)
        else:
            models.cast(model, device, DTYPES[base_precision])
    models.cast(pipe.vae, device, torch.float32)  # the SDXL VAE overflows in fp16; latents are cached anyway
    info = ModelInfo(base_model=cfg.pretrained_model, architecture=arch, dtype=cfg.mixed_precision)
    return Base(
        pipe,
        family,
        objective,
        cfg.effective_resolution(arch),
        text_models,
        adapted,
        compute,
        base_precision,
        weight_dtype,
        info,
    )


def _check_sizes(cfg: TrainConfig, family, pipe) -> None:
    """Training and sample sizes the model can take (FLUX.1's packed latents: multiples of 16), before anything runs."""
    multiple = family.size_multiple(pipe)
    sizes = {"resolution": cfg.effective_resolution(family.name), "sample-width": cfg.sample_width}
    for flag, value in (sizes | {"sample-height": cfg.sample_height}).items():
        if value and value % multiple:
            raise KronaError(f"--{flag} {value} is not a multiple of {multiple} ({family.title} images); choose one")


@dataclass
class Photos:
    """The photos as a dataset, and where the class images (prior preservation) are and how many are missing."""

    instance: Any  # data.ImageSet
    buckets: bool  # aspect-ratio buckets (else square crops)
    class_dir: Path
    to_generate: int  # class images still to make (0 without --class-prompt)


def load_photos(cfg: TrainConfig, pre: Preflight, base: Base, reporter: Reporter) -> Photos:
    from ..images import skipped_note
    from .data import ImageSet, small_images_warning
    from .priors import missing_indices

    buckets = base.family.buckets_by_default if cfg.buckets is None else cfg.buckets
    instance = ImageSet(
        cfg.instance_dir,
        cfg.prompt,
        base.resolution,
        repeats=cfg.repeats,
        center_crop=cfg.center_crop,
        random_flip=cfg.random_flip,
        seed=cfg.seed,
        what="instance",
        buckets=buckets,
        sizes=pre.sizes,
    )
    if instance.skipped:
        reporter.warn("skipped " + skipped_note(instance.skipped))
    small = small_images_warning(pre.photos, pre.sizes, instance.buckets)
    if small:
        reporter.warn(small)
    class_dir = expand(cfg.class_dir or pre.out / "class-images")
    to_generate = len(missing_indices(class_dir, cfg.num_class_images)) if cfg.class_prompt is not None else 0
    return Photos(instance, buckets, class_dir, to_generate)


@dataclass(frozen=True)
class Plan:
    """What a run is about to do, in plain values (no models): what `summary` shows."""

    arch: str
    prediction: str
    resolution: int
    compute: str
    base_precision: str
    device: str
    photos: int  # instance photos
    buckets: list[Bucket] | None  # each photo's aspect-ratio bucket; None: square crops
    class_dir: Path
    to_generate: int
    params: int  # trainable parameters
    fitted: int  # Kronecker-adapted layers whose factors were fitted to their size
    resume_from: Path | None
    world: int  # processes
    memory: str  # the memory estimate, in words
    out: Path
    # each distinct (d_out, d_in, factors used, factors asked) of the Kronecker-adapted layers
    layer_factors: tuple[tuple[int, int, str, str], ...] = ()


def _plan(cfg: TrainConfig, pre: Preflight, base: Base, photos: Photos, adapter, accelerator) -> Plan:
    from ..pipeline.quantize import memory_estimate

    memory = memory_estimate(
        base.adapted + ([] if cfg.cache_latents else [base.pipe.vae]),
        adapter.num_params(),
        optimizers.STATE_BYTES[cfg.optimizer],
        cfg.ema,
    )
    return Plan(
        base.arch,
        base.prediction,
        base.resolution,
        base.compute,
        base.base_precision,
        str(accelerator.device),
        len(photos.instance.paths),
        photos.instance.buckets if photos.buckets else None,
        photos.class_dir,
        photos.to_generate,
        adapter.num_params(),
        adapter.fitted_layers(),
        pre.resume_from,
        accelerator.num_processes,
        memory,
        pre.out,
        _layer_factors(adapter),
    )


def _layer_factors(adapter) -> tuple[tuple[int, int, str, str], ...]:
    """Each distinct (d_out, d_in, factors used, factors asked) of a Kronecker adapter's layers (none for LoRA)."""
    from ..kron import adapted_layers
    from ..kron.factors import parse_factors

    if adapter.kind != "kron":
        return ()
    shapes = set()
    for component, model in adapter.models.items():
        asked = str(parse_factors(adapter.factors[component]))
        shapes |= {(m.out_features, m.in_features, str(m.factors), asked) for m in adapted_layers(model).values()}
    return tuple(sorted(shapes))


def _factors_used(plan: Plan, most: int = 6) -> str | None:
    """The factors fitted per layer shape, e.g. `32×80: 4x2 (asked 7x3)`: every shape when there are at most 4,
    else the fitted ones (at most `most`, then how many more); None when every layer has the factors asked."""
    shapes = sorted(plan.layer_factors)
    fitted = [f for f in shapes if f[2] != f[3]]
    if not fitted:
        return None
    shown = shapes if len(shapes) <= 4 else fitted
    text = ", ".join(
        f"{d_out}×{d_in}: {used}" + (f" (asked {asked})" if used != asked else "")
        for d_out, d_in, used, asked in shown[:most]
    )
    return text + (f" and {len(shown) - most} more shapes" if len(shown) > most else "")


def summary(cfg: TrainConfig, plan: Plan) -> list[tuple[str, str]]:
    """The (label, text) rows shown before a run starts (and all a dry run shows); a pure function of its inputs."""
    from .buckets import histogram

    adapter = f"{cfg.adapter_type} " + (f"rank {cfg.rank}" if cfg.adapter_type == "lora" else f"{cfg.factors}")
    adapter += f", targets {cfg.targets}" + (", text encoders too" if cfg.train_text_encoder else "")
    if plan.fitted:
        adapter += f"; factors fitted to the {plan.fitted} layer(s) they do not divide (--strict-factors stops instead)"
    sizes = (
        f"aspect-ratio buckets of about {plan.resolution}² px: {histogram(plan.buckets)}"
        if plan.buckets is not None
        else f"{plan.resolution}×{plan.resolution} squares"
    )
    classes = (
        f"{cfg.num_class_images} of '{cfg.class_prompt}' in {plan.class_dir} ({plan.to_generate} to generate)"
        if cfg.class_prompt is not None
        else "none (no --class-prompt: prior preservation off)"
    )
    global_batch = cfg.batch_size * cfg.grad_accum * plan.world
    batch = (
        f"{cfg.batch_size} per process × {cfg.grad_accum} accumulation × {plan.world} process(es) "
        f"= {global_batch} per step"
    )
    optimizer = f"{cfg.optimizer}, lr {cfg.effective_lr():g} ({cfg.lr_scheduler}), weight decay {cfg.weight_decay:g}"
    precision = f"compute {plan.compute}, frozen base {plan.base_precision}, adapter weights fp32, on {plan.device}"
    precision += (", gradient checkpointing" if cfg.gradient_checkpointing else "") + (
        ", torch.compile" if cfg.compile else ""
    )
    factors = _factors_used(plan)
    return [
        ("model", f"{cfg.pretrained_model} ({plan.arch}, {plan.prediction.replace('_', '-')})"),
        ("adapter", adapter),
        *([("factors used", factors)] if factors else []),
        ("trainable parameters", f"{plan.params:,}"),
        ("instance images", f"{plan.photos} × {cfg.repeats} repeats, '{cfg.prompt}'"),
        ("sizes", sizes),
        ("class images", classes),
        ("steps", f"{cfg.steps}" + (f", resuming from {plan.resume_from.name}" if plan.resume_from else "")),
        ("batch", batch),
        ("optimizer", optimizer),
        ("precision", precision),
        ("memory (estimate)", plan.memory),
        ("output", str(plan.out)),
    ]


def _class_images(cfg: TrainConfig, base: Base, photos: Photos, accelerator, reporter: Reporter) -> int:
    """Make the missing class images with the base model (spread over the processes); how many this process made."""
    from .buckets import spread
    from .priors import generate_class_images

    if cfg.class_prompt is None or not photos.to_generate:
        return 0
    # fresh adapters change nothing yet (B = 0), so these are the base model's images
    with accelerator.autocast(), torch.no_grad():
        # made in the photos' buckets, in their proportions, so every photo's bucket has class images of its own
        buckets = photos.instance.buckets
        sizes = [(b.height, b.width) for b in spread(buckets, len(buckets))]
        made = generate_class_images(
            base.pipe,
            base.info,
            photos.class_dir,
            cfg.class_prompt,
            cfg.num_class_images,
            lambda i: sizes[i % len(sizes)],
            seed=cfg.seed,
            batch_size=cfg.class_batch_size,
            steps=cfg.sample_steps,
            guidance=cfg.sample_guidance,
            progress=reporter.class_images,
            rank=accelerator.process_index,
            world=accelerator.num_processes,
        )
    accelerator.wait_for_everyone()
    return len(made)


def _prepare(cfg: TrainConfig, accelerator, base: Base, photos: Photos, adapter, out: Path, reporter: Reporter) -> Run:
    """The run at step 0: its data, the encoder with its caches, the optimizer, and the models prepared by
    accelerate (and compiled with --compile)."""
    from diffusers.optimization import get_scheduler

    from .ema import EMA

    params = adapter.params()
    data = _data(cfg, base, photos, cfg.batch_size * cfg.grad_accum * accelerator.num_processes)
    _speedups(cfg, base)
    encoder, idle = _encoder(cfg, base, data, accelerator.device)
    optimizer = _optimizer(cfg, adapter)
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.steps
    )
    ema = EMA(params, cfg.ema_decay) if cfg.ema else None
    trained = list(adapter.models)
    prepared = accelerator.prepare(*[adapter.models[c] for c in trained], optimizer)
    wrapped, optimizer = dict(zip(trained, prepared[:-1])), prepared[-1]
    denoiser = wrapped[base.family.denoiser]
    denoiser = torch.compile(denoiser) if cfg.compile else denoiser
    if cfg.train_text_encoder:
        encoder.text_models = [wrapped.get(c, m) for c, m in zip(base.family.text_encoders, base.text_models)]
    for model in adapter.models.values():
        model.train()
    return Run(
        cfg,
        accelerator,
        wrapped,
        denoiser,
        params,
        optimizer,
        lr_scheduler,
        ema,
        base.objective,
        encoder,
        data,
        _sampling(cfg, base, idle, data.instance.captions, accelerator.device),
        out,
        reporter,
        *_validation(cfg, data, accelerator),
    )


def _validation(cfg: TrainConfig, data: Data, accelerator):
    """(the history, the scorer) of a run with --validate-every (and --scorer); the scorer lives in the main
    process only."""
    from .validation import History, Scorer

    if not cfg.validate_every:
        return None, None
    history = History(cfg.best_margin)
    if cfg.scorer == "none" or not accelerator.is_main_process:
        return history, None
    return history, Scorer(cfg.scorer, cfg.identifier, data.instance.paths, cfg.clip_model, cfg.dino_model)


def _data(cfg: TrainConfig, base: Base, photos: Photos, global_batch: int) -> Data:
    """The photos and the class images as datasets, and the items each step takes."""
    from .buckets import Schedule
    from .data import ImageSet

    # every class image is decoded here: a broken file in a user's class folder fails now, not mid-training
    classes = (
        ImageSet(
            photos.class_dir,
            cfg.class_prompt,
            base.resolution,
            center_crop=cfg.center_crop,
            random_flip=cfg.random_flip,
            seed=cfg.seed,
            what="class",
            buckets=photos.buckets,
        )
        if cfg.class_prompt is not None
        else None
    )
    instance = photos.instance
    schedule = Schedule([instance.bucket_of(i) for i in range(len(instance))], global_batch, cfg.seed, "instance")
    class_schedule = None if classes is None else Schedule(classes.buckets, global_batch, cfg.seed, "class")
    return Data(instance, classes, schedule, class_schedule)


def _speedups(cfg: TrainConfig, base: Base) -> None:
    """Gradient checkpointing and xformers attention, when asked."""
    if cfg.gradient_checkpointing:
        base.denoiser.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            for model in base.text_models:
                model.gradient_checkpointing_enable()
    if cfg.xformers:
        try:
            base.denoiser.enable_xformers_memory_efficient_attention()
        except Exception as e:
            raise KronaError(f"--xformers cannot run here ({type(e).__name__}: {e}); leave it off") from e


def _encoder(cfg: TrainConfig, base: Base, data: Data, device: torch.device) -> tuple[Encoder, list[nn.Module]]:
    """The encoder with the prompt embeddings (frozen text encoders) and latents (--cache-latents) cached, and the
    models that then leave the GPU until samples are drawn."""
    encoder = Encoder(base.pipe, base.family, device, base.weight_dtype, cfg.train_text_encoder, base.text_models)
    if not cfg.train_text_encoder:
        encoder.cache_prompts(list(data.instance.captions) + ([cfg.class_prompt] if data.classes is not None else []))
    if cfg.cache_latents:
        encoder.cache_latents("instance", data.instance)
        if data.classes is not None:
            encoder.cache_latents("class", data.classes)
    idle = ([base.pipe.vae] if cfg.cache_latents else []) + ([] if cfg.train_text_encoder else base.text_models)
    if device.type != "cpu":
        for model in idle:
            model.to("cpu")
    return encoder, idle


def _sampling(cfg: TrainConfig, base: Base, idle: list[nn.Module], captions: list[str], device) -> Sampling:
    """The sample grid's settings; its prompts are --sample-prompt, else the instance prompt, or with --scorer the
    instance prompt in new contexts (`validation.validation_prompts`). On a GPU the images of one prompt are drawn at
    a time (memory); on a CPU the whole grid at once (there a call's fixed costs dominate: the toy SDXL draws a grid
    of ten in 3.8 s at once, 7.1 s two at a time)."""
    from ..inference.sampling import SampleConfig
    from .validation import validation_prompts

    prompts = list(cfg.sample_prompt) or (
        validation_prompts(cfg.prompt, cfg.scorer, captions) if cfg.validate_every and cfg.scorer != "none" else []
    )
    prompts = prompts or [cfg.prompt]
    size = (cfg.sample_width or base.resolution, cfg.sample_height or base.resolution)
    config = SampleConfig(
        num_images=cfg.sample_images,
        seed=cfg.seed,
        steps=cfg.sample_steps,
        guidance=cfg.sample_guidance,
        width=size[0],
        height=size[1],
        batch_size=cfg.sample_images * (len(prompts) if device.type == "cpu" else 1),
    ).for_model(base.pipe, preview=True)
    return Sampling(base.pipe, config, prompts, base.info, size, idle)


def _clear_run(out: Path) -> None:
    """--overwrite: remove the earlier run's adapter, checkpoints and samples (its class images are kept for reuse)."""
    import shutil

    for name in ("checkpoints", "samples"):
        shutil.rmtree(out / name, ignore_errors=True)
    (out / "adapter.safetensors").unlink(missing_ok=True)


def _optimizer(cfg: TrainConfig, adapter):
    denoiser = f"{next(iter(adapter.models))}."  # the denoiser is the first adapted model
    groups = [{"params": [p for n, p in adapter.params().items() if n.startswith(denoiser)], "lr": cfg.effective_lr()}]
    text = [p for n, p in adapter.params().items() if not n.startswith(denoiser)]
    if text:
        groups.append({"params": text, "lr": cfg.effective_text_encoder_lr()})
    return optimizers.build(cfg.optimizer, groups, cfg.weight_decay, cfg.lr_warmup_steps)


def _save_final(cfg: TrainConfig, adapter, run: Run, base: Base, reporter: Reporter) -> tuple[Path, Path | None]:
    """Write the adapter (the EMA weights when the run keeps an EMA), the best step's adapter as --keep says, the
    validation record and plot, and the model card; (the adapter, the best step's adapter file or None)."""
    from .card import write_model_card
    from .trainable import holding

    out = run.out
    training = {
        "lr": cfg.effective_lr(),
        "prompt": cfg.prompt,
        "class_prompt": cfg.class_prompt,
        "ema": cfg.ema,
        "seed": cfg.seed,
        "resolution": cfg.resolution,
        "adapter": cfg.adapter_type,
        "prediction_type": base.prediction,
    }

    def save(path: Path, weights, steps: int) -> Path:
        with weights:
            check_finite(adapter.params().values(), "adapter")
            saved = adapter.save(path, cfg.pretrained_model, base.arch, training | {"steps": steps}, title=out.name)
        reporter.saved("adapter" if path.parent == out else "best adapter", saved)
        return saved

    choice = run.validation.choice() if run.validation is not None else None
    best = None
    if choice is not None and cfg.keep != "last":
        where = out / "adapter.safetensors" if cfg.keep == "best" else out / "best" / "adapter.safetensors"
        best = save(where, holding(adapter.params(), run.validation.best), choice.step)
    if cfg.keep == "best" and best is not None:
        path = best
    else:
        path = save(out / "adapter.safetensors", run.evaluated(), run.done)
    if run.validation is not None:  # validation.json is up to date: the run's last validation wrote it
        from .validation import FILE, plot

        reporter.saved("validation", out / FILE)
        reporter.saved("validation plot", plot(run.validation, out))
    card = write_model_card(
        out, cfg, base.arch, run.done, adapter.num_params(), run.sample_grids[-1] if run.sample_grids else None, choice
    )
    reporter.saved("model card", card)
    return path, best
