"""The model families krona trains, one module each, and how one is found: by name, from a denoiser's config, or from
the width of the text states an adapter's cross-attention reads. The order of FAMILIES is the order names are listed
in; recognition tries the families in that order and takes SD 1.x when none claims a UNet (tiny and odd-width test
models)."""

from __future__ import annotations

from collections.abc import Mapping

from ..errors import KronaError
from .base import Component, Family
from .flux import FLUX
from .sd2 import SD2
from .sd15 import SD15
from .sdxl import SDXL

FAMILIES: tuple[Family, ...] = (SDXL, SD15, SD2, FLUX)
_BY_NAME = {f.name: f for f in FAMILIES}

__all__ = [
    "FAMILIES",
    "Component",
    "Family",
    "by_context_width",
    "by_pipeline_class",
    "components",
    "get",
    "recognise_denoiser",
    "recognise_pipeline",
    "with_layer_list",
]


def get(name: str) -> Family:
    """The family an adapter file or a command names."""
    if name not in _BY_NAME:
        raise KronaError(f"unknown architecture '{name}'; use one of {', '.join(_BY_NAME)}")
    return _BY_NAME[name]


def components() -> tuple[str, ...]:
    """Every adaptable component any family has, in registry order (what adapter files may hold)."""
    return tuple(dict.fromkeys(c.name for f in FAMILIES for c in f.components))


def with_layer_list(name: str) -> Family:
    """The family, if krona ships its real model's configs and layer list (what meta builds and `krona plan` need)."""
    known = [f.name for f in FAMILIES if f.layer_list]
    if name not in known:
        raise KronaError(f"unknown architecture '{name}'; use one of {', '.join(known)}")
    return _BY_NAME[name]


def recognise_denoiser(config) -> Family:
    """The family of a denoiser from its config (a dict or a config object); SD 1.x when no family claims it."""
    return next((f for f in FAMILIES if f.matches_denoiser(_getter(config))), SD15)


def _getter(config):
    return config.get if isinstance(config, Mapping) else lambda key: getattr(config, key, None)


def by_pipeline_class(class_name: str | None) -> Family | None:
    """The first family whose pipelines have this diffusers class (before loading one: its load keywords)."""
    return next((f for f in FAMILIES if f.pipeline_class == class_name), None)


def recognise_pipeline(pipe, source: str) -> Family:
    """The family of a loaded pipeline, by its denoiser; one line naming what it is when krona trains no such model."""
    for family in FAMILIES:
        if family.denoiser in pipe.components and family.matches_denoiser(
            _getter(pipe.components[family.denoiser].config)
        ):
            return family
    if "unet" in pipe.components:
        return SD15
    titles = ", ".join(f.title for f in FAMILIES)
    raise KronaError(f"'{source}' is a {type(pipe).__name__}, not a pipeline krona trains ({titles})")


def by_context_width(widths: set[int]) -> str | None:
    """The family whose cross-attention reads text states of these widths; None unless they name exactly one."""
    found = {next((f.name for f in FAMILIES if f.context_width == w), None) for w in widths}
    return found.pop() if len(found) == 1 else None
