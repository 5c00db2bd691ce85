"""Adapters in models: collected from the KronLinear layers injected into models (what training saves) and attached
to models as KronLinear layers with a file's exact factors."""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import nn

from ..errors import KronaError
from ..kron import adapted_layers, inject, load_factors
from .adapter import KronLayer
from .native_outline import COMPONENTS, TEXT_PREFIX, canonical_name
from .outline import LAYOUT_STANDARD, Adapter


def module_name(model: nn.Module, component: str, name: str) -> str | None:
    """The installed model's name for a module named `name` in a file, or None if the model has no such linear."""
    candidates = [name]
    if component.startswith("text_encoder") and name.startswith(TEXT_PREFIX):
        candidates.append(name[len(TEXT_PREFIX) :])
    for candidate in candidates:
        try:
            if isinstance(model.get_submodule(candidate), nn.Linear):
                return candidate
        except AttributeError:
            continue
    return None


def collect_adapter(
    models: Mapping[str, nn.Module],
    scale: float = 1.0,
    base_model: str | None = None,
    architecture: str | None = None,
    targets: Mapping[str, str] | None = None,
    training: dict | None = None,
) -> Adapter:
    """The adapter held by injected models, given by component name (unet, text_encoder, text_encoder_2): a copy of
    every KronLinear's factors on the CPU."""
    layers = {}
    for component, model in models.items():
        if component not in COMPONENTS:
            raise KronaError(f"unknown component '{component}'; use one of {', '.join(COMPONENTS)}")
        found = {
            canonical_name(component, name): KronLayer(
                layer.kron_a.detach().to("cpu", copy=True), layer.kron_b.detach().to("cpu", copy=True)
            )
            for name, layer in adapted_layers(model).items()
        }
        if found:
            layers[component] = found
    if not layers:
        raise KronaError("these models hold no Kronecker adapter to save; inject one first")
    return Adapter(layers, scale, base_model, architecture, dict(targets or {}), training=training)


def attach(models: Mapping[str, nn.Module], adapter: Adapter, scale: float | None = None, path: str = "auto") -> dict:
    """Inject `adapter` into the given components as KronLinear layers with its exact per-layer factors and load its
    weights. `scale` overrides the adapter's own; returns the adapted module names per component."""
    if adapter.layout != LAYOUT_STANDARD:
        raise KronaError(f"adapter layout '{adapter.layout}' cannot be attached as a standard Kronecker adapter")
    attached = {}
    for component, layers in adapter.layers.items():
        if component not in models:
            raise KronaError(f"the adapter adapts '{component}', which this model does not have; wrong base model?")
        model = models[component]
        names = {}  # name in the file -> name in the installed model
        for name in layers:
            local = module_name(model, component, name)
            if local is None:
                raise KronaError(
                    f"the adapter's layer '{component}.{name}' is not in this model; it was made for "
                    f"{adapter.architecture or 'another model'} ({adapter.base_model or 'base unknown'})"
                )
            names[name] = local
        attached[component] = inject(
            model,
            targets=[f"^{re.escape(local)}$" for local in names.values()],
            factors={names[name]: layer.factors for name, layer in layers.items()},
            scale=adapter.scale if scale is None else scale,
            path=path,
        )
        load_factors(model, {names[name]: (layer.a, layer.b) for name, layer in layers.items()})
    return attached
