"""One training run between its steps: `Run` holds the loop's state (adapter weights, optimizer, scheduler, EMA,
step count) and says what one step does (`batch`, `loss`, `step`), what a grid of samples is (`samples`), what a
validation records (`validate`) and what a checkpoint holds (`state`, and `restore`, its inverse, beside it).

Every random draw comes from a generator seeded by what it is for (`rng.py`): the order of the images in epoch e,
and the noise, timestep and VAE-posterior draw of the g-th sample of the run (g counts samples over the whole run:
optimizer step × global batch + position, `batch_indices`). A run resumed from a checkpoint therefore draws exactly
what an uninterrupted run draws, and the draws do not depend on how the global batch is split over processes or
gradient-accumulation steps. Image augmentation (crop, flip) is drawn per dataset item (`data.ImageSet`), so cached
latents are the latents of the same pictures the uncached path would encode.

Library code: raises KronaError, never prints; progress goes to the reporter (`train.Reporter`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__, stopping
from ..errors import KronaError
from ..families.prompts import Conditioning
from .buckets import Bucket, Schedule
from .checkpoint import TrainingState, capture_rng, restore_rng, save_checkpoint
from .config import TrainConfig
from .data import ImageSet
from .ema import EMA
from .optimizers import evaluation_weights
from .trainable import holding


def batch_indices(
    at_step: int, micro: int, process: int, world: int, batch_size: int, grad_accum: int
) -> tuple[range, range]:
    """(positions in step `at_step`'s global batch, the run's sample indices) of what process `process` of `world`
    trains on in micro-batch `micro`. The global batch (batch_size × grad_accum × world samples) is cut into
    micro-batch-major, process-minor slices, so every sample index of a step is taken exactly once, and sample g is
    the same item with the same draws whatever the process count and accumulation."""
    offset = (micro * world + process) * batch_size
    first = at_step * batch_size * grad_accum * world + offset  # the run's index of this micro-batch's first sample
    return range(offset, offset + batch_size), range(first, first + batch_size)


@dataclass
class Data:
    """What a run trains on: the photos, the class images (prior preservation) and which items each step takes."""

    instance: ImageSet
    classes: ImageSet | None
    schedule: Schedule
    class_schedule: Schedule | None

    def files(self) -> dict[str, list[list]]:
        """Each image set's file names and sizes (recorded in checkpoints)."""
        return {
            d.what: [[p.name, p.stat().st_size] for p in d.paths]
            for d in (self.instance, self.classes)
            if d is not None
        }


@dataclass
class Sampling:
    """The grid of samples a run draws now and then: the pipeline, its settings and the models kept off the GPU."""

    pipe: Any
    config: Any  # inference.sampling.SampleConfig
    prompts: list[str]
    info: Any  # inference.sampling.ModelInfo
    size: tuple[int, int]  # (width, height)
    idle: list[nn.Module]  # models that leave the GPU during the loop (frozen text encoders, the VAE when cached)


class Encoder:
    """Latents and prompt embeddings of dataset items, cached once or computed on demand."""

    def __init__(self, pipe, family, device, weight_dtype, train_text: bool, text_models):
        self.pipe, self.family, self.device, self.weight_dtype = pipe, family, device, weight_dtype
        self.train_text, self.text_models = train_text, text_models
        self.own_text_models = list(text_models)  # the modules themselves, whatever accelerate wraps them in later
        self.latents: dict[tuple[str, int, Bucket], tuple[torch.Tensor, torch.Tensor, tuple]] = {}
        self.caching = False  # with cached latents, items encoded for another bucket are kept too
        self.embeds: dict[str, Conditioning] = {}

    @torch.no_grad()
    def posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vae = self.pipe.vae
        dist = self.family.encode_pixels(vae, to_device(pixels, self.device).to(vae.dtype))
        return dist.mean.float(), dist.std.float()

    def cache_latents(self, name: str, dataset, chunk: int = 8) -> None:
        """Encode every item of `dataset` at its own bucket, `chunk` images of one bucket at a time."""
        self.caching = True
        by_bucket: dict[Bucket, list[int]] = {}
        for i in range(len(dataset)):
            by_bucket.setdefault(dataset.bucket_of(i), []).append(i)
        for bucket, indices in by_bucket.items():
            for start in range(0, len(indices), chunk):
                stopping.check()  # a stop request is answered between chunks
                self.items(name, dataset, indices[start : start + chunk], bucket)

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
        """VAE latents as the denoiser reads them (the family says how)."""
        return self.family.normalise_latents(self.pipe.vae, z)

    def cache_prompts(self, prompts) -> None:
        with torch.no_grad():
            for prompt in dict.fromkeys(prompts):
                self.embeds[prompt] = self._encode([prompt]).row(0)

    def _encode(self, prompts, text_models=None) -> Conditioning:
        tokenizers = self.family.tokenizers(self.pipe)
        return self.family.encode_prompts(tokenizers, text_models or self.text_models, prompts)

    def prompts(self, captions: list[str], unwrapped: bool = False) -> Conditioning:
        """The conditioning of captions; `unwrapped`: from the pipeline's own text encoders rather than accelerate's
        wrappers of trained ones (for a forward pass in one process alone)."""
        if not self.train_text and all(c in self.embeds for c in captions):
            return Conditioning.stack([self.embeds[c] for c in captions])
        return self._encode(captions, self.own_text_models if unwrapped else None)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
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


@dataclass
class Run:
    """The loop's state and what one step of it does. `done` counts the optimizer steps behind it (the checkpoint's
    step); `losses`, `sample_grids`, `checkpoints` and `bad_steps` record what this process did since it started."""

    cfg: TrainConfig
    accelerator: Any
    models: dict[str, nn.Module]  # the adapted models as accelerate prepared them, by component
    denoiser: nn.Module  # the adapted denoiser as accelerate prepared it, compiled with --compile
    params: dict[str, nn.Parameter]  # the trainable weights by name (`TrainableAdapter.params`)
    optimizer: Any
    lr_scheduler: Any
    ema: EMA | None
    objective: Any  # families/ddpm.py's DDPM, families/flow_match.py's FlowMatch
    encoder: Encoder
    data: Data
    sampling: Sampling
    out: Path
    reporter: Any  # train.Reporter
    validation: Any = None  # validation.History, with --validate-every
    scorer: Any = None  # validation.Scorer, with --scorer
    done: int = 0
    bad_in_row: int = 0
    bad_steps: int = 0
    losses: list[float] = field(default_factory=list)
    sample_grids: list[Path] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)
    last_checkpoint: int | None = None  # the step of the newest checkpoint this run saved or resumed from
    stop_agreed: bool = False  # whether any process had a stop request at the last step (`step`, `check_stop`)

    def __post_init__(self):
        self.world = self.accelerator.num_processes
        self.global_batch = self.cfg.batch_size * self.cfg.grad_accum * self.world
        self.device = self.accelerator.device
        self.weight_dtype = self.encoder.weight_dtype

    # --- one step ---------------------------------------------------------------------------------------------------

    def batch(self, micro: int):
        """(latents, noise, timesteps, time ids, captions) of this process's micro-batch `micro` of the next step:
        the instance items, then the class items, each sample with the draws of its index in the run."""
        cfg, at_step = self.cfg, self.done
        positions, samples = batch_indices(
            at_step, micro, self.accelerator.process_index, self.world, cfg.batch_size, cfg.grad_accum
        )
        bucket, earlier = self.data.schedule.step(at_step)
        batches = [("instance", self.data.instance, self.data.schedule.take(bucket, earlier))]
        if self.data.class_schedule is not None:
            # the class images of the photos' bucket, else any class images, resized and cropped to that bucket
            classes = self.data.class_schedule
            batches.append(("class", self.data.classes, classes.take(bucket, earlier) or classes.take_any(at_step)))
        means, stds, noises, posterior_draws, steps, times, captions = [], [], [], [], [], [], []
        for name, dataset, items in batches:
            mean, std, time_ids, caps = self.encoder.items(
                name, dataset, items[positions.start : positions.stop], bucket
            )
            means.append(mean)
            stds.append(std)
            for g in samples:
                noise, t, eps = self.objective.draw(tuple(mean.shape[1:]), cfg.noise_offset, "noise", name, cfg.seed, g)
                noises.append(noise)
                posterior_draws.append(eps)
                steps.append(t)
            times += time_ids
            captions += caps
        # the draws are made on the CPU (the same numbers on any device) and go over in one copy
        noise, eps = to_device(torch.stack([torch.stack(noises), torch.stack(posterior_draws)]), self.device)
        latents = self.encoder.scale(torch.cat(means) + torch.cat(stds) * eps)
        return (
            latents,
            noise,
            torch.tensor(steps, device=self.device),
            torch.tensor(times, device=self.device, dtype=self.weight_dtype),
            captions,
        )

    def loss(self, micro: int) -> torch.Tensor:
        """The denoising loss of micro-batch `micro` (plus the weighted prior loss on the class items)."""
        cfg, objective, family = self.cfg, self.objective, self.encoder.family
        latents, noise, timesteps, time_ids, captions = self.batch(micro)
        noisy = objective.noisy(latents, noise, timesteps)
        cond = self.encoder.prompts(captions)
        with self.accelerator.autocast():
            at = objective.model_timesteps(timesteps)
            prediction = family.denoise(self.denoiser, noisy, at, cond, time_ids, self.weight_dtype)
        prediction = objective.output(prediction, noisy, timesteps)
        target = objective.target(latents, noise, timesteps)
        losses = objective.per_sample_loss(prediction, target, timesteps, cfg.snr_gamma)
        n = cfg.batch_size
        loss = losses[:n].mean()
        if self.data.classes is not None:
            loss = loss + cfg.prior_loss_weight * losses[n:].mean()
        return loss

    def step(self) -> tuple[float, float]:
        """One optimizer step over the global batch; (its loss averaged over the processes, the learning rate).

        A step whose loss or gradients are not finite changes no weight; it is counted, reported, and
        `cfg.max_bad_steps` of them in a row stop the run."""
        cfg, accelerator = self.cfg, self.accelerator
        total = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum):
            with contextlib.ExitStack() as sync:
                if micro != cfg.grad_accum - 1:
                    for model in self.models.values():
                        sync.enter_context(accelerator.no_sync(model))
                loss = self.loss(micro)
                accelerator.backward(loss / cfg.grad_accum)
            total += loss.detach().float() / cfg.grad_accum
        # the step's one wait for the GPU: the loss and whether it or any gradient is non-finite, from every
        # process at once (fp16: the gradient scaler itself skips steps with overflowing gradients)
        finite = torch.isfinite(total)
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        if accelerator.scaler is None and grads:
            finite &= torch.isfinite(torch.nn.utils.get_total_norm(grads))
        # ... and whether any process was asked to stop, so that all stop after the same step
        stop = torch.full((), float(stopping.requested()), device=self.device)
        loss_sum, bad, stops = accelerator.reduce(torch.stack([total, (~finite).float(), stop]), "sum").tolist()
        self.stop_agreed = stops > 0
        if bad > 0:
            self._skip()
        else:
            self.bad_in_row = 0
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(list(self.params.values()), cfg.max_grad_norm)
            self.optimizer.step()
            if not accelerator.optimizer_step_was_skipped:
                self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                self.ema.update()
        self.done += 1
        self.losses.append(loss_sum / self.world)
        return self.losses[-1], self.lr_scheduler.get_last_lr()[0]

    def check_stop(self) -> None:
        """Raise `stopping.StopRequest` when a stop was requested: in one process when this one has a request, in
        several when any had one at the last step's reduction (then all stop after the same step)."""
        if self.world == 1:
            stopping.check()
        elif self.stop_agreed:
            raise stopping.StopRequest()

    def _skip(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_steps += 1
        self.bad_in_row += 1
        self.reporter.warn(skipped_step(self.done + 1, self.bad_in_row, self.cfg.max_bad_steps))
        if self.bad_in_row >= self.cfg.max_bad_steps:
            raise KronaError(too_many_bad_steps(self.done + 1, self.bad_in_row))

    # --- what the run shows and keeps -------------------------------------------------------------------------------

    def _averaged(self) -> dict[str, torch.Tensor] | None:
        """The averaged weights the run is judged by, by name: the EMA's when the run keeps one, schedule-free
        AdamW's (`optimizers.evaluation_weights`); None when they are the training weights."""
        return self.ema.shadow() if self.ema is not None else evaluation_weights(self.optimizer, self.params)

    def evaluation_weights(self) -> dict[str, torch.Tensor]:
        """The weights samples, validation and the saved adapter use, by name (`_averaged`, else the training
        weights)."""
        return self._averaged() or dict(self.params)

    def evaluated(self):
        """A context in which the params hold `evaluation_weights()`; the training weights come back on exit (and
        nothing is copied where they are the training weights)."""
        averaged = self._averaged()
        return contextlib.nullcontext() if averaged is None else holding(self.params, averaged)

    def samples(self) -> dict | None:
        """Write the grid of samples at this step (main process), with the evaluation weights; return its images by
        (prompt index, seed) (None in the other processes)."""
        if not self.accelerator.is_main_process:
            return None
        from ..inference.sampling import image_metadata, render, write_grid

        s = self.sampling
        self.denoiser.eval()
        weights = self.evaluated()
        # a stop request is answered at a sampler step (in one process: in several, after the next training step)
        checks = stopping.deferred(checks=self.world == 1)
        try:
            with checks, weights, _models_on(self.device, s.idle), self.accelerator.autocast(), torch.no_grad():
                images = render(s.pipe, s.config, s.prompts)
        finally:
            self.denoiser.train()
        meta = image_metadata(s.config, s.info, *s.size) | {"step": str(self.done)}
        path = write_grid(self.grid_path(), images, s.prompts, s.config.seeds(), meta)
        self.sample_grids.append(path)
        self.reporter.saved("samples", path)
        return images

    def grid_path(self) -> Path:
        """The sample grid of the step the run stands at."""
        return self.out / "samples" / f"step-{self.done:06d}.png"

    def validate(self, images: dict | None) -> None:
        """A validation at this step (main process; `validation.py`): the validation losses and, with a scorer,
        the scores of the sample grid just drawn (`images`), with the weights a saved adapter would hold
        (`evaluation_weights`); the history and validation.json are brought up to date."""
        if not self.accelerator.is_main_process:
            return
        from .validation import CLASS_ITEMS, validation_loss

        # the module itself: no process-group wrapper in one process
        cfg, denoiser = self.cfg, getattr(self.sampling.pipe, self.encoder.family.denoiser)

        def loss(dataset, what, count):
            return validation_loss(
                denoiser,
                self.encoder,
                self.objective,
                dataset,
                what,
                count,
                cfg.seed,
                cfg.snr_gamma,
                self.accelerator.autocast,
                lambda captions: self.encoder.prompts(captions, unwrapped=True),
            )

        denoiser.eval()
        # a stop request is answered between its parts (in one process: in several, after the next training step)
        with stopping.deferred(checks=self.world == 1):
            try:
                with self.evaluated():
                    point = {
                        "step": self.done,
                        "instance_loss": loss(self.data.instance, "instance", len(self.data.instance)),
                    }
                    stopping.check()
                    point["class_loss"] = (
                        None if self.data.classes is None else loss(self.data.classes, "class", CLASS_ITEMS)
                    )
            finally:
                denoiser.train()
            stopping.check()
        if images is not None and self.scorer is not None:
            prompts, seeds = self.sampling.prompts, self.sampling.config.seeds()
            order = [(j, seed) for j in range(len(prompts)) for seed in seeds]
            point |= self.scorer([images[k] for k in order], [prompts[j] for j, _ in order])
            point["grid"] = self.sample_grids[-1].relative_to(self.out).as_posix()
        self.validation.add(point, self.evaluation_weights)
        self.validation.write(self.out, cfg.scorer)
        scalars = {f"validation/{k}": v for k, v in point.items() if isinstance(v, float)}
        self.accelerator.log(scalars, step=self.done)
        self.reporter.validated(self.done, point)

    def checkpoint(self) -> None:
        """Save `state()` as checkpoint `step-N` (main process; every process waits for it)."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            check_finite(self.params.values(), "adapter")
            path = save_checkpoint(self.out, self.state(), keep=self.cfg.keep_checkpoints or None)
            self.checkpoints.append(path)
            self.reporter.saved("checkpoint", path)
        self.last_checkpoint = self.done
        self.accelerator.wait_for_everyone()

    def state(self) -> TrainingState:
        """What a checkpoint holds: everything `restore` needs to continue this run exactly."""
        cfg, scaler = self.cfg, self.accelerator.scaler
        meta = {
            "config": cfg.to_dict(),
            "config_hash": cfg.config_hash(),
            "krona_version": __version__,
            "global_batch": self.global_batch,
            "processes": self.world,
            "data": self.data.files(),
        }
        if scaler is not None:
            meta["grad_scaler"] = scaler.state_dict()
        return TrainingState(
            step=self.done,
            params={k: v.detach() for k, v in self.params.items()},
            optimizer=self.optimizer.state_dict(),
            lr_scheduler=self.lr_scheduler.state_dict(),
            ema=None if self.ema is None else self.ema.state_dict(),
            rng=capture_rng(),
            meta=meta,
            validation=None if self.validation is None else self.validation.state(),
        )

    def restore(self, state: TrainingState, path: Path) -> None:
        """Continue from `state` (read from checkpoint `path`); KronaError if it is another run's."""
        _check_same_run(self.cfg, state.meta, path)
        saved_batch = state.meta.get("global_batch", self.global_batch)
        if saved_batch != self.global_batch:
            raise KronaError(other_global_batch(path, saved_batch, self.global_batch, self.cfg, self.world))
        _check_same_data(state.meta.get("data"), self.data.files(), path)
        if set(state.params) != set(self.params):
            odd = min(set(state.params) ^ set(self.params))
            raise KronaError(
                f"checkpoint '{path}' does not hold the weights this run trains (e.g. '{odd}'); "
                "resume with the settings it was made with"
            )
        with torch.no_grad():
            for name, value in state.params.items():
                self.params[name].copy_(value)
        self.optimizer.load_state_dict(state.optimizer)
        self.lr_scheduler.load_state_dict(state.lr_scheduler)
        if self.ema is not None and state.ema is not None:
            self.ema.load_state_dict(state.ema)
        if state.rng is not None:
            restore_rng(state.rng)
        if self.validation is not None and state.validation is not None:
            self.validation.restore(state.validation)
        if self.accelerator.scaler is not None and "grad_scaler" in state.meta:
            self.accelerator.scaler.load_state_dict(state.meta["grad_scaler"])
        self.done = self.last_checkpoint = state.step

    def processes_agree(self) -> int:
        """Compare a SHA-256 of every process's adapter weights; return the process count, raise if any differs."""
        import hashlib

        digest = hashlib.sha256()
        for value in self.params.values():
            digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        mine = torch.frombuffer(bytearray(digest.digest()), dtype=torch.int64).to(self.device)
        everyone = self.accelerator.gather(mine).reshape(self.world, -1)
        if not bool((everyone == everyone[0]).all()):
            raise RuntimeError("the training processes ended with different adapter weights (a bug: please report it)")
        return self.world


def check_finite(tensors, what: str) -> None:
    """KronaError instead of saving non-finite weights."""
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise KronaError(
            f"the {what} holds non-finite values and was not saved; lower --lr or use --mixed-precision "
            "bf16, and resume from the last checkpoint"
        )


def skipped_step(step: int, in_row: int, limit: int) -> str:
    return f"step {step}: the loss or gradients are not finite; step skipped ({in_row} in a row, at most {limit})"


def too_many_bad_steps(step: int, in_row: int) -> str:
    return (
        f"the loss or gradients were not finite for {in_row} steps in a row (up to step {step}); likely causes: "
        "fp16 overflow (use --mixed-precision bf16 or no, or an fp16-safe --vae) or a learning rate too high "
        "(lower --lr); the adapter was not saved, the last checkpoint is intact"
    )


def other_global_batch(path: Path, saved: int, now: int, cfg: TrainConfig, world: int) -> str:
    return (
        f"checkpoint '{path}' was trained with a global batch of {saved} samples per step; this run has {now} "
        f"(--batch-size {cfg.batch_size} × --grad-accum {cfg.grad_accum} × {world} process(es)); choose "
        f"--batch-size and --grad-accum so that they multiply to {saved}"
    )


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
