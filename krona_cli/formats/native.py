"""Adapter files. The native format: one .safetensors with `<component>.<module path>.kron_a` / `.kron_b` tensors
and the settings as JSON under the metadata key `krona` (the only key krona reads back; the header also carries the
modelspec and kohya `ss_` keys other tools show, see ui_metadata.py). Its keys and settings are read without torch in
native_outline.py; here: collecting an adapter from injected models, writing it, reading its tensors, attaching it.

Only .safetensors files are ever read; pickles (PyTorch .bin/.pt/.ckpt) are refused before anything is loaded.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save
from torch import nn

from .. import __version__
from ..atomic import write_bytes_atomic
from ..dtypes import dtype_from_name
from ..errors import KronaError
from ..kron import adapted_layers, inject, load_factors
from .adapter import KRON_LAYOUTS, KronLayer
from .native_outline import COMPONENTS, FORMAT, METADATA_KEY, TEXT_PREFIX, canonical_name, native_outline
from .outline import LAYOUT_STANDARD, Adapter, tensor_infos
from .safetensors_file import refuse_unsafe, unreadable
from .ui_metadata import describe_adapter, ui_metadata


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


def krona_metadata(adapter: Adapter) -> dict:
    """krona's settings of a Kronecker adapter, the JSON stored under the metadata key `krona` (here, and beside the
    LoKr and LoRA files' own keys): format version, base model, architecture, layout, scale, targets, per-layer
    factors (`OxI`) and the training settings."""
    return {
        "format": FORMAT,
        "format_version": adapter.format_version,
        "krona_version": __version__,
        "base_model": adapter.base_model,
        "architecture": adapter.architecture,
        "layout": adapter.layout,
        "scale": adapter.scale,
        "targets": adapter.targets,
        "factors": {c: {m: layer.factors for m, layer in mods.items()} for c, mods in adapter.layers.items()},
        "training": adapter.training,
    }


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


def save_adapter(path: str | Path, adapter: Adapter, dtype: str = "fp32", title: str | None = None) -> Path:
    """Write `adapter` as one native .safetensors file, atomically. Beside krona's settings the header carries the
    modelspec and kohya `ss_` keys other tools show (ui_metadata.py); `title` defaults to the file's name."""
    torch_dtype = dtype_from_name(dtype)
    if not adapter.kronecker:
        raise KronaError(
            f"a '{adapter.layout}' adapter holds no Kronecker factors; krona's own format stores Kronecker ones only"
        )
    flat = {}
    for component, mods in adapter.layers.items():
        for module, layer in mods.items():
            flat[f"{component}.{module}.kron_a"] = layer.a.to(torch_dtype).contiguous()
            flat[f"{component}.{module}.kron_b"] = layer.b.to(torch_dtype).contiguous()
    metadata = {
        METADATA_KEY: json.dumps(krona_metadata(adapter), sort_keys=True),
        **ui_metadata(
            "native",
            title or Path(path).stem,
            adapter.architecture,
            adapter.base_model,
            adapter.training,
            describe_adapter(adapter.base_model, adapter.training, "saved in krona's own format"),
        ),
    }
    return write_bytes_atomic(path, safetensors_save(flat, metadata=metadata))


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a .safetensors file; KronaError for pickles, truncated or corrupt files."""
    path = Path(path)
    refuse_unsafe(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise unreadable(path, str(e)) from e
    return tensors, metadata


def tensor_value(tensors: Mapping[str, torch.Tensor]) -> Callable[[str], float]:
    """What the outline readers take the first number of a tensor (an alpha) with, for tensors read with torch."""
    return lambda key: float(tensors[key].float().reshape(-1)[0])


def adapter_from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str) -> Adapter:
    """Build an Adapter from a native file's tensors and metadata (native_outline.py), A and B in float32;
    KronaError where they do not fit together."""
    outline = native_outline(tensor_infos(tensors), metadata, source)
    return outline.with_layers(
        lambda layer: KRON_LAYOUTS[layer.layout](tensors[layer.keys["a"]].float(), tensors[layer.keys["b"]].float())
    )


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
