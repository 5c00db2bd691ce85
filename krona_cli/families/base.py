"""What a model family is: its components and the facts krona reads about it (how it is recognised, its default
resolution), and what only it knows how to do (encode prompts into a `Conditioning`, call its denoiser, build its
training objective). One module per family fills these in (sd15.py, sd2.py, sdxl.py); families/__init__.py lists them.
No torch at import: `krona plan` and `krona inspect` read families without the model libraries."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
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

    @property
    def denoiser(self) -> str:
        """The pipeline attribute of the model that denoises (`unet`, `transformer`)."""
        return next(c.name for c in self.components if c.role == "denoiser")

    @abstractmethod
    def matches_denoiser(self, get: ConfigGet) -> bool:
        """Whether a denoiser with this config belongs to the family."""

    def configured(self, **settings) -> Family:
        """The family with a run's family-specific settings (flag name -> value; None: not given). The SD families
        take none: one line naming the first given."""
        given = [name for name, value in settings.items() if value is not None]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise KronaError(f"{flag} applies to flow-matching models (FLUX.1), not {self.title}; leave it out")
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

    @abstractmethod
    def sampler_defaults(self, pipe) -> SamplerDefaults:
        """The sampler settings that suit this model (a family may hold distilled and undistilled ones)."""

    def native_size(self, pipe) -> int:
        """The side in pixels the model samples at by default: its UNet's sample_size through the VAE (SDXL 1024,
        SD 1.5 512)."""
        return int(getattr(pipe, self.denoiser).config.sample_size) * int(pipe.vae_scale_factor)

    def size_multiple(self, pipe) -> int:
        """Image sides must be multiples of this: the VAE's scale factor."""
        return int(pipe.vae_scale_factor)

    def text_models(self, pipe) -> list:
        """The pipeline's text encoders, in order."""
        return [getattr(pipe, name) for name in self.text_encoders]

    def tokenizers(self, pipe) -> list:
        """Their tokenizers, in the same order."""
        return [getattr(pipe, c.tokenizer) for c in self.components if c.role == "text"]

    def component_configs(self) -> dict[str, str]:
        """Component name -> its config file under configs/models/, in pipeline order."""
        return {c.name: c.config for c in self.components}

    def linear_layers(self) -> dict[str, list[tuple[str, int, int]]]:
        """Every nn.Linear of each adaptable component of the real model, as (name, d_out, d_in) in module order: data
        in configs/models/layers/NAME.json, written by scripts/layer_lists.py from the diffusers and transformers models
        built on the meta device (tests/test_plan.py holds them equal), so `krona plan` needs no model library."""
        data = json.loads((LAYERS_DIR / f"{self.name}.json").read_text())
        return {component: [tuple(layer) for layer in layers] for component, layers in data["components"].items()}
