"""`krona train` settings: one dataclass, its YAML form, validation whose errors name the flag, and the typer options.

Every setting is a kebab-case flag (`--lr-scheduler`) and the same key of a YAML config file (`lr-scheduler:`;
snake_case keys work too). `load_config` applies defaults, then the file (or a preset from configs/), then the flags.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import inspect
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import typer
import yaml

from ..errors import KronaError
from ..families import in_words, titles
from ..kron.factors import INITS
from ..paths import expand
from .optimizers import OPTIMIZERS, default_lr
from .optimizers import check as check_optimizer

# torch-importing modules (kron, models) are imported where needed: the cli imports this module for every command.

CONFIG_PRESETS = ("sdxl", "sd15", "tiny", "toy")


# --drop-t5 of train and sample
DROP_T5 = (
    "Leave out the T5 text encoder of a model that can do without it ("
    + titles(lambda family: bool(family.optional_text))
    + "): its part of the prompt states is zeros, as the model's pipeline gives them without it. Less memory, "
    "weaker prompt following."
)


def drop_t5_flag(drop_t5: bool) -> str:
    """The ` --drop-t5` the printed sample and merge commands carry where training left T5 out."""
    return " --drop-t5" if drop_t5 else ""


# flow-matching weighting schemes (families/flow_match.py's WEIGHTINGS, without importing torch for --help)
WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")


def _opt(default: Any, help: str, **rules: Any) -> Any:
    """A setting: its default, its --help text and its rules (choices; min, above, below: bounds; unset: what None
    means, shown as the default)."""
    if isinstance(default, list):
        return field(default_factory=default.copy, metadata={"help": help, **rules})
    return field(default=default, metadata={"help": help, **rules})


@dataclass
class TrainConfig:
    """Everything `krona train` needs; field order is the order of `krona train --help`."""

    # model
    pretrained_model: str = _opt(
        "stabilityai/stable-diffusion-xl-base-1.0",
        "Base model: hub id, local diffusers folder or single .safetensors file.",
    )
    vae: Optional[str] = _opt(
        None, "Another VAE (folder or hub id), e.g. madebyollin/sdxl-vae-fp16-fix.", unset="the base model's"
    )
    transformer: Optional[str] = _opt(
        None,
        "FLUX.1 only: one transformer .safetensors (Black Forest Labs', ComfyUI's or diffusers' layout) in place of "
        "the base's own.",
        unset="the base model's",
    )
    revision: Optional[str] = _opt(None, "Hub revision (branch, tag or commit) of the base model.", unset="main")
    variant: Optional[str] = _opt(None, "Weight file variant of the base model, e.g. fp16.", unset="the full files")
    drop_t5: bool = _opt(False, DROP_T5)
    # data
    instance_dir: Optional[str] = _opt(
        None, "Folder of photos of the subject (captions: same-named .txt files).", unset="required"
    )
    prompt: Optional[str] = _opt(
        None, "Instance prompt naming the subject, e.g. 'a photo of sks dog'.", unset="required"
    )
    repeats: int = _opt(1, "Times each photo appears per epoch.", min=1)
    resolution: Optional[int] = _opt(
        None, "Training image size in pixels (a multiple of 8).", unset="1024 for SDXL, 512 otherwise", min=8
    )
    center_crop: bool = _opt(False, "Crop the centre of each photo instead of a random window.")
    random_flip: bool = _opt(False, "Mirror photos horizontally at random.")
    buckets: Optional[bool] = _opt(
        None,
        "Train each photo at the aspect-ratio bucket nearest its own (about "
        "resolution² pixels, sides multiples of 64) instead of a square crop.",
        unset="on for SDXL, off otherwise",
    )
    # prior preservation
    class_prompt: Optional[str] = _opt(
        None, "Class prompt, e.g. 'a photo of a dog'; turns prior preservation on.", unset="none, no prior preservation"
    )
    class_dir: Optional[str] = _opt(
        None, "Folder of class images (missing ones are generated).", unset="<output-dir>/class-images"
    )
    num_class_images: int = _opt(100, "Class images to use (and generate where the folder has fewer).", min=0)
    prior_loss_weight: float = _opt(1.0, "Weight of the class images' loss.", min=0)
    class_batch_size: int = _opt(4, "Images per pipeline call when generating class images.", min=1)
    # adapter
    adapter_type: str = _opt(
        "kron",
        "Adapter type: Kronecker product, the LoRA baseline, or peft's LoKr layers (a Kronecker cross-check, square "
        "factors).",
        choices=("kron", "lora", "lokr"),
    )
    factors: str = _opt("64x4", "Kronecker factor A's size OxI (output side x input side), fitted per layer.")
    strict_factors: bool = _opt(False, "Stop where the factors do not divide a layer, instead of fitting them to it.")
    kron_init: str = _opt(
        "normal",
        "How factor A starts: normal (DiffuseKronA's, std 1/a_out) or invariant (std sqrt(a_out·a_in)/16: the "
        "best lr stays put when --factors changes; docs/fidelity.md), kaiming or xavier.",
        choices=INITS,
    )
    rank: int = _opt(4, "LoRA rank (with --adapter-type lora).", min=1)
    scale: float = _opt(1.0, "Adapter scale s in W + s·ΔW.")
    targets: str = _opt(
        "attn",
        "Layers to adapt: attn (UNet attention q/k/v/out), attn-ff (plus feed-forward) or a "
        "regular expression over module names.",
    )
    train_text_encoder: bool = _opt(False, "Adapt the text encoders' attention too.")
    text_encoder_lr: Optional[float] = _opt(None, "Learning rate of the text-encoder adapters.", unset="--lr", above=0)
    text_encoder_factors: Optional[str] = _opt(None, "Factors of the text-encoder adapters.", unset="--factors")
    # optimisation
    steps: int = _opt(1000, "Optimisation steps.", min=1)
    lr: Optional[float] = _opt(
        None,
        "Learning rate (prodigy: a multiplier of its own estimate).",
        unset="5e-4 for kron, 1e-4 for lora, 1 for prodigy",
        above=0,
    )
    lr_scheduler: str = _opt(
        "constant",
        "Learning-rate schedule.",
        choices=("constant", "constant_with_warmup", "cosine", "linear", "polynomial"),
    )
    lr_warmup_steps: int = _opt(0, "Warm-up steps of the schedule.", min=0)
    batch_size: int = _opt(1, "Images per step on each process.", min=1)
    grad_accum: int = _opt(1, "Batches accumulated per optimisation step.", min=1)
    optimizer: str = _opt(
        "adamw",
        "Optimizer: adamw, adamw8bit (needs bitsandbytes), prodigy (sets its own step size) or adamw-schedulefree "
        "(no lr schedule; samples and the adapter use its averaged weights).",
        choices=OPTIMIZERS,
    )
    weight_decay: float = _opt(1e-4, "AdamW weight decay.", min=0)
    max_grad_norm: float = _opt(1.0, "Gradient-norm clipping threshold; 0 turns clipping off.", min=0)
    snr_gamma: Optional[float] = _opt(None, "Min-SNR loss weighting gamma (5.0 is usual).", unset="off", above=0)
    noise_offset: float = _opt(0.0, "Noise offset (helps very dark and bright images), e.g. 0.05.", min=0)
    weighting_scheme: Optional[str] = _opt(
        None,
        "Flow-matching models: how noise levels are drawn and the loss weighted (diffusers' schemes).",
        unset="diffusers' scripts' defaults: " + in_words(lambda family: {"": family.weighting}),
        choices=WEIGHTING_SCHEMES,
    )
    guidance: Optional[float] = _opt(
        None,
        "FLUX.1 [dev]: the distilled guidance value the transformer is given in training.",
        unset="3.5, diffusers' FLUX default",
        min=0,
    )
    max_sequence_length: Optional[int] = _opt(
        None,
        "Text tokens per prompt, where the model takes the setting (longer prompts are cut).",
        unset=in_words(lambda family: {"": family.sequence_length_in_words()}),
        min=1,
    )
    seed: int = _opt(0, "Seed of every random draw of the run.", min=0)
    ema: bool = _opt(False, "Keep an exponential moving average of the adapter weights and save it.")
    ema_decay: float = _opt(0.999, "EMA decay per step.", above=0, below=1)
    max_bad_steps: int = _opt(
        5, "Steps in a row with a non-finite loss or gradient (each skipped) before the run stops.", min=1
    )
    # speed and memory
    mixed_precision: str = _opt(
        "no", "Mixed precision of the frozen model and autocast.", choices=("no", "fp16", "bf16")
    )
    base_precision: Optional[str] = _opt(
        None,
        "Precision of the frozen UNet (and of the text encoders when adapted): int8 and nf4 quantize its linear "
        "layers with bitsandbytes.",
        unset="that of --mixed-precision",
        choices=("fp32", "fp16", "bf16", "int8", "nf4"),
    )
    gradient_checkpointing: bool = _opt(False, "Recompute UNet activations in the backward pass (less memory).")
    cache_latents: bool = _opt(True, "Encode the photos with the VAE once, before training.")
    compile: bool = _opt(
        False,
        "Compile the UNet with torch.compile: faster steps on a GPU once the first step "
        "(the compilation, minutes) is done.",
    )
    xformers: bool = _opt(False, "Use xformers attention (GPU only; needs the xformers extra).")
    allow_tf32: bool = _opt(False, "Allow TF32 matmuls on Ampere and newer GPUs.")
    # outputs
    output_dir: str = _opt("krona-output", "Folder for the adapter, checkpoints, samples and logs.")
    checkpoint_every: int = _opt(500, "Steps between checkpoints; 0 saves none until the end.", min=0)
    keep_checkpoints: int = _opt(3, "Newest checkpoints kept; 0 keeps all.", min=0)
    resume: Optional[str] = _opt(None, "Resume from a checkpoint: latest, or its folder.", unset="start afresh")
    sample_prompt: list[str] = _opt([], "Prompt of the sample grids (repeatable).", unset="the instance prompt")
    sample_every: int = _opt(250, "Steps between sample grids; 0 draws one only at the end.", min=0)
    sample_width: Optional[int] = _opt(None, "Width of sample images (a multiple of 8).", unset="--resolution", min=8)
    sample_height: Optional[int] = _opt(None, "Height of sample images (a multiple of 8).", unset="--resolution", min=8)
    sample_images: int = _opt(2, "Images (seeds) per sample prompt in each grid.", min=1)
    sample_steps: Optional[int] = _opt(
        None,
        "Denoising steps of sample images.",
        unset=in_words(lambda family: {variant: found.preview_steps for variant, found in family.samplers.items()}),
        min=1,
    )
    sample_guidance: Optional[float] = _opt(
        None, "Guidance of sample images.", unset="krona sample's default for the model", min=0
    )
    # validation
    validate_every: int = _opt(
        0,
        "Steps between validations (a denoising loss on fixed draws; with --scorer, the sample grid's scores and "
        "the best step), also at step 0 and at the end; 0 turns them off.",
        min=0,
    )
    scorer: str = _opt(
        "none",
        "Score each validation's sample grid and keep the best step: toy (the toy world's scores, no model) or clip "
        "(subject fidelity DINO, prompt fidelity CLIP-T; scorer models from the hub or folders).",
        choices=("none", "toy", "clip"),
    )
    best_margin: float = _opt(
        0.1,
        "How far prompt fidelity may fall below the base model's (a share) for a step to be the best.",
        min=0,
        below=1,
    )
    keep: str = _opt(
        "both",
        "Adapters kept with --scorer: both (adapter.safetensors from the last step, best/adapter.safetensors from the "
        "best), last, or best (adapter.safetensors from the best step).",
        choices=("both", "last", "best"),
    )
    identifier: str = _opt("sks", "The subject's identifier word in --prompt (for --scorer).")
    clip_model: str = _opt("openai/clip-vit-base-patch32", "CLIP model of --scorer clip: hub id or local folder.")
    dino_model: str = _opt("facebook/dino-vits16", "DINO model of --scorer clip: hub id or local folder.")
    report_to: str = _opt(
        "tensorboard", "Where to log losses and learning rates.", choices=("tensorboard", "wandb", "none")
    )
    overwrite: bool = _opt(False, "Allow an output folder that holds another run.")
    dry_run: bool = _opt(False, "Check data, model, adapter and output folder, then stop before training.")

    def validate(self, require_data: bool = True) -> TrainConfig:
        """Check every value (choices, bounds, factors, targets, required data); KronaError names the flag."""
        from ..kron.factors import parse_factors
        from ..kron.targets import target_pattern
        from .validation import check_settings as check_validation

        for f in dataclasses.fields(self):
            _check_rules(f, getattr(self, f.name))
        for name in ("resolution", "sample_width", "sample_height"):
            value = getattr(self, name)
            if value is not None and value % 8:
                raise KronaError(f"--{_key(name)} must be a multiple of 8 (the VAE's downscale); got {value}")
        if self.base_precision in ("fp16", "bf16") and self.base_precision != self.mixed_precision:
            raise KronaError(
                f"--base-precision {self.base_precision} needs --mixed-precision {self.base_precision} "
                "(the model computes in its own precision); or use --base-precision fp32, int8 or nf4"
            )
        for name in ("factors", "text_encoder_factors"):
            _flag_errors(name, parse_factors, getattr(self, name))
        _flag_errors("targets", target_pattern, self.targets)
        check_validation(self.scorer, self.validate_every > 0, self.keep, self.identifier, self.prompt)
        check_optimizer(self.optimizer, self.lr_scheduler, self.ema, self.effective_lr(), self.text_encoder_lr)
        if self.kron_init != "normal" and self.adapter_type != "kron":
            raise KronaError(
                f"--kron-init says how krona's factor A starts; --adapter-type {self.adapter_type} has none: "
                "leave --kron-init out"
            )
        if self.targets == "text":
            raise KronaError(
                "--targets text names the text encoders' attention, but --targets chooses the UNet's "
                "layers (attn, attn-ff or a regular expression); add --train-text-encoder to adapt the "
                "text encoders too"
            )
        if require_data:
            if not self.instance_dir:
                raise KronaError("--instance-dir is required: the folder of photos of your subject")
            if not (self.prompt or "").strip():
                raise KronaError(
                    "--prompt is required: the instance prompt naming your subject, e.g. 'a photo of sks dog'"
                )
        return self

    def with_absolute_paths(self) -> TrainConfig:
        """The same settings with every local path absolute (the base model, VAE and scorer models where they exist
        locally: else they are hub ids), so config.yaml, checkpoints and the adapter's metadata work from any folder."""
        from ..pipeline.hub import absolute

        for name in ("pretrained_model", "vae", "clip_model", "dino_model"):
            setattr(self, name, absolute(getattr(self, name)))
        for name in ("instance_dir", "class_dir", "output_dir"):
            if getattr(self, name) is not None:
                setattr(self, name, str(expand(getattr(self, name)).absolute()))
        if self.resume not in (None, "latest"):
            self.resume = absolute(self.resume)
        return self

    def effective_lr(self) -> float:
        """--lr, or the default of the optimizer and adapter type (`optimizers.default_lr`)."""
        return self.lr if self.lr is not None else default_lr(self.optimizer, self.adapter_type)

    def effective_resolution(self, arch: str) -> int:
        """--resolution, or the architecture's native size (1024 for SDXL, 512 otherwise)."""
        from .. import families

        return self.resolution or families.get(arch).default_resolution

    def effective_text_encoder_lr(self) -> float:
        return self.text_encoder_lr if self.text_encoder_lr is not None else self.effective_lr()

    def to_dict(self) -> dict[str, Any]:
        """Every setting under its kebab-case key, in --help order (what `load_config` reads back)."""
        return {_key(f.name): _copy(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def resolved(self, arch: str, out: Path) -> TrainConfig:
        """The settings with every value that defaults to something else worked out for the base model's architecture
        and the output folder (learning rates, resolution, buckets, class folder, sample size, text-encoder factors,
        frozen precision): what a run actually uses, and what config.yaml records."""
        from .. import families

        resolution = self.effective_resolution(arch)
        return dataclasses.replace(
            self,
            lr=self.effective_lr(),
            text_encoder_lr=self.effective_text_encoder_lr(),
            resolution=resolution,
            buckets=families.get(arch).buckets_by_default if self.buckets is None else self.buckets,
            class_dir=self.class_dir or str(out / "class-images"),
            sample_width=self.sample_width or resolution,
            sample_height=self.sample_height or resolution,
            text_encoder_factors=self.text_encoder_factors or self.factors,
            base_precision=self.base_precision or {"no": "fp32"}.get(self.mixed_precision, self.mixed_precision),
        )

    def to_yaml(self) -> str:
        """The settings as a config file that trains the same run again: set values only (no nulls; an unset one,
        such as --vae, keeps its meaning by being absent) and none of the flags that say how to run the command
        (resume, overwrite, dry-run), so `--config` with it retrains rather than resumes."""
        header = (
            "# krona train settings of this run; `krona train --config THIS-FILE` trains it again "
            "(add --resume latest to continue it)\n"
        )
        settings = {k: v for k, v in self.to_dict().items() if v is not None and k not in RUN_FLAGS}
        # allow_unicode=False: escapes such as \N (U+0085) keep every character of a prompt through a round trip
        return header + yaml.safe_dump(settings, sort_keys=False, allow_unicode=False)

    def config_hash(self) -> str:
        """sha256 of the settings that decide the trained weights: model, data, prior preservation, adapter,
        optimisation (learning rates resolved), seed and precision; a checkpoint resumes only under the same hash.
        Not covered: the step count (a run may be resumed to train longer), how the global batch is split
        (batch-size per process and grad-accum: train checks the global batch itself, so a run may resume on another
        number of processes), settings that change speed or memory but not the result (gradient-checkpointing,
        cache-latents, compile, xformers, allow-tf32, class-batch-size), where and how
        often things are written or shown (output-dir, checkpoint-every, keep-checkpoints, sample-*, report-to), the
        validation settings (validate-every, scorer, best-margin, keep, identifier, clip-model, dino-model) and
        how the command runs (resume, dry-run, overwrite)."""
        settings = {k: v for k, v in self.to_dict().items() if k not in _UNHASHED and not k.startswith("sample-")}
        settings["lr"], settings["text-encoder-lr"] = self.effective_lr(), self.effective_text_encoder_lr()
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


RUN_FLAGS = ("resume", "dry-run", "overwrite")  # how the command runs, not what the run is
_UNHASHED = {
    "steps",
    "batch-size",
    "grad-accum",
    "max-bad-steps",
    "gradient-checkpointing",
    "cache-latents",
    "compile",
    "xformers",
    "allow-tf32",
    "class-batch-size",
    "output-dir",
    "checkpoint-every",
    "keep-checkpoints",
    "report-to",
    "validate-every",
    "scorer",
    "best-margin",
    "keep",
    "identifier",
    "clip-model",
    "dino-model",
    "resume",
    "dry-run",
    "overwrite",
}
_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_TYPES = get_type_hints(TrainConfig)
# Settings renamed for one meaning per flag name across commands: the old spelling still works, with a note.
RENAMED = {"adapter": "adapter-type"}
# Names the diffusers DreamBooth scripts (and the official DiffuseKronA scripts) use, for "did you mean" only.
ALIASES = {
    "pretrained-model-name-or-path": "pretrained-model",
    "pretrained-vae-model-name-or-path": "vae",
    "instance-data-dir": "instance-dir",
    "instance-prompt": "prompt",
    "class-data-dir": "class-dir",
    "learning-rate": "lr",
    "learning-rate-text": "text-encoder-lr",
    "max-train-steps": "steps",
    "train-batch-size": "batch-size",
    "gradient-accumulation-steps": "grad-accum",
    "use-8bit-adam": "optimizer",
    "adam-weight-decay": "weight-decay",
    "checkpointing-steps": "checkpoint-every",
    "checkpoints-total-limit": "keep-checkpoints",
    "resume-from-checkpoint": "resume",
    "validation-prompt": "sample-prompt",
    "validation-steps": "sample-every",
    "num-validation-images": "sample-images",
    "enable-xformers-memory-efficient-attention": "xformers",
    "use-ema": "ema",
    "with-prior-preservation": "class-prompt",
}


def _key(name: str) -> str:
    return name.replace("_", "-")


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def _check_rules(f: dataclasses.Field, value: Any) -> None:
    """The choices and bounds in a field's metadata; None (unset) passes."""
    if value is None:
        return
    rules, flag = f.metadata, f"--{_key(f.name)}"
    if "choices" in rules and value not in rules["choices"]:
        raise KronaError(f"{flag} must be one of {', '.join(rules['choices'])}; got '{value}'")
    if "min" in rules and value < rules["min"]:
        raise KronaError(f"{flag} must be at least {rules['min']}; got {value}")
    if "above" in rules and value <= rules["above"]:
        raise KronaError(f"{flag} must be greater than {rules['above']}; got {value}")
    if "below" in rules and value >= rules["below"]:
        raise KronaError(f"{flag} must be less than {rules['below']}; got {value}")


def _flag_errors(name: str, check: Callable[[Any], Any], value: Any) -> None:
    """Run a library check on a set value, prefixing its KronaError with the flag."""
    if value is not None:
        try:
            check(value)
        except KronaError as e:
            raise KronaError(f"--{_key(name)}: {e}") from e


def _base_type(tp: Any) -> Any:
    """int for int and Optional[int], list for list[str], and so on."""
    if get_origin(tp) is Union:
        tp = next(a for a in get_args(tp) if a is not type(None))
    return get_origin(tp) or tp


def _coerce(name: str, value: Any, where: str) -> Any:
    """A YAML or caller value as the field's type; `where` names it in errors ("'steps' in run.yaml", "--steps")."""
    tp = _TYPES[name]
    kind = _base_type(tp)
    if value is None:
        if type(None) in get_args(tp):
            return None
        raise KronaError(f"{where} cannot be empty; remove it to use the default")
    if kind is bool and isinstance(value, bool) or kind is str and isinstance(value, str):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and not isinstance(value, bool):
        try:
            number = float(value)  # YAML reads 1e-4 (no dot) as a string
        except (TypeError, ValueError, OverflowError):
            number = math.nan
        if math.isfinite(number):
            return number
    if kind is list and isinstance(value, str):
        return [value]
    if kind is list and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    wanted = {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a string or a list of strings",
    }[kind]
    if kind is str and isinstance(value, bool):
        wanted += " (quote it: YAML reads yes, no, on and off as true and false)"
    raise KronaError(f"{where} must be {wanted}, got {value!r}")


def suggestion(key: str) -> str | None:
    """The setting closest to an unknown key or flag (`learning-rate` -> `lr`), or None."""
    key = key.lstrip("-")
    match = difflib.get_close_matches(key, [_key(n) for n in _FIELDS] + list(ALIASES), n=1)
    return ALIASES.get(match[0], match[0]) if match else None


def _unknown(key: str, where: str) -> KronaError:
    match = suggestion(key)
    hint = f"did you mean '{match}'?" if match else "`krona train --help` lists them all"
    return KronaError(f"unknown key '{key}' in {where}; {hint}")


def resolve_config_path(path: str | Path) -> Path:
    """A YAML file, or the preset of that name in configs/ when no such file exists."""
    from ..architectures import CONFIGS_DIR

    given = expand(path)
    if given.is_file() or given.exists() and str(path) not in CONFIG_PRESETS:
        return given
    if str(path) in CONFIG_PRESETS:  # also where a folder of that name is in the way (`--config tiny` beside `tiny/`)
        return CONFIGS_DIR / f"{path}.yaml"
    raise KronaError(f"config file '{path}' does not exist; give a YAML file or a preset: {', '.join(CONFIG_PRESETS)}")


def read_config_file(path: str | Path, notes: list[str] | None = None) -> dict[str, Any]:
    """A config file's settings by field name, typed; KronaError for bad YAML, unknown keys or wrong types."""
    file = resolve_config_path(path)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise KronaError(f"cannot read config file '{path}': {getattr(e, 'strerror', None) or e}") from e
    except ValueError as e:  # PyYAML's own limits, such as Python's cap on the digits of an integer
        raise KronaError(f"config file '{path}' holds a value krona cannot read: {e}") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise KronaError(f"config file '{path}' is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KronaError(
            f"config file '{path}' must be a mapping of settings (key: value), not a {type(data).__name__}"
        )
    settings: dict[str, Any] = {}
    for key, value in data.items():
        name = _key(str(key)).replace("-", "_")
        if _key(name) in RENAMED:
            name = RENAMED[_key(name)].replace("-", "_")
            if notes is not None:
                notes.append(f"'{key}' in {file.name} is now '{_key(name)}' (the old name goes in the next release)")
        if name == "config":
            raise KronaError(f"'config' in {file.name}: a config file cannot name another one; give one --config")
        if name not in _FIELDS:
            raise _unknown(str(key), file.name)
        if name in settings:
            raise KronaError(f"'{_key(name)}' is given twice in {file.name} (as kebab-case and snake_case)")
        settings[name] = _coerce(name, value, f"'{key}' in {file.name}")
    return settings


def load_config(path: str | Path | None, overrides: Mapping[str, Any], notes: list[str] | None = None) -> TrainConfig:
    """Defaults, then the config file or preset at `path`, then `overrides` (field names; None values are
    "not given"), validated, paths absolute. Renamed keys read from the file add a line to `notes`."""
    settings = read_config_file(path, notes) if path is not None else {}
    for name, value in overrides.items():
        if _key(name) in RENAMED:  # a renamed flag: its value counts unless the new flag is given too
            new = RENAMED[_key(name)]
            if value is not None and notes is not None:
                notes.append(f"--{_key(name)} is now --{new} (the old name goes in the next release)")
            if value is not None and overrides.get(new.replace("-", "_")) is None:
                settings[new.replace("-", "_")] = _coerce(new.replace("-", "_"), value, f"--{_key(name)}")
            continue
        if name not in _FIELDS:
            raise _unknown(_key(name), "the overrides")
        if value is not None:
            settings[name] = _coerce(name, value, f"--{_key(name)}")
    if overrides.get("validate_every") == 0 and overrides.get("scorer") is None:
        settings.pop("scorer", None)  # validation turned off by a flag: a file's scorer has nothing left to score
    return TrainConfig(**settings).validate().with_absolute_paths()


def _shown_default(f: dataclasses.Field) -> str:
    if "unset" in f.metadata:
        return f.metadata["unset"]
    if isinstance(f.default, bool):
        return "on" if f.default else "off"
    return str(f.default)


# The first field of each --help section (the comments in TrainConfig).
_PANELS = {
    "pretrained_model": "Model",
    "instance_dir": "Data",
    "class_prompt": "Prior preservation",
    "adapter_type": "Adapter",
    "steps": "Optimisation",
    "mixed_precision": "Speed and memory",
    "output_dir": "Outputs",
    "validate_every": "Validation",
    "report_to": "Outputs",
}


def _parameter(f: dataclasses.Field, panel: str) -> inspect.Parameter:
    """The typer option of one field: default None (not given), --kebab-name (bools: --x/--no-x)."""
    kind = _base_type(_TYPES[f.name])
    flag = f"--{_key(f.name)}"
    help = f.metadata["help"]
    if "choices" in f.metadata:
        help += f" One of: {', '.join(f.metadata['choices'])}."
    option = typer.Option(
        None,
        f"{flag}/--no-{_key(f.name)}" if kind is bool else flag,
        help=help,
        show_default=_shown_default(f),  # typer shows a string as "[default: (it)]"
        metavar="<str>" if kind is list else None,
        rich_help_panel=panel,
    )
    annotation = Optional[list[str]] if kind is list else Optional[kind]
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


def typer_parameters() -> list[inspect.Parameter]:
    """`--config`, then one option per TrainConfig field, in field order."""
    config = typer.Option(
        None,
        "--config",
        help=f"YAML config file or a preset ({', '.join(CONFIG_PRESETS)}); flags override it.",
        show_default=False,
    )
    first = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=config, annotation=Optional[str])
    params, panel = [first], ""
    for f in _FIELDS.values():
        panel = _PANELS.get(f.name, panel)
        params.append(_parameter(f, panel))
    for old, new in RENAMED.items():  # the old flag, hidden; the CLI says it is renamed
        option = typer.Option(None, f"--{old}", hidden=True, help=f"Old name of --{new}.")
        params.append(
            inspect.Parameter(
                old.replace("-", "_"),
                inspect.Parameter.KEYWORD_ONLY,
                default=option,
                annotation=Optional[_base_type(_TYPES[new.replace("-", "_")])],
            )
        )
    return params


def with_train_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Give `func(config=None, **overrides)` the signature typer reads: --config and every TrainConfig flag."""
    params = typer_parameters()
    func.__signature__ = inspect.Signature(params)
    func.__annotations__ = {p.name: p.annotation for p in params}
    return func
