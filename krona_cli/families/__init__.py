"""The model families krona trains, one module each, and how one is found: by name, from a denoiser's config, from
the width of the text states an adapter's cross-attention reads, from an adapter file's metadata and layers, or from a
single-file checkpoint's keys. The order of FAMILIES is the order names are listed in; recognition tries the families
in that order and takes SD 1.x when none claims a UNet (tiny and odd-width test models)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from ..errors import KronaError
from . import linear_names
from .base import Component, Family, SingleFile, UiNames
from .flux import FLUX
from .flux2 import FLUX2
from .qwen_image import QWEN_IMAGE
from .sd2 import SD2
from .sd3 import SD3
from .sd15 import SD15
from .sdxl import SDXL
from .z_image import Z_IMAGE

FAMILIES: tuple[Family, ...] = (SDXL, SD15, SD2, FLUX, SD3, FLUX2, QWEN_IMAGE, Z_IMAGE)
_BY_NAME = {f.name: f for f in FAMILIES}

__all__ = [
    "FAMILIES",
    "Component",
    "Family",
    "SingleFile",
    "UiNames",
    "by_context_width",
    "by_pipeline_class",
    "components",
    "denoiser_owner",
    "find",
    "get",
    "in_words",
    "recognise_adapter",
    "recognise_denoiser",
    "recognise_keys",
    "recognise_pipeline",
    "tiny_archs",
    "titles",
    "with_layer_list",
]


def get(name: str) -> Family:
    """The family an adapter file or a command names."""
    if name not in _BY_NAME:
        raise KronaError(f"unknown architecture '{name}'; use one of {', '.join(_BY_NAME)}")
    return _BY_NAME[name]


def find(name: str | None) -> Family | None:
    """The family of this name, None for any other (an adapter file's `architecture` may name none)."""
    return _BY_NAME.get(name) if isinstance(name, str) else None


def components() -> tuple[str, ...]:
    """Every adaptable component any family has, in registry order (what adapter files may hold)."""
    return tuple(dict.fromkeys(c.name for f in FAMILIES for c in f.components))


def in_words(value: Callable[[Family], Mapping[str, object]]) -> str:
    """What each family has of a default, for help texts: `value(family)` maps the words after its title (a variant,
    "" for none) to the value, and families of the same value are listed together, in registry order: "30 for SDXL,
    SD 1.x and SD 2.x; 28 for FLUX.1 [dev]; ...". Families without the default (None) are left out."""
    groups: dict[str, list[str]] = {}
    for family in FAMILIES:
        for variant, found in value(family).items():
            if found is not None:
                shown = f"{found:g}" if isinstance(found, float) else str(found)
                groups.setdefault(shown, []).append(f"{family.title} {variant}".strip())
    return "; ".join(f"{shown} for {_listed(names)}" for shown, names in groups.items())


def titles(where: Callable[[Family], bool], last: str = "and") -> str:
    """The titles of the families `where` holds for, in registry order, for help texts and messages: "A, B and C"."""
    return _listed([family.title for family in FAMILIES if where(family)], last)


def _listed(names: list[str], last: str = "and") -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {last} {names[-1]}"


def tiny_archs() -> tuple[str, ...]:
    """What `krona make-tiny --arch` builds: every family's `tiny` names, in registry order."""
    return tuple(arch for family in FAMILIES for arch in family.tiny)


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


def denoiser_owner(components: Iterable[str]) -> str | None:
    """The family whose denoiser one of these components is, where only one family has that denoiser (FLUX.1's
    `transformer`; a `unet` is SD 1.x's, 2.x's and SDXL's alike, so it tells none)."""
    owners: dict[str, list[str]] = {}
    for family in FAMILIES:
        owners.setdefault(family.denoiser, []).append(family.name)
    found = {owners[c][0] for c in components if len(owners.get(c, ())) == 1}
    return found.pop() if len(found) == 1 else None


def recognise_adapter(metadata: Mapping[str, str], layers: Mapping, text_encoders: int | None = None) -> str | None:
    """The family of an adapter file without krona's metadata (`layers`: its layer records by component and module;
    `text_encoders`: how many text encoders its names say the base has, where the caller counts that, e.g. kohya's
    numbered `lora_te1_`/`lora_te2_` say two): the one family whose denoiser it adapts (FLUX.1's transformer), else the
    family kohya's `ss_base_model_version` names (None for a base model krona reads no version of), else the first
    family with that many text encoders, else the width of the text the UNet's cross-attention reads."""
    owner = denoiser_owner(layers)
    if owner is not None:
        return owner
    shared = [c for c in layers if c in {f.denoiser for f in FAMILIES} and c != "unet"]
    if shared:  # a transformer several families have: the first whose real model has every adapted module
        return linear_names.family_of(shared[0], layers[shared[0]])
    version = metadata.get("ss_base_model_version")
    if version:
        return next((f.name for f in FAMILIES if version.startswith(f.ui.reads_versions)), None)
    if text_encoders is not None:
        return next((f.name for f in FAMILIES if len(f.text_encoders) == text_encoders), None)
    widths = {  # input width of cross-attention k/v
        layer.shape[1]
        for module, layer in layers.get("unet", {}).items()
        if module.endswith((".attn2.to_k", ".attn2.to_v"))
    }
    return by_context_width(widths)


def recognise_keys(keys: Iterable[str]) -> Family | None:
    """The family of a whole single-file checkpoint from its keys (its text encoder's: `SingleFile.marks`); the first
    key that has any family's mark decides. None when no key tells."""
    marks = [(mark, f) for f in FAMILIES if f.single_file for mark in f.single_file.marks]
    for key in keys:
        for mark, family in marks:
            if key.startswith(mark):
                return family
    return None
