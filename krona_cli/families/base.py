"""What a model family is: its components and the facts krona reads about it (how it is recognised, its default
resolution), and what only it knows how to do (encode prompts into a `Conditioning`, call its denoiser, build its
training objective). One module per family fills these in (sd15.py, sd2.py, sdxl.py); families/__init__.py lists them.
No torch at import: `krona plan` and `krona inspect` read families without the model libraries."""

from __future__ import annotations

import dataclasses
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..architectures import LAYERS_DIR
from ..errors import KronaError
from ..kron.targets import TARGET_PRESETS
from .prompts import Conditioning

ConfigGet = Callable[[str], Any]  # a denoiser config's value by key (None when it is not there)


@dataclass(frozen=True)
class Component:
    """One model of a family's pipeline: its attribute in a diffusers pipeline folder, what it does (`denoiser` or
    `text`), the public config krona ships for it in configs/models/, and a text encoder's tokenizer attribute."""

    name: str
    role: str
    config: str
    tokenizer: str | None = None
    trainable: bool = True  # a text encoder `--train-text-encoder` adapts (FLUX's T5 stays frozen)
    pad: str | None = None  # its tokenizer's pad token where it is not CLIP's own (EOS): OpenCLIP's "!"
    kohya_prefix: str | None = None  # kohya's lora-name prefix of its layers (`lora_unet_`, `lora_te1_`, `lora_te_`)
    single_file_prefix: str | None = None  # text: where a whole single file holds its weights
    openclip: bool = False  # text: held there in OpenCLIP's layout (q, k, v in one in_proj), not in transformers' names
    read_alone: bool = False  # text: read back from its own keys (diffusers' converter mistakes SDXL's second CLIP)
    optional: bool = False  # text: one `--drop-t5` leaves out (the model's pipeline then gives zeros for its part)


@dataclass(frozen=True)
class UiNames:
    """How other tools' metadata names the family (formats/ui_metadata.py): Stability's modelspec and kohya's `ss_`
    keys. Where the prediction type ("v", "epsilon") decides the id or the resolution (SD 2.x), the `_by_prediction`
    mapping has it, and the plain value is for an unknown one."""

    modelspec_id: str | None = None  # the base's modelspec architecture id
    modelspec_id_by_prediction: Mapping[str, str] = field(default_factory=dict)
    modelspec_variants: tuple[tuple[str, str], ...] = ()  # (word in the base model's name, id): FLUX.1 [schnell]
    resolution: int | None = None  # modelspec.resolution when the training resolution is not known
    resolution_by_prediction: Mapping[str, int] = field(default_factory=dict)
    base_model_version: str | None = None  # kohya's `ss_base_model_version`, written
    reads_versions: tuple[str, ...] = ()  # the `ss_base_model_version` prefixes read as this family
    v2: str | None = None  # kohya's `ss_v2` ("True" / "False")

    def base_id(self, prediction: str | None, base_model: str | None) -> str | None:
        """The modelspec id of a base model of this family with this prediction type (None: not known)."""
        name = base_model.lower() if base_model else ""
        variant = next((found for word, found in self.modelspec_variants if name and word in name), None)
        return variant or self.modelspec_id_by_prediction.get(prediction, self.modelspec_id)

    def default_resolution(self, prediction: str | None) -> int | None:
        """modelspec's resolution of an adapter whose training resolution is not known."""
        return self.resolution_by_prediction.get(prediction, self.resolution)


@dataclass(frozen=True)
class SingleFile:
    """The family's single-file checkpoint (the one .safetensors A1111, Forge and ComfyUI load): what it holds, how a
    whole one is told from its keys, what krona reads one without its own description with, and whether krona can
    write one (pipeline/single_file.py, formats/original_layout.py)."""

    holds: str  # what `krona merge --format single-file` writes, in words
    denoiser_only: bool = False  # its denoiser alone in its makers' layout, not the whole pipeline in the original one
    marks: tuple[str, ...] = ()  # key prefixes that tell a whole file of the family (its text encoder's)
    vae: str | None = None  # the shipped configs (configs/models/) besides its components' that a whole file is read
    scheduler: str | None = None  # with when it does not carry krona's description
    refused: str | None = None  # why krona cannot write a whole file of it, in a message's words (None: it can)
    # denoiser_only: its makers' layout (formats/<layout>_layout.py, or "diffusers" for diffusers' own names), and
    # keys that tell such a file where krona reads none back
    layout: str = "bfl"
    denoiser_marks: tuple[str, ...] = ()


@dataclass(frozen=True)
class SamplerDefaults:
    """What `krona sample` draws with when not told (`steps`, `guidance`), and training's sample grids and class
    images (`preview_steps`, fewer)."""

    steps: int
    guidance: float
    preview_steps: int


@dataclass(frozen=True)
class Family(ABC):
    """A base-model family (SDXL, SD 1.x, ...). `name` is what adapter files record as their architecture."""

    name: str
    title: str  # in messages: "SDXL", "SD 1.x"
    pipeline_class: str  # the diffusers pipeline class (model_index.json's `_class_name`)
    components: tuple[Component, ...]  # adaptable ones, denoiser first, in pipeline order
    context_width: int | None  # width of the text states the denoiser's cross-attention reads
    default_resolution: int  # training (and sampling) side in pixels when none is given
    layer_list: bool  # configs/models/layers/<name>.json exists (the real model's linears, for `krona plan`)
    load_extras: Mapping[str, Any] = field(default_factory=dict)  # from_pretrained keywords its pipelines load with
    target_presets: Mapping[str, str] = field(default_factory=lambda: TARGET_PRESETS)  # --targets preset -> regex
    lora_modules: Mapping[str, list[str]] = field(default_factory=dict)  # preset -> peft target module names
    schedulers: Mapping[str, str] = field(default_factory=dict)  # krona's sampler name -> diffusers scheduler class
    buckets_by_default: bool = False  # aspect-ratio buckets unless --buckets says otherwise
    ui: UiNames = field(default_factory=UiNames)  # how modelspec and kohya's metadata name it
    single_file: SingleFile | None = None  # its single-file checkpoint
    file_naming: str = "kohya_names"  # the formats module whose naming krona's LoKr and LoRA files of it follow
    # `krona sample`'s and training's sampler defaults by variant (sampler_variant; "": the family's one), the words
    # after its title in help texts
    samplers: Mapping[str, SamplerDefaults] = field(default_factory=dict)
    weighting: str | None = None  # flow matching's --weighting-scheme (None: the family's objective has none)
    tiny: tuple[str, ...] = ()  # `krona make-tiny --arch` names of its tiny pipelines (pipeline/tiny_<name>.py)

    @property
    def denoiser(self) -> str:
        """The pipeline attribute of the model that denoises (`unet`, `transformer`)."""
        return next(c.name for c in self.components if c.role == "denoiser")

    @abstractmethod
    def matches_denoiser(self, get: ConfigGet) -> bool:
        """Whether a denoiser with this config belongs to the family."""

    def configured(self, **settings) -> Family:
        """The family with a run's family-specific settings (flag name -> value; None: not given). The SD families
        take none, and a family refuses those it has no use for: one line naming the first given."""
        given = [name for name, value in settings.items() if value is not None]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise KronaError(f"{flag} does not apply to {self.title} models; leave it out")
        return self

    @abstractmethod
    def encode_prompts(self, tokenizers: list, text_models: list, prompts: list[str]) -> Conditioning:
        """Prompt embeddings as training feeds them to the denoiser, from these (possibly wrapped) text encoders."""

    @abstractmethod
    def denoise(self, model, noisy, timesteps, cond: Conditioning, geometry, dtype):
        """THE denoiser call of training and validation: the prediction for `noisy` latents (B, C, H, W) at the
        objective's model timesteps, in the latents' layout. `geometry` is each image's (original size, crop, target
        size) row, the micro-conditioning SDXL reads; inputs are cast to `dtype`."""

    @abstractmethod
    def objective(self, scheduler_config: Mapping):
        """The training objective (families/ddpm.py, families/flow_match.py) for a base model's scheduler config."""

    @property
    def text_encoders(self) -> tuple[str, ...]:
        """The pipeline attributes of its text encoders, in order."""
        return tuple(c.name for c in self.components if c.role == "text")

    def trained_text(self) -> tuple[str, ...]:
        """The text encoders `--train-text-encoder` adapts, in order."""
        return tuple(c.name for c in self.components if c.role == "text" and c.trainable)

    def unused_text_layers(self, pipe) -> dict[str, int]:
        """Text-encoder layers whose output the denoiser never reads, by component (they cannot learn, and DDP would
        wait for their gradients)."""
        return {}

    def encode_pixels(self, vae, pixels):
        """The VAE's posterior of pixels (B, 3, H, W) in [-1, 1] (a family whose VAE takes frames says so)."""
        return vae.encode(pixels).latent_dist

    def guidance_kwargs(self, guidance: float, negative: list[str] | None, count: int) -> dict:
        """The pipeline call's keywords for classifier-free guidance at `guidance` against `negative` (None: the
        pipeline's own), for `count` images."""
        return {"guidance_scale": guidance, **({"negative_prompt": negative} if negative else {})}

    def normalise_latents(self, vae, z):
        """VAE latents `z` (B, C, H, W) as the denoiser reads them: (z − shift_factor) · scaling_factor."""
        shift = getattr(vae.config, "shift_factor", None)
        return (z - shift) * vae.config.scaling_factor if shift is not None else z * vae.config.scaling_factor

    def unused_denoiser_layers(self, linears: Iterable[str]) -> tuple[str, ...]:
        """Those of the denoiser's linear layers (`linears`: their names) whose output it never uses: they cannot
        learn, so training, `krona plan` and LoRA leave them out of every target."""
        return ()

    def sequence_length_in_words(self) -> str | None:
        """--max-sequence-length's default in words; None where the family takes no such setting."""
        return None

    def sampler_variant(self, pipe) -> str:
        """Which of `samplers` suits this pipeline's model ("" where the family has one)."""
        return ""

    def sampler_defaults(self, pipe) -> SamplerDefaults:
        """The sampler settings that suit this model (a family may hold distilled and undistilled ones)."""
        return self.samplers[self.sampler_variant(pipe)]

    def native_size(self, pipe) -> int:
        """The side in pixels the model samples at by default: its UNet's sample_size through the VAE (SDXL 1024,
        SD 1.5 512)."""
        return int(getattr(pipe, self.denoiser).config.sample_size) * int(pipe.vae_scale_factor)

    def call_kwargs(self, pipe) -> dict:
        """Keyword arguments the pipeline's own call needs beyond prompt, size, steps and guidance."""
        return {}

    def size_multiple(self, pipe) -> int:
        """Image sides must be multiples of this: the VAE's scale factor."""
        return int(pipe.vae_scale_factor)

    def text_models(self, pipe) -> list:
        """The pipeline's text encoders, in order (an optional one left out of it is not there)."""
        return [getattr(pipe, name) for name in self.text_encoders if getattr(pipe, name, None) is not None]

    def tokenizers(self, pipe) -> list:
        """Their tokenizers, in the same order."""
        present = [c for c in self.components if c.role == "text" and getattr(pipe, c.name, None) is not None]
        return [getattr(pipe, c.tokenizer) for c in present]

    @property
    def optional_text(self) -> tuple[Component, ...]:
        """The text encoders the model can do without (`--drop-t5` leaves them out); none for most families."""
        return tuple(c for c in self.components if c.optional)

    def without_optional_text(self) -> dict[str, None]:
        """The from_pretrained keywords that leave out the text encoders the model can do without, and their
        tokenizers (`--drop-t5`); one line where it has none."""
        dropped = {name: None for c in self.optional_text for name in (c.name, c.tokenizer)}
        if not dropped:
            raise KronaError(f"--drop-t5 does not apply to {self.title} models: they cannot do without a text encoder")
        return dropped

    def component_configs(self) -> dict[str, str]:
        """Component name -> its config file under configs/models/, in pipeline order."""
        return {c.name: c.config for c in self.components}

    def kohya_prefixes(self) -> dict[str, str]:
        """Component name -> kohya's lora-name prefix of its layers, for the components kohya names."""
        return {c.name: c.kohya_prefix for c in self.components if c.kohya_prefix}

    def single_file_configs(self) -> dict[str, str]:
        """The shipped config of each part a whole single file of the family is read with when it does not carry
        krona's description (denoiser, VAE, text encoders, scheduler, in model_index.json's order); empty where krona
        ships none."""
        if self.single_file is None or self.single_file.vae is None:
            return {}
        text = {c.name: c.config for c in self.components if c.role == "text"}
        denoiser = next(c for c in self.components if c.role == "denoiser")
        return {
            denoiser.name: denoiser.config,
            "vae": self.single_file.vae,
            **text,
            "scheduler": self.single_file.scheduler,
        }

    def linear_layers(self) -> dict[str, list[tuple[str, int, int]]]:
        """Every nn.Linear of each adaptable component of the real model, as (name, d_out, d_in) in module order: data
        in configs/models/layers/NAME.json, written by scripts/layer_lists.py from the diffusers and transformers models
        built on the meta device (tests/test_plan.py holds them equal), so `krona plan` needs no model library."""
        data = json.loads((LAYERS_DIR / f"{self.name}.json").read_text())
        return {component: [tuple(layer) for layer in layers] for component, layers in data["components"].items()}


@dataclass(frozen=True)
class WeightedFamily(Family):
    """A flow-matching family whose one run setting is --weighting-scheme (its training script's default unless
    given); --guidance and --max-sequence-length are refused."""

    weighting: str = "none"

    def configured(self, guidance=None, max_sequence_length=None, weighting_scheme=None) -> WeightedFamily:
        Family.configured(self, guidance=guidance, max_sequence_length=max_sequence_length)
        return dataclasses.replace(self, weighting=weighting_scheme) if weighting_scheme else self
