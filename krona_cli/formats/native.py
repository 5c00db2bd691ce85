"""Adapter files. The native format: one .safetensors with `<component>.<module path>.kron_a` / `.kron_b` tensors
and the settings as JSON under the metadata key `krona` (the only key krona reads back; the header also carries the
modelspec and kohya `ss_` keys other tools show, see ui_metadata.py).

Only .safetensors files are ever read; pickles (PyTorch .bin/.pt/.ckpt) are refused before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save
from torch import nn

from .. import __version__
from ..atomic import write_bytes_atomic
from ..dtypes import dtype_from_name
from ..errors import KronaError
from ..kron import adapter_state_dict, inject, layer_factors, load_adapter_state_dict, parse_factors
from .ui_metadata import describe_adapter, ui_metadata

FORMAT = "krona"
FORMAT_VERSION = 1
LAYOUT_STANDARD = "standard"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
METADATA_KEY = "krona"
_NATIVE_KEY = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)\.(kron_a|kron_b)$")


# CLIP text encoders name their layers `text_model.encoder.layers.N...` in transformers 4 and `encoder.layers.N...`
# in transformers 5. Files always use the first (diffusers' and everyone else's) naming. CLIPTextModelWithProjection's
# `text_projection` sits beside `text_model` in both, so it never gets the prefix.
_TEXT_PREFIX = "text_model."
_TEXT_TOP_LEVEL = "text_projection"


def canonical_name(component: str, name: str) -> str:
    """A module's name as adapter files spell it, whatever the installed transformers calls it."""
    if component.startswith("text_encoder") and not name.startswith((_TEXT_PREFIX, _TEXT_TOP_LEVEL)):
        return _TEXT_PREFIX + name
    return name


def module_name(model: nn.Module, component: str, name: str) -> str | None:
    """The installed model's name for a module named `name` in a file, or None if the model has no such linear."""
    candidates = [name]
    if component.startswith("text_encoder") and name.startswith(_TEXT_PREFIX):
        candidates.append(name[len(_TEXT_PREFIX) :])
    for candidate in candidates:
        try:
            if isinstance(model.get_submodule(candidate), nn.Linear):
                return candidate
        except AttributeError:
            continue
    return None


@dataclass
class Adapter:
    """An adapter in memory: its tensors by component and the settings it was made with."""

    tensors: dict[str, dict[str, torch.Tensor]]  # component -> {"<module path>.kron_a": tensor, ...}
    factors: dict[str, dict[str, str]]  # component -> {"<module path>": "OxI"}, the factors each layer uses
    scale: float = 1.0
    base_model: str | None = None
    architecture: str | None = None
    targets: dict[str, str] = field(default_factory=dict)  # component -> target preset or regex
    layout: str = LAYOUT_STANDARD
    training: dict | None = None
    format_version: int = FORMAT_VERSION
    key_format: str | None = None  # how the file it was read from names its tensors (krona, kohya, kohya-sgm, ...)

    def num_params(self) -> int:
        return sum(t.numel() for tensors in self.tensors.values() for t in tensors.values())

    def num_layers(self) -> dict[str, int]:
        return {component: len(f) for component, f in self.factors.items()}

    def metadata(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": self.format_version,
            "krona_version": __version__,
            "base_model": self.base_model,
            "architecture": self.architecture,
            "layout": self.layout,
            "scale": self.scale,
            "targets": self.targets,
            "factors": self.factors,
            "training": self.training,
        }


def collect_adapter(
    models: Mapping[str, nn.Module],
    scale: float = 1.0,
    base_model: str | None = None,
    architecture: str | None = None,
    targets: Mapping[str, str] | None = None,
    training: dict | None = None,
) -> Adapter:
    """The adapter held by injected models, given by component name (unet, text_encoder, text_encoder_2)."""
    tensors, factors = {}, {}
    for component, model in models.items():
        if component not in COMPONENTS:
            raise KronaError(f"unknown component '{component}'; use one of {', '.join(COMPONENTS)}")
        state = adapter_state_dict(model)
        if state:
            tensors[component] = {canonical_name(component, k): v.to("cpu", copy=True) for k, v in state.items()}
            factors[component] = {canonical_name(component, k): v for k, v in layer_factors(model).items()}
    if not tensors:
        raise KronaError("these models hold no Kronecker adapter to save; inject one first")
    return Adapter(tensors, factors, scale, base_model, architecture, dict(targets or {}), training=training)


def save_adapter(path: str | Path, adapter: Adapter, dtype: str = "fp32", title: str | None = None) -> Path:
    """Write `adapter` as one native .safetensors file, atomically. Beside krona's settings the header carries the
    modelspec and kohya `ss_` keys other tools show (ui_metadata.py); `title` defaults to the file's name."""
    torch_dtype = dtype_from_name(dtype)
    flat = {
        f"{component}.{key}": t.to(torch_dtype).contiguous()
        for component, tensors in adapter.tensors.items()
        for key, t in tensors.items()
    }
    metadata = {
        METADATA_KEY: json.dumps(adapter.metadata(), sort_keys=True),
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


def _refuse_unsafe(path: Path) -> None:
    if not path.exists():
        raise KronaError(f"adapter file '{path}' does not exist; check the path")
    if path.is_dir():
        raise KronaError(f"'{path}' is a folder; give the adapter's .safetensors file")
    with path.open("rb") as f:
        head = f.read(9)
    # a safetensors file starts with its header's length (8 bytes, little-endian, so the first byte can be
    # anything, 0x80 included) followed by the JSON header's "{"
    looks_safetensors = len(head) == 9 and head[8:9] == b"{"
    zip_archive = head[:4] == b"PK\x03\x04"  # torch.save's default format
    legacy_pickle = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    if not looks_safetensors and (zip_archive or legacy_pickle):
        raise KronaError(
            f"'{path}' is a pickle (a PyTorch .bin/.pt/.ckpt file); krona never loads pickles, which can run code. "
            "Convert it to .safetensors with a tool you trust"
        )


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a .safetensors file; KronaError for pickles, truncated or corrupt files."""
    path = Path(path)
    _refuse_unsafe(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise KronaError(f"'{path}' is not a readable .safetensors file (truncated or corrupt?): {e}") from None
    return tensors, metadata


def json_metadata(metadata: dict[str, str], name: str, source: str) -> dict | None:
    """The JSON object stored under metadata key `name`, None when absent or not an object; damaged JSON is an error."""
    if name not in metadata:
        return None
    try:
        value = json.loads(metadata[name])
    except json.JSONDecodeError:
        raise KronaError(f"'{source}' has unreadable '{name}' metadata; the file is damaged") from None
    return value if isinstance(value, dict) else None


def adapter_from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str) -> Adapter:
    """Build an Adapter from a native file's tensors and metadata; KronaError where they do not fit together."""
    if METADATA_KEY not in metadata:
        raise KronaError(f"'{source}' is a .safetensors file but not a krona adapter (no '{METADATA_KEY}' metadata)")
    try:
        meta = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError:
        raise KronaError(f"'{source}' has unreadable krona metadata; the file is damaged") from None
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise KronaError(
            f"'{source}' is adapter format version {version}; this krona reads up to {FORMAT_VERSION}: upgrade krona"
        )
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        match = _NATIVE_KEY.match(key)
        if not match:
            raise KronaError(f"'{source}' holds an unexpected tensor '{key}'; the file is not a native krona adapter")
        component, module, _ = match.groups()
        grouped.setdefault(component, {})[key[len(component) + 1 :]] = t.float()
    factors = meta.get("factors") or {}
    for component, layers in factors.items():
        for module, text in layers.items():
            f = parse_factors(text)
            a = grouped.get(component, {}).get(f"{module}.kron_a")
            b = grouped.get(component, {}).get(f"{module}.kron_b")
            if a is None or b is None or tuple(a.shape) != (f.a_out, f.a_in) or b.dim() != 2:
                raise KronaError(f"'{source}' is inconsistent at '{component}.{module}'; the file is damaged")
    if sum(len(v) for v in factors.values()) * 2 != len(tensors):
        raise KronaError(f"'{source}' has tensors without factors in its metadata; the file is damaged")
    return Adapter(
        tensors=grouped,
        factors=factors,
        scale=float(meta.get("scale", 1.0)),
        base_model=meta.get("base_model"),
        architecture=meta.get("architecture"),
        targets=meta.get("targets") or {},
        layout=meta.get("layout", LAYOUT_STANDARD),
        training=meta.get("training"),
        format_version=version,
        key_format=FORMAT,
    )


def attach(models: Mapping[str, nn.Module], adapter: Adapter, scale: float | None = None, path: str = "auto") -> dict:
    """Inject `adapter` into the given components with its exact per-layer factors and load its weights.

    `scale` overrides the adapter's own; returns the adapted module names per component.
    """
    if adapter.layout != LAYOUT_STANDARD:
        raise KronaError(f"adapter layout '{adapter.layout}' cannot be attached as a standard Kronecker adapter")
    attached = {}
    for component, layers in adapter.factors.items():
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
            factors={names[name]: f for name, f in layers.items()},
            scale=adapter.scale if scale is None else scale,
            path=path,
        )
        state = {}
        for key, t in adapter.tensors[component].items():
            name, _, param = key.rpartition(".")
            state[f"{names[name]}.{param}"] = t
        load_adapter_state_dict(model, state)
    return attached


def file_sha256(path: str | Path) -> str:
    """The file's SHA-256, hex (used to name an adapter in logs and image metadata)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
