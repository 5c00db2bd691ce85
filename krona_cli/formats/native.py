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
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save
from torch import nn

from .. import __version__
from ..atomic import write_bytes_atomic
from ..dtypes import dtype_from_name
from ..errors import KronaError
from ..kron import adapted_layers, inject, load_factors, parse_factors
from .adapter import FORMAT_VERSION, KRON_LAYOUTS, LAYOUT_STANDARD, Adapter, KronLayer
from .ui_metadata import describe_adapter, ui_metadata

FORMAT = "krona"
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
        raise KronaError(f"'{path}' is not a readable .safetensors file (truncated or corrupt?): {e}") from e
    return tensors, metadata


def json_metadata(metadata: dict[str, str], name: str, source: str) -> dict | None:
    """The JSON object stored under metadata key `name`, None when absent or not an object; damaged JSON is an error."""
    if name not in metadata:
        return None
    try:
        value = json.loads(metadata[name])
    except json.JSONDecodeError as e:
        raise KronaError(f"'{source}' has unreadable '{name}' metadata; the file is damaged") from e
    return value if isinstance(value, dict) else None


def adapter_from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], source: str) -> Adapter:
    """Build an Adapter from a native file's tensors and metadata; KronaError where they do not fit together."""
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
    if layout not in KRON_LAYOUTS:
        raise KronaError(
            f"'{source}' records adapter layout '{layout}', which this krona does not know "
            f"({', '.join(KRON_LAYOUTS)}); upgrade krona"
        )
    grouped: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        match = _NATIVE_KEY.match(key)
        if not match:
            raise KronaError(f"'{source}' holds an unexpected tensor '{key}'; the file is not a native krona adapter")
        component, module, param = match.groups()
        grouped.setdefault((component, module), {})[param] = t.float()
    factors = meta.get("factors") or {}
    layers: dict[str, dict[str, KronLayer]] = {}
    for component, mods in factors.items():
        layers[component] = {}
        for module, text in mods.items():
            f = parse_factors(text)
            found = grouped.get((component, module), {})
            a, b = found.get("kron_a"), found.get("kron_b")
            if a is None or b is None or tuple(a.shape) != (f.a_out, f.a_in) or b.dim() != 2:
                raise KronaError(f"'{source}' is inconsistent at '{component}.{module}'; the file is damaged")
            layers[component][module] = KRON_LAYOUTS[layout](a, b)
    if sum(len(v) for v in factors.values()) * 2 != len(tensors):
        raise KronaError(f"'{source}' has tensors without factors in its metadata; the file is damaged")
    return Adapter(
        layers,
        scale=float(meta.get("scale", 1.0)),
        base_model=meta.get("base_model"),
        architecture=meta.get("architecture"),
        targets=meta.get("targets") or {},
        training=meta.get("training"),
        key_format=FORMAT,
        format_version=version,
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


def file_sha256(path: str | Path) -> str:
    """The file's SHA-256, hex (used to name an adapter in logs and image metadata)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
