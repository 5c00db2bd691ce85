"""FLUX.1 transformer files: one .safetensors holding the transformer alone, in Black Forest Labs' layout (BFL's own
`flux1-dev.safetensors`, what ComfyUI and Forge load as a diffusion model: fused `img_attn.qkv`, a single block's
`linear1`) or in diffusers' names, bare or under ComfyUI's `model.diffusion_model.` (a whole ComfyUI checkpoint holds
its VAE and text encoders beside it; only the transformer is read).

`krona merge --format single-file` writes a FLUX.1 pipeline's transformer so, under bare BFL names as BFL releases
it, streamed one weight at a time (the fused weights are never built in memory), with its diffusers config and the
merge summary in the metadata. `--transformer FILE` puts such a file into a base pipeline in place of the base's own
transformer, built on the base's transformer config, its guidance embedding as the file has it (a [dev] transformer
on a [schnell] base or the reverse). The conversion is formats/bfl_layout.py's, at any width (diffusers' own
converter fixes FLUX.1's 3072).
"""

from __future__ import annotations

import importlib
import json
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch

from ..atomic import write_atomic
from ..errors import KronaError
from ..formats.bfl_layout import BFL_PREFIX, bfl_to_diffusers

TRANSFORMER_CLASS = "FluxTransformer2DModel"  # diffusers' class of what these files hold
METADATA_KEY = "krona_transformer"  # what a file krona wrote holds: the class, its layout and its diffusers config
_GUIDANCE = "time_text_embed.guidance_embedder.linear_1.weight"  # present in guidance-distilled ([dev]) transformers
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def transformer_layout(keys: Iterable[str]) -> str | None:
    """ "bfl" or "diffusers" for the keys of a FLUX.1 transformer file (bare or under `model.diffusion_model.`), None
    when they are not a FLUX.1 transformer's."""
    bare = {key.removeprefix(BFL_PREFIX) for key in keys}
    if "img_in.weight" in bare and any(key.startswith("double_blocks.") and ".img_mod." in key for key in bare):
        return "bfl"  # each double block modulated by its own `img_mod` (in other BFL layouts the blocks share one)
    if "x_embedder.weight" in bare and any(key.startswith("transformer_blocks.") for key in bare):
        return "diffusers"
    return None


def _layout_writer(layout: str) -> Callable[..., dict]:
    """A state dict's renaming into `layout` (a family's `SingleFile.layout`): `diffusers_to_<layout>` of
    formats/<layout>_layout.py, or the names as they are for "diffusers"."""
    if layout == "diffusers":
        return lambda state, concatenate: dict(state)
    return getattr(importlib.import_module(f"krona_cli.formats.{layout}_layout"), f"diffusers_to_{layout}")


class _Stacked:
    """Tensors whose rows make one fused weight, written one after the other (row-major, so their bytes concatenate)
    instead of concatenated in memory: `diffusers_to_bfl`'s `concatenate`."""

    def __init__(self, parts):
        self.parts = list(parts)
        self.shape = (sum(part.shape[0] for part in self.parts), *self.parts[0].shape[1:])


def _parts(value) -> list[torch.Tensor]:
    return value.parts if isinstance(value, _Stacked) else [value]


def _header(tensors: Mapping[str, object], dtype: torch.dtype, metadata: Mapping[str, str]) -> bytes:
    """A .safetensors header for `tensors` cast to `dtype`, in sorted key order, the data 8-byte aligned."""
    entries: dict[str, dict] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in sorted(tensors):
        shape = [int(n) for n in tensors[name].shape]
        size = sum(part.numel() for part in _parts(tensors[name])) * dtype.itemsize
        entries[name] = {"dtype": _DTYPES[dtype], "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header


def save_transformer_file(
    transformer: torch.nn.Module,
    path: str | Path,
    dtype: torch.dtype,
    metadata: Mapping[str, str] | None = None,
    layout: str = "bfl",
) -> Path:
    """The transformer as one .safetensors file in its makers' `layout` (bare names; see `_layout_writer`), every
    weight cast to `dtype`, written atomically and streamed; `metadata` joins `krona_transformer` (class, layout,
    config)."""
    if dtype not in _DTYPES:
        raise KronaError(f"cannot write a transformer in {dtype}; use fp32, fp16 or bf16")
    state = transformer.state_dict()
    if any(key.endswith((".kron_a", ".kron_b")) for key in state):
        raise KronaError("the transformer still holds Kronecker adapters; merge them into its weights first")
    if any(not tensor.is_floating_point() for tensor in state.values()):
        raise KronaError(
            "the transformer has weights that are not floating point (a quantized base?); load the base in full "
            "precision to write a single file"
        )
    tensors = _layout_writer(layout)(state, concatenate=_Stacked)
    config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}  # no `_name_or_path`
    described = {"class": type(transformer).__name__, "layout": layout, "config": config}
    metadata = {**(metadata or {}), METADATA_KEY: json.dumps(described)}

    def stream(f) -> None:
        f.write(_header(tensors, dtype, metadata))
        for name in sorted(tensors):
            for part in _parts(tensors[name]):
                f.write(part.detach().to("cpu", dtype).contiguous().reshape(-1).view(torch.uint8).numpy())

    return write_atomic(Path(path), stream)


def _weights(path: Path, keys: list[str], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The transformer's weights in diffusers' names, one at a time, cast to `dtype`, each in storage of its own (split
    from a fused weight one at a time, so the file is never held twice in memory)."""
    from safetensors import safe_open

    prefixed = any(key.startswith(BFL_PREFIX + "img_in.") for key in keys)
    keys = [key for key in keys if key.startswith(BFL_PREFIX)] if prefixed else keys
    bfl = transformer_layout(keys) == "bfl"
    with safe_open(str(path), framework="pt") as f:
        width = (BFL_PREFIX if prefixed else "") + "img_in.weight"
        hidden = int(f.get_slice(width).get_shape()[0]) if bfl else None
        for key in keys:
            tensor = f.get_tensor(key)
            if not tensor.is_floating_point():
                raise KronaError(f"'{path}' holds quantized weights (e.g. '{key}', {tensor.dtype}); give a float file")
            try:
                parts = bfl_to_diffusers({key: tensor}, hidden) if bfl else {key.removeprefix(BFL_PREFIX): tensor}
            except KronaError as e:
                raise KronaError(f"'{path}' is not a FLUX.1 transformer krona reads: {e}") from e
            for name, value in parts.items():
                yield name, value.to(dtype=dtype, copy=True).contiguous()


def load_transformer_file(
    path: Path, keys: list[str], base_config: Mapping, dtype: torch.dtype, quantized: str | None = None
):
    """A diffusers FluxTransformer2DModel from a transformer file, on the base's transformer config (its guidance
    embedding as the file has it); a file whose weights do not fit that config is one KronaError line. `quantized`
    (int8, nf4): each linear layer quantized as soon as it is read, the rest in `dtype`, so that no more than one
    layer is ever held in full precision (the real FLUX.1 transformer is 48 GB in fp32, 6 GB in nf4)."""
    if quantized:
        return _load_quantized(path, keys, base_config, dtype, quantized)
    import diffusers

    state = dict(_weights(path, keys, dtype))
    config = {k: v for k, v in base_config.items() if k != "_comment"}
    config["guidance_embeds"] = _GUIDANCE in state
    with torch.device("meta"):
        model = getattr(diffusers, TRANSFORMER_CLASS).from_config(config)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    missing = next((name for name in expected if name not in state), None)
    extra = next((name for name in state if name not in expected), None)
    odd = next((n for n in expected if n in state and tuple(state[n].shape) != expected[n]), None)
    if missing or extra or odd:
        why = (
            f"it lacks '{missing}'"
            if missing
            else f"it has '{extra}', which the base's transformer has not"
            if extra
            else f"'{odd}' is {tuple(state[odd].shape)}, the base's transformer has {expected[odd]}"
        )
        raise KronaError(
            f"'{path}' does not fit the base model's FLUX.1 transformer ({why}); give the base it was made from "
            "as --pretrained-model"
        )
    model.load_state_dict(state, assign=True)
    return model.eval()


def _load_quantized(path: Path, keys: list[str], base_config: Mapping, dtype: torch.dtype, precision: str):
    """`load_transformer_file` layer by layer: the model built on the meta device, each weight read, put in place in
    `dtype`, and each quantizable linear layer (quantize.quantizable) replaced by its bitsandbytes layer once its weight
    and bias are there."""
    import diffusers
    from torch import nn

    from .quantize import _quantized_linear, quantizable

    config = {k: v for k, v in base_config.items() if k != "_comment"}
    guidance = ("guidance_in.", _GUIDANCE.split(".linear_1")[0])
    config["guidance_embeds"] = any(k.removeprefix(BFL_PREFIX).startswith(guidance) for k in keys)
    with torch.device("meta"):
        model = getattr(diffusers, TRANSFORMER_CLASS).from_config(config)
    linears = {name for name, module in model.named_modules() if quantizable(module, precision)}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in _weights(path, keys, dtype):
        owner_name, _, param = name.rpartition(".")
        owner = model.get_submodule(owner_name) if _has_module(model, owner_name) else None
        if owner is None or tuple(getattr(owner, param, torch.empty(0)).shape) != tuple(value.shape):
            raise KronaError(
                f"'{path}' does not fit the base model's FLUX.1 transformer (at '{name}'); give the base it "
                "was made from as --pretrained-model"
            )
        value = nn.Parameter(value, requires_grad=False)
        if owner_name not in linears:
            setattr(owner, param, value)
            continue
        got = pending.setdefault(owner_name, {})
        got[param] = value
        if "weight" in got and ("bias" in got or owner.bias is None):
            for p, v in pending.pop(owner_name).items():
                setattr(owner, p, v)
            parent, _, child = owner_name.rpartition(".")
            layer = _quantized_linear(owner, precision, dtype).to("cpu")  # bitsandbytes quantizes as it moves
            setattr(model.get_submodule(parent) if parent else model, child, layer)
    missing = next((n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta), None)
    if missing or pending:
        raise KronaError(
            f"'{path}' does not fit the base model's FLUX.1 transformer (it lacks '{missing or next(iter(pending))}'); "
            "give the base it was made from as --pretrained-model"
        )
    return model.eval()


def _has_module(model, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True
