"""The adapter being trained: Kronecker adapters (krona's own), LoRA through peft (the baseline) or peft's LoKr layers
(the LyCORIS Kronecker adapter, a check of krona's maths), attached to the UNet and optionally to the text encoders,
with their trainable parameters by name and how each kind is saved.

Kronecker adapters, krona's and peft's LoKr alike, are saved in krona's native format (LoKr's w1 as A, its w2 times
its scale as B); LoRA adapters in diffusers' LoRA format (what `pipeline.load_lora_weights` loads), with the LoRA
scale baked into the up weights so that any loader gives the trained model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_save
from torch import nn

from .. import families
from ..atomic import write_bytes_atomic
from ..errors import KronaError
from ..kron import inject, layer_factors
from ..kron.factors import parse_factors
from ..kron.targets import TARGET_PRESETS

_LORA_TEXT = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class TrainableAdapter:
    """Adapters attached to a pipeline's models; `models` maps component names to the adapted modules."""

    kind: str  # kron | lora | lokr
    models: dict[str, nn.Module]
    targets: dict[str, str]
    factors: dict[str, str] = field(default_factory=dict)  # component -> requested factors (kron)
    rank: int = 4
    scale: float = 1.0

    def params(self) -> dict[str, nn.Parameter]:
        """Every trainable parameter, named `<component>.<parameter name>`, in a fixed order."""
        return {
            f"{component}.{name}": p
            for component, model in self.models.items()
            for name, p in model.named_parameters()
            if p.requires_grad
        }

    def num_params(self) -> int:
        return sum(p.numel() for p in self.params().values())

    def fitted_layers(self) -> int:
        """How many Kronecker-adapted layers use other factors than requested (sizes the request does not divide)."""
        return sum(
            used != str(parse_factors(self.factors[component]))
            for component, model in self.models.items()
            for used in layer_factors(model).values()
        )

    def save(
        self, path: str | Path, base_model: str, architecture: str, training: dict, title: str | None = None
    ) -> Path:
        """Write the adapter file atomically: native Kronecker format (titled `title` for UIs), or diffusers LoRA
        format."""
        if self.kind == "lora":
            return _save_lora(self, Path(path), architecture)
        from ..formats import collect_adapter, save_adapter

        if self.kind == "lokr":
            adapter = _lokr_adapter(self, base_model, architecture, training)
        else:
            adapter = collect_adapter(self.models, self.scale, base_model, architecture, self.targets, training)
        return save_adapter(path, adapter, title=title)


@contextmanager
def holding(params: Mapping[str, nn.Parameter], values: Mapping[str, torch.Tensor]):
    """Within the block the params hold `values` (by name); their own weights come back on exit, even on errors."""
    saved = {name: p.detach().clone() for name, p in params.items()}
    try:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(values[name])
        yield
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])


def trainable_adapter(
    pipe,
    family,
    kind: str,
    targets: str,
    factors: str,
    rank: int,
    scale: float,
    train_text_encoder: bool,
    text_encoder_factors: str | None,
    strict_factors: bool = False,
    init: str = "normal",
) -> TrainableAdapter:
    """Freeze the pipeline's models and attach trainable adapters to the denoiser (and the family's trainable text
    encoders if asked). `targets` names one of the family's presets or is a regular expression; `init` is how
    Kronecker factor A starts (`KronLinear.reset_parameters`)."""
    models = {family.denoiser: getattr(pipe, family.denoiser)}
    if train_text_encoder and not family.trained_text():
        raise KronaError(
            f"--train-text-encoder: krona adapts no text encoder of {family.title} models (theirs stays frozen, as in "
            "diffusers' training script); leave it out"
        )
    text = family.trained_text() if train_text_encoder else ()
    models.update({c: getattr(pipe, c) for c in text if getattr(pipe, c, None) is not None})
    for model in models.values():
        model.requires_grad_(False)
    skip = family.unused_text_layers(pipe)
    chosen = {family.denoiser: targets}
    denoiser = models[family.denoiser]
    unused = family.unused_denoiser_layers(n for n, m in denoiser.named_modules() if isinstance(m, nn.Linear))
    if unused:  # recorded as the expression, so that a resume, sample or merge adapts the same layers
        leave_out = "|".join(re.escape(name) for name in unused)
        chosen[family.denoiser] = rf"^(?!(?:{leave_out})$).*(?:{family.target_presets.get(targets, targets)})"
    chosen |= {c: rf"^(?!.*\blayers\.{skip[c]}\.).*(?:{TARGET_PRESETS['text']})" if c in skip else "text" for c in text}
    requested = {c: (text_encoder_factors or factors) if c in text else factors for c in models}
    presets = {c: TARGET_PRESETS if c in text else family.target_presets for c in models}
    if kind == "kron":
        for component, model in models.items():
            inject(
                model, chosen[component], requested[component], scale, strict_factors, init, presets=presets[component]
            )
        return TrainableAdapter(kind, models, chosen, requested, scale=scale)
    modules = {c: _peft_targets(family, c in text, chosen[family.denoiser], skip.get(c)) for c in models}
    if kind == "lora":
        for component, model in models.items():
            _add_lora(model, component, component in text, rank, scale, modules[component])
        return TrainableAdapter(kind, models, chosen, rank=rank, scale=scale)
    if kind == "lokr":
        for component, model in models.items():
            _add_lokr(model, component, requested[component], scale, modules[component])
        return TrainableAdapter(kind, models, chosen, requested, scale=scale)
    raise KronaError(f"unknown adapter '{kind}'; use kron, lora or lokr")


def _peft_targets(family, text: bool, targets: str, skip: int | None) -> dict:
    """peft's target_modules (and the layers it leaves out) for a component: a preset's module names, or the regular
    expression as peft reads one (a full match of the name)."""
    if text:
        modules = _LORA_TEXT
    else:
        modules = family.lora_modules.get(targets) or rf".*(?:{family.target_presets.get(targets, targets)}).*"
    layers = {} if skip is None else {"layers_to_transform": list(range(skip)), "layers_pattern": "layers"}
    return {"target_modules": modules, **layers}


def _add_lora(model: nn.Module, component: str, text: bool, rank: int, scale: float, modules: dict) -> None:
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise KronaError("--adapter lora needs peft; install it with: pip install peft") from e
    config = LoraConfig(r=rank, lora_alpha=rank * scale, init_lora_weights="gaussian", **modules)
    try:
        if text:  # transformers' own add_adapter wants a newer peft than diffusers does
            inject_adapter_in_model(config, model)
        else:
            model.add_adapter(config)
    except ValueError as e:
        raise KronaError(f"cannot attach LoRA to the {component}: {e}; check --targets") from e
    _trainables_in_fp32(model)


def _add_lokr(model: nn.Module, component: str, factors: str, scale: float, modules: dict) -> None:
    """peft's LoKr layers with A (its w1) of the requested square factors and B (its w2) whole, scaled by `scale`."""
    try:
        from peft import LoKrConfig, inject_adapter_in_model
    except ImportError as e:
        raise KronaError("--adapter lokr needs peft; install it with: pip install peft") from e
    chosen = parse_factors(factors)
    if chosen.a_out != chosen.a_in:
        raise KronaError(
            f"--adapter lokr (peft's LoKr) takes one factor for both sides of A: use factors such as "
            f"{chosen.a_in}x{chosen.a_in}, not {factors}"
        )
    # w2 is kept whole (not split into two low-rank matrices) when r is at least half its larger side: any r above
    # every layer's width does, and alpha = r * scale makes LoKr's scale alpha / r the adapter scale
    r = 1 + max(max(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear))
    config = LoKrConfig(r=r, alpha=r * scale, decompose_factor=chosen.a_out, **modules)
    try:
        inject_adapter_in_model(config, model)
    except ValueError as e:
        raise KronaError(f"cannot attach LoKr to the {component}: {e}; check --targets") from e
    _trainables_in_fp32(model)


def _trainables_in_fp32(model: nn.Module) -> None:
    """peft makes its layers in the base weights' dtype; the trainable weights stay fp32 under mixed precision."""
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def _lokr_adapter(adapter: TrainableAdapter, base_model: str, architecture: str, training: dict):
    """peft's LoKr layers as a Kronecker adapter of krona's: ΔW = scale · (w1 ⊗ w2) = A ⊗ B with A = w1 and
    B = scale · w2, at adapter scale 1."""
    from peft.tuners.lokr.layer import LoKrLayer

    from ..formats.adapter import KronLayer
    from ..formats.native_outline import canonical_name
    from ..formats.outline import Adapter

    layers = {}
    for component, model in adapter.models.items():
        found = {
            canonical_name(component, name): KronLayer(
                module.lokr_w1["default"].detach().to("cpu", torch.float32, copy=True),
                (module.lokr_w2["default"].detach() * module.scaling["default"]).to("cpu", torch.float32),
            )
            for name, module in model.named_modules()
            if isinstance(module, LoKrLayer) and "default" in module.lokr_w1
        }
        if found:
            layers[component] = found
    return Adapter(layers, 1.0, base_model, architecture, dict(adapter.targets), training=training)


def _save_lora(adapter: TrainableAdapter, path: Path, architecture: str) -> Path:
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = {}
    for component, model in adapter.models.items():
        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
        # bake alpha / r into the up weights: diffusers-format files carry no alpha
        layers[f"{component}_lora_layers"] = {
            k: (v * adapter.scale if "lora.up" in k or "lora_B" in k else v)
            .detach()
            .to("cpu", torch.float32)
            .contiguous()
            for k, v in state.items()
        }
    pipeline_class = getattr(diffusers, families.get(architecture).pipeline_class)

    def save_function(weights: dict, filename: str) -> None:
        write_bytes_atomic(filename, safetensors_save(weights, metadata={"format": "pt"}))

    pipeline_class.save_lora_weights(path.parent, weight_name=path.name, save_function=save_function, **layers)
    return path
