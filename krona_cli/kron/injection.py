"""Attach Kronecker adapters to any nn.Module by name patterns, take them off, and move their weights in and out."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..errors import KronaError
from .factors import DEFAULT_FACTORS, Factors, fit_factors, parse_factors
from .layer import KronLinear
from .targets import TARGET_PRESETS, target_pattern

PARAM_SUFFIXES = ("kron_a", "kron_b")


def find_targets(
    model: nn.Module, targets: str | Iterable[str] = "attn", presets: Mapping[str, str] = TARGET_PRESETS
) -> list[str]:
    """Names of the nn.Linear modules of `model` that the targets (presets of `presets` or expressions) select, in
    module order."""
    pattern = target_pattern(targets, presets)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not isinstance(module, KronLinear) and pattern.search(name)
    ]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject(
    model: nn.Module,
    targets: str | Iterable[str] = "attn",
    factors: str | tuple[int, int] | Factors | Mapping[str, str | tuple[int, int] | Factors] = DEFAULT_FACTORS,
    scale: float = 1.0,
    strict_factors: bool = False,
    init: str = "normal",
    path: str = "auto",
    presets: Mapping[str, str] = TARGET_PRESETS,
) -> list[str]:
    """Wrap every targeted nn.Linear of `model` in a KronLinear; return the adapted module names.

    `factors` is one request for every layer (fitted per layer to the nearest divisors not above it, or an error
    with strict_factors) or a mapping of module name to exact factors (as read back from an adapter file).
    The model's own parameters are frozen; only the adapters' `kron_a` / `kron_b` are trainable.
    """
    names = find_targets(model, targets, presets)
    if not names:
        raise KronaError(
            f"targets {targets!r} match no linear layer of this {type(model).__name__}; "
            "check the preset (attn, attn-ff, text) or the regular expression"
        )
    per_layer = isinstance(factors, Mapping)
    request = None if per_layer else parse_factors(factors)
    model.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        if per_layer:
            if name not in factors:
                raise KronaError(f"no factors given for layer '{name}'")
            chosen = parse_factors(factors[name])
        else:
            chosen = fit_factors(request, base.out_features, base.in_features, strict_factors, name)
        _set_submodule(model, name, KronLinear(base, chosen, scale=scale, init=init, path=path))
    return names


def adapted_layers(model: nn.Module) -> dict[str, KronLinear]:
    """The KronLinear modules of `model` by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, KronLinear)}


def remove(model: nn.Module, merge: bool = False) -> list[str]:
    """Put the original nn.Linear layers back (with the update baked in when merge=True); return their names."""
    layers = adapted_layers(model)
    for name, layer in layers.items():
        if merge:
            layer.merge()
        elif layer.merged:
            layer.unmerge()
        _set_submodule(model, name, layer.base)
    return list(layers)


def layer_factors(model: nn.Module) -> dict[str, str]:
    """The factors actually used by each adapted layer, as `OxI` text."""
    return {name: str(layer.factors) for name, layer in adapted_layers(model).items()}


def set_scale(model: nn.Module, scale: float) -> None:
    """Set the scale s of every adapter of `model` (un-merged adapters only: a merged weight has its scale baked in)."""
    for name, layer in adapted_layers(model).items():
        if layer.merged:
            raise KronaError(f"layer '{name}' is merged; unmerge it before changing its scale")
        layer.scale = float(scale)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`<module name>.kron_a` / `.kron_b` for every adapted layer (detached tensors, the adapter's dtype)."""
    state = {}
    for name, layer in adapted_layers(model).items():
        state[f"{name}.kron_a"] = layer.kron_a.detach()
        state[f"{name}.kron_b"] = layer.kron_b.detach()
    return state


def load_factors(model: nn.Module, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Copy (A, B) per module name into an injected model's layers; every layer present on both sides, shapes equal."""
    layers = adapted_layers(model)
    missing, unexpected = sorted(set(layers) - set(factors)), sorted(set(factors) - set(layers))
    if missing or unexpected:
        detail = f"no factors for {missing[:3]}" if missing else f"no layer {unexpected[:3]}"
        raise KronaError(
            f"the adapter weights do not match the adapted layers ({detail}); "
            "was the adapter trained on another base model or with other targets?"
        )
    with torch.no_grad():
        for name, layer in layers.items():
            for p, value in zip(PARAM_SUFFIXES, factors[name]):
                param = getattr(layer, p)
                if tuple(param.shape) != tuple(value.shape):
                    raise KronaError(
                        f"adapter tensor '{name}.{p}' has shape {tuple(value.shape)}, the layer needs "
                        f"{tuple(param.shape)}; was the adapter trained on another base model?"
                    )
                param.copy_(value.to(param.dtype))


def load_adapter_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy adapter weights (`adapter_state_dict`'s keys) into an injected model; every layer must be present on both
    sides, shapes equal."""
    layers = adapted_layers(model)
    expected = {f"{name}.{p}" for name in layers for p in PARAM_SUFFIXES}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise KronaError(
            f"the adapter weights do not match the adapted layers ({detail}); "
            "was the adapter trained on another base model or with other targets?"
        )
    load_factors(model, {name: tuple(state[f"{name}.{p}"] for p in PARAM_SUFFIXES) for name in layers})
