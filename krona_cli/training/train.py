"""`krona train`: the DreamBooth training loop with accelerate, for SDXL and SD 1.x/2.x.

Every random draw comes from a generator seeded by what it is for (`rng.py`): the order of the images in epoch e,
and the noise, timestep and VAE-posterior draw of the g-th sample of the run (g counts samples over the whole run:
optimizer step × global batch + position). A run resumed from a checkpoint therefore draws exactly what an
uninterrupted run draws, and the draws do not depend on how the global batch is split over processes or
gradient-accumulation steps. Image augmentation (crop, flip) is drawn per dataset item (`data.ImageSet`), so cached
latents are the latents of the same pictures the uncached path would encode.

Library code: raises KronaError, never prints; progress goes to a `Reporter`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..atomic import write_bytes_atomic
from .buckets import Bucket
from ..dtypes import DTYPES, compute_dtype
from .config import TrainConfig
from ..errors import KronaError


class TrainingInterrupted(KronaError):
    """Ctrl-C or SIGTERM: a checkpoint was saved and the message says how to resume."""

    exit_code = 130


class Reporter:
    """What a training run tells its user; the CLI draws it with rich, tests ignore it."""

    def start(self, summary: list[tuple[str, str]]) -> None: ...
    def warn(self, message: str) -> None: ...
    def class_images(self, done: int, total: int) -> None: ...
    def step(self, step: int, total: int, loss: float, lr: float) -> None: ...
    def saved(self, what: str, path: Path) -> None: ...


@dataclass
class TrainResult:
    output_dir: Path
    adapter: Path | None = None
    step: int = 0
    losses: list[float] = field(default_factory=list)  # one per optimizer step run by this call
    samples: list[Path] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)
    class_images_generated: int = 0
    summary: list[tuple[str, str]] = field(default_factory=list)
    main_process: bool = True  # the process that writes files and reports (the only one in a 1-process run)
    processes_agree: int = 0  # how many processes were checked to hold bit-identical adapter weights at the end
    bad_steps: int = 0  # steps skipped because the loss or gradients were not finite


RUN_MARKERS = ("config.yaml", "adapter.safetensors", "checkpoints")


def check_output_dir(cfg: TrainConfig) -> Path:
    """The output folder; KronaError if it holds another run and neither --resume nor --overwrite is given."""
    out = Path(cfg.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise KronaError(f"--output-dir '{out}' is a file; give a folder")
    found = [m for m in RUN_MARKERS if (out / m).exists()]
    if found and not cfg.resume and not cfg.overwrite:
        raise KronaError(
            f"--output-dir '{out}' already holds a training run ({', '.join(found)}); "
            "pass --resume latest to continue it, --overwrite to replace it, or choose another folder"
        )
    return out


class _Stop:
    """Turns the first SIGINT/SIGTERM into a flag the loop checks after each step; a second SIGINT stops at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class _Encoder:
    """Latents and prompt embeddings of dataset items, cached once or computed on demand."""

    def __init__(self, pipe, sdxl: bool, device, weight_dtype, train_text: bool, text_models):
        self.pipe, self.sdxl, self.device, self.weight_dtype = pipe, sdxl, device, weight_dtype
        self.train_text, self.text_models = train_text, text_models
        self.latents: dict[tuple[str, int, Bucket], tuple[torch.Tensor, torch.Tensor, tuple]] = {}
        self.caching = False  # with cached latents, items encoded for another bucket are kept too
        self.embeds: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        vae = pipe.vae.config
        self.scaling, self.shift = vae.scaling_factor, getattr(vae, "shift_factor", None)

    @torch.no_grad()
    def posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vae = self.pipe.vae
        dist = vae.encode(_to_device(pixels, self.device).to(vae.dtype)).latent_dist
        return dist.mean.float(), dist.std.float()

    def cache_latents(self, name: str, dataset, chunk: int = 8) -> None:
        """Encode every item of `dataset` at its own bucket, `chunk` images of one bucket at a time."""
        self.caching = True
        by_bucket: dict[Bucket, list[int]] = {}
        for i in range(len(dataset)):
            by_bucket.setdefault(dataset.bucket_of(i), []).append(i)
        for bucket, indices in by_bucket.items():
            for start in range(0, len(indices), chunk):
                self.items(name, dataset, indices[start:start + chunk], bucket)

    def items(self, name: str, dataset, indices: list[int], bucket: Bucket):
        """(posterior means, stds, time ids, captions) of dataset items at `bucket`, from the cache or encoded now."""
        captions = [dataset.captions[i % len(dataset.paths)] for i in indices]
        if not all((name, i, bucket) in self.latents for i in indices):
            examples = [dataset.example(i, bucket) for i in indices]
            mean, std = self.posterior(torch.stack([e.pixels for e in examples]))
            if not self.caching:
                return mean, std, [e.time_ids for e in examples], captions
            for i, m, s, e in zip(indices, mean, std, examples):
                self.latents[(name, i, bucket)] = (m, s, e.time_ids)
        rows = [self.latents[(name, i, bucket)] for i in indices]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]), [r[2] for r in rows], captions

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.shift) * self.scaling if self.shift is not None else z * self.scaling

    def cache_prompts(self, prompts) -> None:
        with torch.no_grad():
            for prompt in dict.fromkeys(prompts):
                embeds, pooled = self._encode([prompt])
                self.embeds[prompt] = (embeds[0], None if pooled is None else pooled[0])

    def _encode(self, prompts):
        from ..pipeline.text import encode_prompts

        tokenizers = [self.pipe.tokenizer] + ([self.pipe.tokenizer_2] if self.sdxl else [])
        return encode_prompts(tokenizers, self.text_models, prompts, self.sdxl)

    def prompts(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.train_text and all(c in self.embeds for c in captions):
            rows = [self.embeds[c] for c in captions]
            pooled = None if rows[0][1] is None else torch.stack([r[1] for r in rows])
            return torch.stack([r[0] for r in rows]), pooled
        return self._encode(captions)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device`; to a GPU through pinned memory (PyTorch's caching host allocator), without waiting."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@contextlib.contextmanager
def _models_on(device, models):
    """Move models (kept off the GPU during the loop) to `device` for a while."""
    homes = [(m, next(m.parameters()).device) for m in models]
    for m, _ in homes:
        m.to(device)
    try:
        yield
    finally:
        for m, home in homes:
            m.to(home)


_OOM_HINT = (
    "out of GPU memory; lower it with --gradient-checkpointing, --optimizer adamw8bit, --mixed-precision bf16, "
    "--cache-latents (the default), a smaller --resolution or --batch-size (with --grad-accum to keep the batch)"
)


def train(cfg: TrainConfig, reporter: Reporter | None = None) -> TrainResult:
    """Run (or, with cfg.dry_run, only check and plan) a training run; see the module docstring."""
    try:
        return _train(cfg, reporter or Reporter())
    except torch.OutOfMemoryError:
        raise KronaError(_OOM_HINT) from None


def _data_files(*datasets) -> dict[str, list[list]]:
    """What a run trains on: each image set's file names and sizes (recorded in checkpoints)."""
    return {d.what: [[p.name, p.stat().st_size] for p in d.paths] for d in datasets if d is not None}


def _check_same_data(saved: dict | None, now: dict, path: Path) -> None:
    """KronaError naming the first difference if the photos changed since a checkpoint was made."""
    if saved is None:  # a checkpoint of an older krona
        return
    for what in sorted(set(saved) | set(now)):
        before, after = dict(map(tuple, saved.get(what, []))), dict(map(tuple, now.get(what, [])))
        changes = [f"added {n}" for n in after if n not in before] + [f"removed {n}" for n in before if n not in after]
        changes += [f"changed {n}" for n in after if n in before and before[n] != after[n]]
        if changes:
            raise KronaError(
                f"the {what} images changed since checkpoint '{path}' ({', '.join(changes[:3])}); resume with the "
                "images it was trained on, or start a new run in another --output-dir"
            )


def _train(cfg: TrainConfig, reporter: Reporter) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration, set_seed

    from .checkpoint import (
        TrainingState,
        capture_rng,
        incomplete_leftovers,
        load_checkpoint,
        resolve_resume,
        restore_rng,
        save_checkpoint,
    )
    from .buckets import Schedule, histogram, spread
    from .data import ImageSet, check_images, scan_images, skipped_note, small_images_warning
    from .diffusion import draw_noise, per_sample_loss, target_for
    from .ema import EMA
    from ..pipeline.models import cast, load_pipeline
    from .priors import generate_class_images, missing_indices
    from ..pipeline.quantize import QUANTIZED, memory_estimate, quantize
    from ..inference.sampling import ModelInfo, SampleConfig, image_metadata, render, write_grid
    from .trainable import attach

    cfg.validate()
    out = check_output_dir(cfg)
    photos, _ = scan_images(cfg.instance_dir, "instance")
    photo_sizes = check_images(photos)  # every photo decoded once: a broken one fails before the model loads
    resume_from = resolve_resume(out, cfg.resume) if cfg.resume else None
    for leftover in incomplete_leftovers(out):
        reporter.warn(f"ignoring an incomplete checkpoint left by a killed run: {leftover}")
    if cfg.resume and resume_from is None:
        reporter.warn(f"--resume {cfg.resume}: no checkpoint in '{out / 'checkpoints'}' yet; starting from step 0")

    if cfg.xformers and not torch.cuda.is_available():
        raise KronaError("--xformers needs a CUDA GPU; leave it off (PyTorch's SDPA attention is the default and as fast)")
    if cfg.report_to != "none" and importlib.util.find_spec(cfg.report_to) is None:
        raise KronaError(f"--report-to {cfg.report_to} needs the {cfg.report_to} package: pip install {cfg.report_to} "
                         "(or pass --report-to none)")
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
    if not accelerator.is_main_process:
        reporter = Reporter()  # one process speaks
    set_seed(cfg.seed)
    device, weight_dtype = accelerator.device, compute_dtype(cfg.mixed_precision)

    pipe, arch = load_pipeline(cfg.pretrained_model, vae=cfg.vae, revision=cfg.revision, variant=cfg.variant)
    pipe.set_progress_bar_config(disable=True)
    sdxl = arch == "sdxl"
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise KronaError(f"the base model predicts '{prediction}'; krona trains epsilon and v-prediction models")
    resolution = cfg.effective_resolution(arch)
    text_models = [pipe.text_encoder] + ([pipe.text_encoder_2] if sdxl else [])
    compute = {"no": "fp32"}.get(cfg.mixed_precision, cfg.mixed_precision)
    base_precision = cfg.base_precision or compute
    adapted = [pipe.unet] + (text_models if cfg.train_text_encoder else [])
    for model in [pipe.unet, *text_models]:
        if model not in adapted:
            cast(model, device, weight_dtype)
        elif base_precision in QUANTIZED:
            quantize(model, base_precision, weight_dtype, device)
        else:
            cast(model, device, DTYPES[base_precision])
    cast(pipe.vae, device, torch.float32)  # the SDXL VAE overflows in fp16; latents are cached anyway
    info = ModelInfo(base_model=cfg.pretrained_model, architecture=arch, dtype=cfg.mixed_precision)

    buckets = sdxl if cfg.buckets is None else cfg.buckets
    instance = ImageSet(cfg.instance_dir, cfg.prompt, resolution, repeats=cfg.repeats, center_crop=cfg.center_crop,
                        random_flip=cfg.random_flip, seed=cfg.seed, what="instance", buckets=buckets,
                        sizes=photo_sizes)
    if instance.skipped:
        reporter.warn("skipped " + skipped_note(instance.skipped))
    small = small_images_warning(photos, photo_sizes, instance.buckets)
    if small:
        reporter.warn(small)
    prior = cfg.class_prompt is not None
    class_dir = Path(cfg.class_dir or out / "class-images").expanduser()
    to_generate = len(missing_indices(class_dir, cfg.num_class_images)) if prior else 0

    adapter = attach(pipe, cfg.adapter, cfg.targets, cfg.factors, cfg.rank, cfg.scale, cfg.train_text_encoder,
                     cfg.text_encoder_factors, cfg.strict_factors)
    params = adapter.params()
    world = accelerator.num_processes
    global_batch = cfg.batch_size * cfg.grad_accum * world
    memory = memory_estimate(adapted + ([] if cfg.cache_latents else [pipe.vae]), adapter.num_params(), cfg.optimizer,
                             cfg.ema)
    summary = [
        ("model", f"{cfg.pretrained_model} ({arch}, {prediction.replace('_', '-')})"),
        ("adapter", f"{cfg.adapter} " + (f"{cfg.factors}" if cfg.adapter == "kron" else f"rank {cfg.rank}")
         + f", targets {cfg.targets}" + (", text encoders too" if cfg.train_text_encoder else "")
         + (f"; factors fitted to the {fitted} layer(s) they do not divide (--strict-factors stops instead)"
            if (fitted := adapter.fitted_layers()) else "")),
        ("trainable parameters", f"{adapter.num_params():,}"),
        ("instance images", f"{len(instance.paths)} × {cfg.repeats} repeats, '{cfg.prompt}'"),
        ("sizes", f"aspect-ratio buckets of about {resolution}² px: {histogram(instance.buckets)}" if buckets
         else f"{resolution}×{resolution} squares"),
        ("class images", f"{cfg.num_class_images} of '{cfg.class_prompt}' in {class_dir} ({to_generate} to generate)"
         if prior else "none (no --class-prompt: prior preservation off)"),
        ("steps", f"{cfg.steps}" + (f", resuming from {resume_from.name}" if resume_from else "")),
        ("batch", f"{cfg.batch_size} per process × {cfg.grad_accum} accumulation × {world} process(es) "
                  f"= {global_batch} per step"),
        ("optimizer", f"{cfg.optimizer}, lr {cfg.effective_lr():g} ({cfg.lr_scheduler}), weight decay {cfg.weight_decay:g}"),
        ("precision", f"compute {compute}, frozen base {base_precision}, adapter weights fp32, on {device}"
         + (", gradient checkpointing" if cfg.gradient_checkpointing else "") + (", torch.compile" if cfg.compile else "")),
        ("memory (estimate)", memory),
        ("output", str(out)),
    ]
    result = TrainResult(output_dir=out, summary=summary, main_process=accelerator.is_main_process)
    reporter.start(summary)
    if cfg.dry_run:
        return result
    if cfg.overwrite and not cfg.resume and accelerator.is_main_process:
        _clear_run(out)
    accelerator.wait_for_everyone()  # every process has counted the class images before any are made
    # fresh adapters change nothing yet (B = 0), so these are the base model's images
    if prior and to_generate:
        with accelerator.autocast(), torch.no_grad():
            # made in the photos' buckets, in their proportions, so every photo's bucket has class images of its own
            sizes = [(b.height, b.width) for b in spread(instance.buckets, len(instance.buckets))]
            result.class_images_generated = len(generate_class_images(
                pipe, info, class_dir, cfg.class_prompt, cfg.num_class_images, lambda i: sizes[i % len(sizes)],
                seed=cfg.seed,
                batch_size=cfg.class_batch_size, steps=cfg.sample_steps, guidance=cfg.sample_guidance,
                progress=reporter.class_images, rank=accelerator.process_index, world=world))
        accelerator.wait_for_everyone()

    # every class image is decoded here: a broken file in a user's class folder fails now, not mid-training
    classes = ImageSet(class_dir, cfg.class_prompt, resolution, center_crop=cfg.center_crop,
                       random_flip=cfg.random_flip, seed=cfg.seed, what="class", buckets=buckets) if prior else None
    schedule = Schedule([instance.bucket_of(i) for i in range(len(instance))], global_batch, cfg.seed, "instance")
    class_schedule = None if classes is None else Schedule(classes.buckets, global_batch, cfg.seed, "class")
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            for model in text_models:
                model.gradient_checkpointing_enable()
    if cfg.xformers:
        try:
            pipe.unet.enable_xformers_memory_efficient_attention()
        except Exception as e:
            raise KronaError(f"--xformers cannot run here ({type(e).__name__}: {e}); leave it off") from None

    encoder = _Encoder(pipe, sdxl, device, weight_dtype, cfg.train_text_encoder, text_models)
    if not cfg.train_text_encoder:
        encoder.cache_prompts(list(instance.captions) + ([cfg.class_prompt] if prior else []))
    if cfg.cache_latents:
        encoder.cache_latents("instance", instance)
        if classes is not None:
            encoder.cache_latents("class", classes)
    idle = ([pipe.vae] if cfg.cache_latents else []) + ([] if cfg.train_text_encoder else text_models)
    if device.type != "cpu":
        for model in idle:
            model.to("cpu")

    optimizer = _optimizer(cfg, adapter)
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=cfg.steps)
    ema = EMA(params, cfg.ema_decay) if cfg.ema else None
    trained = list(adapter.models)
    prepared = accelerator.prepare(*[adapter.models[c] for c in trained], optimizer)
    wrapped, optimizer = dict(zip(trained, prepared[:-1])), prepared[-1]
    unet = torch.compile(wrapped["unet"]) if cfg.compile else wrapped["unet"]
    if cfg.train_text_encoder:
        encoder.text_models = [wrapped[c] for c in ("text_encoder", "text_encoder_2") if c in wrapped]

    step = 0
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        _check_same_run(cfg, state.meta, resume_from)
        saved_batch = state.meta.get("global_batch", global_batch)
        if saved_batch != global_batch:
            raise KronaError(
                f"checkpoint '{resume_from}' was trained with a global batch of {saved_batch} samples per step; this "
                f"run has {global_batch} (--batch-size {cfg.batch_size} × --grad-accum {cfg.grad_accum} × {world} "
                f"process(es)); choose --batch-size and --grad-accum so that they multiply to {saved_batch}"
            )
        _check_same_data(state.meta.get("data"), _data_files(instance, classes), resume_from)
        if set(state.params) != set(params):
            odd = sorted(set(state.params) ^ set(params))[0]
            raise KronaError(f"checkpoint '{resume_from}' does not hold the weights this run trains (e.g. '{odd}'); "
                             "resume with the settings it was made with")
        with torch.no_grad():
            for name, value in state.params.items():
                params[name].copy_(value)
        optimizer.load_state_dict(state.optimizer)
        lr_scheduler.load_state_dict(state.lr_scheduler)
        if ema is not None and state.ema is not None:
            ema.load_state_dict(state.ema)
        if state.rng is not None:
            restore_rng(state.rng)
        if accelerator.scaler is not None and "grad_scaler" in state.meta:
            accelerator.scaler.load_state_dict(state.meta["grad_scaler"])
        step = state.step

    noise_scheduler = _noise_scheduler(pipe)
    num_timesteps = noise_scheduler.config.num_train_timesteps
    sample_prompts = list(cfg.sample_prompt) or [cfg.prompt]
    sample_size = (cfg.sample_width or resolution, cfg.sample_height or resolution)
    sample_config = SampleConfig(num_images=cfg.sample_images, seed=cfg.seed, steps=cfg.sample_steps,
                                 guidance=cfg.sample_guidance, width=sample_size[0], height=sample_size[1],
                                 batch_size=cfg.sample_images)

    def save_samples(at_step: int) -> None:
        if not accelerator.is_main_process:
            return
        unet.eval()
        weights = ema.applied() if ema is not None else contextlib.nullcontext()
        with weights, _models_on(device, idle), accelerator.autocast(), torch.no_grad():
            images = render(pipe, sample_config, sample_prompts)
        unet.train()
        meta = image_metadata(sample_config, info, *sample_size) | {"step": str(at_step)}
        path = write_grid(out / "samples" / f"step-{at_step:06d}.png", images, sample_prompts,
                          sample_config.seeds(), meta)
        result.samples.append(path)
        reporter.saved("samples", path)

    def checkpoint(at_step: int) -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _check_finite(params.values(), "adapter")
            meta = {"config": cfg.to_dict(), "config_hash": cfg.config_hash(), "krona_version": __version__,
                    "global_batch": global_batch, "processes": world, "data": _data_files(instance, classes)}
            if accelerator.scaler is not None:
                meta["grad_scaler"] = accelerator.scaler.state_dict()
            state = TrainingState(
                step=at_step,
                params={k: v.detach() for k, v in params.items()},
                optimizer=optimizer.state_dict(),
                lr_scheduler=lr_scheduler.state_dict(),
                ema=None if ema is None else ema.state_dict(),
                rng=capture_rng(),
                meta=meta,
            )
            path = save_checkpoint(out, state, keep=cfg.keep_checkpoints or None)
            result.checkpoints.append(path)
            reporter.saved("checkpoint", path)
        accelerator.wait_for_everyone()

    def micro_batch(at_step: int, micro: int):
        offset = (micro * world + accelerator.process_index) * cfg.batch_size
        first = at_step * global_batch + offset  # the run's index of this micro-batch's first sample
        bucket, earlier = schedule.step(at_step)
        batches = [("instance", instance, schedule.take(bucket, earlier))]
        if class_schedule is not None:
            # the class images of the photos' bucket, else any class images, resized and cropped to that bucket
            batches.append(("class", classes, class_schedule.take(bucket, earlier) or class_schedule.take_any(at_step)))
        means, stds, noises, posterior_draws, steps, times, captions = [], [], [], [], [], [], []
        for name, dataset, items in batches:
            mean, std, time_ids, caps = encoder.items(name, dataset, items[offset:offset + cfg.batch_size], bucket)
            means.append(mean)
            stds.append(std)
            for g in range(first, first + cfg.batch_size):
                noise, t, eps = draw_noise(tuple(mean.shape[1:]), num_timesteps, cfg.noise_offset, "noise", name,
                                           cfg.seed, g)
                noises.append(noise)
                posterior_draws.append(eps)
                steps.append(t)
            times += time_ids
            captions += caps
        # the draws are made on the CPU (the same numbers on any device) and go over in one copy
        noise, eps = _to_device(torch.stack([torch.stack(noises), torch.stack(posterior_draws)]), device)
        latents = encoder.scale(torch.cat(means) + torch.cat(stds) * eps)
        return (latents, noise, torch.tensor(steps, device=device),
                torch.tensor(times, device=device, dtype=weight_dtype), captions)

    def micro_loss(at_step: int, micro: int) -> torch.Tensor:
        latents, noise, timesteps, time_ids, captions = micro_batch(at_step, micro)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        embeds, pooled = encoder.prompts(captions)
        extra = {"added_cond_kwargs": {"text_embeds": pooled.to(weight_dtype), "time_ids": time_ids}} if sdxl else {}
        with accelerator.autocast():
            prediction = unet(noisy.to(weight_dtype), timesteps, embeds.to(weight_dtype), **extra).sample
        losses = per_sample_loss(noise_scheduler, prediction, target_for(noise_scheduler, latents, noise, timesteps),
                                 timesteps, cfg.snr_gamma)
        n = cfg.batch_size
        loss = losses[:n].mean()
        if classes is not None:
            loss = loss + cfg.prior_loss_weight * losses[n:].mean()
        return loss

    for model in adapter.models.values():
        model.train()
    progress_done, bad_in_row = False, 0
    try:
        with _Stop() as stop:  # from here on, Ctrl-C or SIGTERM ends the run with a checkpoint
            if accelerator.is_main_process:
                write_bytes_atomic(out / "config.yaml", cfg.to_yaml().encode())
                tracker_config = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                  for k, v in cfg.to_dict().items()}
                accelerator.init_trackers("krona", config=tracker_config)
            while step < cfg.steps:
                total = torch.zeros((), device=device)
                for micro in range(cfg.grad_accum):
                    last = micro == cfg.grad_accum - 1
                    with contextlib.ExitStack() as sync:
                        if not last:
                            for model in wrapped.values():
                                sync.enter_context(accelerator.no_sync(model))
                        loss = micro_loss(step, micro)
                        accelerator.backward(loss / cfg.grad_accum)
                    total += loss.detach().float() / cfg.grad_accum
                # the step's one wait for the GPU: the loss and whether it or any gradient is non-finite, from every
                # process at once (fp16: the gradient scaler itself skips steps with overflowing gradients)
                finite = torch.isfinite(total)
                grads = [p.grad for p in params.values() if p.grad is not None]
                if accelerator.scaler is None and grads:
                    finite &= torch.isfinite(torch.nn.utils.get_total_norm(grads))
                loss_sum, bad = accelerator.reduce(torch.stack([total, (~finite).float()]), "sum").tolist()
                if bad > 0:
                    optimizer.zero_grad(set_to_none=True)
                    result.bad_steps += 1
                    bad_in_row += 1
                    reporter.warn(f"step {step + 1}: the loss or gradients are not finite; step skipped "
                                  f"({bad_in_row} in a row, at most {cfg.max_bad_steps})")
                    if bad_in_row >= cfg.max_bad_steps:
                        raise KronaError(
                            f"the loss or gradients were not finite for {bad_in_row} steps in a row (up to step "
                            f"{step + 1}); likely causes: fp16 overflow (use --mixed-precision bf16 or no, or an "
                            "fp16-safe --vae) or a learning rate too high (lower --lr); the adapter was not saved, "
                            "the last checkpoint is intact"
                        )
                else:
                    bad_in_row = 0
                    if cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
                    optimizer.step()
                    if not accelerator.optimizer_step_was_skipped:
                        lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    if ema is not None:
                        ema.update()
                step += 1
                loss_value = loss_sum / world
                lr = lr_scheduler.get_last_lr()[0]
                result.losses.append(loss_value)
                accelerator.log({"loss": loss_value, "lr": lr}, step=step)
                reporter.step(step, cfg.steps, loss_value, lr)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                    checkpoint(step)
                if cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.steps:
                    save_samples(step)
                if stop.requested:
                    if not result.checkpoints or result.checkpoints[-1].name != f"step-{step:06d}":
                        checkpoint(step)
                    raise TrainingInterrupted(
                        f"stopped at step {step} of {cfg.steps}; checkpoint saved. Resume with: "
                        f"krona train --config {out / 'config.yaml'} --resume latest"
                    )
        checkpoint(step)
        save_samples(step)
        result.processes_agree = _check_processes_agree(accelerator, params)
        progress_done = True
    finally:
        for tracker in accelerator.trackers:  # not end_training(): it also ends the process group
            tracker.finish()
    if progress_done and accelerator.is_main_process:
        result.adapter = _save_final(cfg, adapter, ema, out, arch, prediction, step, result, reporter)
    result.step = step
    accelerator.wait_for_everyone()
    return result


def _check_finite(tensors, what: str) -> None:
    """KronaError instead of saving non-finite weights."""
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise KronaError(f"the {what} holds non-finite values and was not saved; lower --lr or use --mixed-precision "
                         "bf16, and resume from the last checkpoint")


def _check_processes_agree(accelerator, params: dict[str, torch.Tensor]) -> int:
    """Compare a SHA-256 of every process's adapter weights; return the process count, raise if any differs."""
    import hashlib

    digest = hashlib.sha256()
    for value in params.values():
        digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    mine = torch.frombuffer(bytearray(digest.digest()), dtype=torch.int64).to(accelerator.device)
    everyone = accelerator.gather(mine).reshape(accelerator.num_processes, -1)
    if not bool((everyone == everyone[0]).all()):
        raise RuntimeError("the training processes ended with different adapter weights (a bug: please report it)")
    return accelerator.num_processes


def _clear_run(out: Path) -> None:
    """--overwrite: remove the earlier run's adapter, checkpoints and samples (its class images are kept for reuse)."""
    import shutil

    for name in ("checkpoints", "samples"):
        shutil.rmtree(out / name, ignore_errors=True)
    (out / "adapter.safetensors").unlink(missing_ok=True)


def _optimizer(cfg: TrainConfig, adapter):
    groups = [{"params": [p for n, p in adapter.params().items() if n.startswith("unet.")], "lr": cfg.effective_lr()}]
    text = [p for n, p in adapter.params().items() if not n.startswith("unet.")]
    if text:
        groups.append({"params": text, "lr": cfg.effective_text_encoder_lr()})
    if cfg.optimizer == "adamw8bit":
        from ..pipeline.quantize import import_bitsandbytes

        return import_bitsandbytes("--optimizer adamw8bit").optim.AdamW8bit(groups, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def _noise_scheduler(pipe):
    """The DDPM training scheduler with the base model's own beta schedule and prediction type."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def _check_same_run(cfg: TrainConfig, meta: dict, path: Path) -> None:
    """KronaError naming the settings that differ if a checkpoint was made with other run-defining settings."""
    if meta.get("config_hash") in (None, cfg.config_hash()):
        return
    import dataclasses

    from .config import load_config

    saved = load_config(None, {k.replace("-", "_"): v for k, v in meta.get("config", {}).items()})
    differ = [
        f.name.replace("_", "-")
        for f in dataclasses.fields(cfg)
        if dataclasses.replace(saved, **{f.name: getattr(cfg, f.name)}).config_hash() != saved.config_hash()
    ]
    raise KronaError(
        f"checkpoint '{path}' belongs to a run with other settings ({', '.join(differ) or 'unknown'}); resume with the "
        "settings it was made with (its config.yaml), or start a new run in another --output-dir"
    )


def _save_final(cfg, adapter, ema, out: Path, arch: str, prediction: str, step: int, result: TrainResult,
                reporter: Reporter) -> Path:
    from .card import write_model_card

    training = {"steps": step, "lr": cfg.effective_lr(), "prompt": cfg.prompt, "class_prompt": cfg.class_prompt,
                "ema": cfg.ema, "seed": cfg.seed, "resolution": cfg.resolution, "adapter": cfg.adapter,
                "prediction_type": prediction}
    weights = ema.applied() if ema is not None else contextlib.nullcontext()
    with weights:
        _check_finite(adapter.params().values(), "adapter")
        path = adapter.save(out / "adapter.safetensors", cfg.pretrained_model, arch, training, title=out.name)
    reporter.saved("adapter", path)
    card = write_model_card(out, cfg, arch, step, adapter.num_params(), result.samples[-1] if result.samples else None)
    reporter.saved("model card", card)
    return path
