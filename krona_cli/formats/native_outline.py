"""krona's native files read without torch: their keys (`<component>.<module path>.kron_a` / `.kron_b`), the settings
stored as JSON under the metadata key `krona`, module names as files spell them (`canonical_name`), and the outline of
the adapter a file holds (`native_outline`; native.py fills it with the tensors)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

from .. import families
from ..errors import KronaError
from ..kron import parse_factors
from .outline import FORMAT_VERSION, KRON_LAYOUT_NAMES, LAYOUT_STANDARD, Adapter, KronOutline, TensorInfo

FORMAT = "krona"
COMPONENTS = families.components()
METADATA_KEY = "krona"
_NATIVE_KEY = re.compile(rf"^({'|'.join(COMPONENTS)})\.(.+)\.(kron_a|kron_b)$")


# CLIP text encoders name their layers `text_model.encoder.layers.N...` in transformers 4 and `encoder.layers.N...`
# in transformers 5. Files always use the first (diffusers' and everyone else's) naming. CLIPTextModelWithProjection's
# `text_projection` sits beside `text_model` in both, so it never gets the prefix.
TEXT_PREFIX = "text_model."
_TEXT_TOP_LEVEL = "text_projection"


def canonical_name(component: str, name: str) -> str:
    """A module's name as adapter files spell it, whatever the installed transformers calls it."""
    if component.startswith("text_encoder") and not name.startswith((TEXT_PREFIX, _TEXT_TOP_LEVEL)):
        return TEXT_PREFIX + name
    return name


def json_metadata(metadata: Mapping[str, str], name: str, source: str) -> dict | None:
    """The JSON object stored under metadata key `name`, None when absent or not an object; damaged JSON is an error."""
    if name not in metadata:
        return None
    try:
        value = json.loads(metadata[name])
    except json.JSONDecodeError as e:
        raise KronaError(f"'{source}' has unreadable '{name}' metadata; the file is damaged") from e
    return value if isinstance(value, dict) else None


def _settings(metadata: Mapping[str, str], source: str) -> dict:
    """krona's settings in a native file's metadata, their version and layout checked."""
    if METADATA_KEY not in metadata:
        raise KronaError(f"'{source}' is a .safetensors file but not a krona adapter (no '{METADATA_KEY}' metadata)")
    try:
        meta = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise KronaError(f"'{source}' has unreadable krona metadata; the file is damaged") from e
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise KronaError(
            f"'{source}' is adapter format version {version}; this krona reads up to {FORMAT_VERSION}: upgrade krona"
        )
    layout = meta.get("layout", LAYOUT_STANDARD)
    if layout not in KRON_LAYOUT_NAMES:
        raise KronaError(
            f"'{source}' records adapter layout '{layout}', which this krona does not know "
            f"({', '.join(KRON_LAYOUT_NAMES)}); upgrade krona"
        )
    return meta


def native_outline(infos: Mapping[str, TensorInfo], metadata: Mapping[str, str], source: str) -> Adapter:
    """The outline of a native file's adapter from its tensors' shapes and its metadata: per layer A's and B's
    shapes and keys (roles `a`, `b`); KronaError where they do not fit together."""
    meta = _settings(metadata, source)
    layout = meta.get("layout", LAYOUT_STANDARD)
    grouped: dict[tuple[str, str], dict[str, str]] = {}
    for key in infos:
        match = _NATIVE_KEY.match(key)
        if not match:
            raise KronaError(f"'{source}' holds an unexpected tensor '{key}'; the file is not a native krona adapter")
        component, module, param = match.groups()
        grouped.setdefault((component, module), {})[param] = key
    factors = meta.get("factors") or {}
    layers: dict[str, dict[str, KronOutline]] = {}
    for component, mods in factors.items():
        layers[component] = {}
        for module, text in mods.items():
            f = parse_factors(text)
            found = grouped.get((component, module), {})
            if "kron_a" not in found or "kron_b" not in found:
                raise KronaError(f"'{source}' is inconsistent at '{component}.{module}'; the file is damaged")
            a, b = infos[found["kron_a"]], infos[found["kron_b"]]
            if a.shape != (f.a_out, f.a_in) or b.dim() != 2:
                raise KronaError(f"'{source}' is inconsistent at '{component}.{module}'; the file is damaged")
            keys = {"a": found["kron_a"], "b": found["kron_b"]}
            layers[component][module] = KronOutline(a, b, keys, layout)
    if sum(len(v) for v in factors.values()) * 2 != len(infos):
        raise KronaError(f"'{source}' has tensors without factors in its metadata; the file is damaged")
    return Adapter(
        layers,
        scale=float(meta.get("scale", 1.0)),
        base_model=meta.get("base_model"),
        architecture=meta.get("architecture"),
        targets=meta.get("targets") or {},
        training=meta.get("training"),
        key_format=FORMAT,
        format_version=meta["format_version"],
    )
