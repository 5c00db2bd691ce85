"""The original (LDM / SGM) checkpoint layout, which A1111, Forge, ComfyUI, kohya's trainers and Stability's own code
read: one .safetensors file holding every weight of a pipeline under the names those tools use.

UNet paths are mapped both ways by unet_paths.py (`unet_path_to_sgm`, `unet_path_from_sgm`).

Whole checkpoints (`to_original`, `save_single_file`), SDXL and SD 1.x only: the UNet under `model.diffusion_model.`;
the VAE under `first_stage_model.` in LDM names (`encoder.down.i.block.j`, `encoder.mid.block_1`, `mid.attn_1` with
its q, k, v, proj_out as 1x1-conv weights, `decoder.up.i` numbered like the encoder's levels, 0 at full resolution,
so in the reverse of diffusers' `up_blocks`); CLIP ViT-L in transformers' names, always spelled with `text_model.`,
under `cond_stage_model.transformer.` (SD 1.x) or `conditioner.embedders.0.transformer.` (SDXL); SDXL's OpenCLIP bigG
in OpenCLIP's own layout under `conditioner.embedders.1.model.` (q, k, v concatenated into `attn.in_proj_*`,
`text_projection` transposed). SD 2.x is refused: diffusers keeps only 23 of its OpenCLIP-H's 24 layers, so its
original checkpoint cannot be written back whole. Where each family's text encoders go, and which keys tell the three
apart (`original_architecture`), are the families' data (`Component.single_file_prefix`, `SingleFile.marks`);
`read_openclip_tensors` reads SDXL's second text encoder alone from a file.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from .. import families
from ..atomic import write_atomic
from ..errors import KronaError
from .unet_paths import rename_child, unet_path_to_sgm

# --- whole checkpoints ------------------------------------------------------------------------------------------------

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# The text encoders' prefixes and layouts (transformers' CLIP names or OpenCLIP's own) are their families' data
# (`Component.single_file_prefix`, `.openclip`), as are the key prefixes that tell a file's family (`SingleFile.marks`).

# diffusers' AutoencoderKL module names -> LDM's, inside a resnet, the mid-block attention and at the ends
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_ENDS = {"conv_norm_out": "norm_out"}
_VAE_LEVEL = re.compile(r"(down|up)_blocks\.(\d+)\.(?:resnets\.(\d+)|downsamplers\.0|upsamplers\.0)\.(.+)")
_VAE_MID = re.compile(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)")

# transformers' CLIP names (with `text_model.`) -> OpenCLIP's, outside the layers and inside layer N
_OPENCLIP_ENDS = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_CLIP_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)")
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def _vae_path(path: str, levels: int) -> str:
    """diffusers' AutoencoderKL parameter path -> LDM's, for a VAE with `levels` resolution levels."""
    half, _, rest = path.partition(".")
    if half not in ("encoder", "decoder"):
        return path  # quant_conv, post_quant_conv
    if level := _VAE_LEVEL.fullmatch(rest):
        kind, i, j, tail = level.groups()
        n = int(i) if kind == "down" else levels - 1 - int(i)
        inner = f"block.{j}.{rename_child(tail, _VAE_RESNET) or tail}" if j else f"{kind}sample.{tail}"
        return f"{half}.{kind}.{n}.{inner}"
    if mid := _VAE_MID.fullmatch(rest):
        kind, i, tail = mid.groups()
        if kind == "resnets":
            return f"{half}.mid.block_{int(i) + 1}.{rename_child(tail, _VAE_RESNET) or tail}"
        return f"{half}.mid.attn_{int(i) + 1}.{rename_child(tail, _VAE_ATTENTION) or tail}"
    return f"{half}.{rename_child(rest, _VAE_ENDS) or rest}"


def _clip_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model's state named as every file names it, `text_model.` included (transformers 5
    leaves it out of `CLIPTextModel`)."""
    return {
        name if name.startswith(("text_model.", "text_projection.")) else "text_model." + name: tensor
        for name, tensor in state.items()
    }


def _openclip_tensors(clip: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' CLIP text tensors (`_clip_tensors`) in OpenCLIP's layout: q, k, v concatenated into `in_proj`,
    the projection as the matrix text features are multiplied by (transformers' weight transposed)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in clip.items():
        if name in _OPENCLIP_ENDS:
            out[_OPENCLIP_ENDS[name]] = tensor
        elif name == "text_projection.weight":
            out["text_projection"] = tensor.T
        elif (layer := _CLIP_LAYER.fullmatch(name)) is None:
            raise KronaError(f"'{name}' is not a CLIP text encoder weight krona can write in OpenCLIP's layout")
        elif layer[2] in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            if layer[2] == "self_attn.q_proj":
                parts = [clip[f"text_model.encoder.layers.{layer[1]}.self_attn.{p}_proj.{layer[3]}"] for p in "qkv"]
                out[f"transformer.resblocks.{layer[1]}.attn.in_proj_{layer[3]}"] = torch.cat(parts)
        else:
            out[f"transformer.resblocks.{layer[1]}.{_OPENCLIP_LAYER[layer[2]]}.{layer[3]}"] = tensor
    return out


def _family(pipe) -> families.Family:
    """The family of a pipeline single-file output can hold whole (SDXL, SD 1.x), else a KronaError saying what to
    do."""
    family = families.recognise_denoiser(pipe.unet.config)
    if family.single_file.refused:
        files = [(f.title, f.single_file) for f in families.FAMILIES if f.single_file]
        writable = [title for title, file in files if not (file.denoiser_only or file.refused)]
        raise KronaError(
            f"single-file (original layout) output supports {' and '.join(writable)}, not {family.title}, "
            f"{family.single_file.refused}; write a diffusers folder instead"
        )
    missing = [name for name in ("vae", *family.text_encoders) if getattr(pipe, name, None) is None]
    if missing:
        raise KronaError(
            f"this {family.name} pipeline has no {', '.join(missing)}; single-file output needs the whole SDXL base or "
            "SD 1.x pipeline: write a diffusers folder instead"
        )
    return family


def _state(pipe, component: str) -> dict[str, torch.Tensor]:
    """A component's state dict, refused where a file of it would be wrong: adapters still injected, or a quantized
    base (weights that are not floating point)."""
    state = getattr(pipe, component).state_dict()
    if any(key.endswith((".kron_a", ".kron_b")) for key in state):
        raise KronaError(f"the {component} still holds Kronecker adapters; merge them into its weights first")
    if any(not tensor.is_floating_point() for tensor in state.values()):
        raise KronaError(
            f"the {component} has weights that are not floating point (a quantized base?); load the base in full "
            "precision to write a single file"
        )
    return state


def _put(out: dict[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]) -> None:
    for key, tensor in tensors.items():
        if key in out:
            raise KronaError(f"two weights land on '{key}' in the original layout; this is a bug in krona: report it")
        out[key] = tensor


def to_original(pipe) -> dict[str, torch.Tensor]:
    """Every weight of an SDXL or SD 1.x pipeline (anything with `unet`, `vae`, `text_encoder`[, `text_encoder_2`])
    under its original-layout name. The tensors are the models' own (or views of them), except OpenCLIP's
    concatenated `in_proj`. SD 2.x, incomplete pipelines, injected adapters and quantized weights raise KronaError."""
    family = _family(pipe)
    out: dict[str, torch.Tensor] = {}
    config = pipe.unet.config
    _put(out, {UNET_PREFIX + unet_path_to_sgm(k, config): t for k, t in _state(pipe, "unet").items()})
    levels = len(pipe.vae.config.block_out_channels)
    vae = {VAE_PREFIX + _vae_path(k, levels): t for k, t in _state(pipe, "vae").items()}
    _put(out, {k: t[:, :, None, None] if ".attn_1." in k and t.ndim == 2 else t for k, t in vae.items()})
    for text in (c for c in family.components if c.role == "text"):
        tensors = _clip_tensors(_state(pipe, text.name))
        if text.openclip:
            tensors = _openclip_tensors(tensors)
        _put(out, {text.single_file_prefix + k: t for k, t in tensors.items()})
    return out


def read_openclip_tensors(path: str | os.PathLike, prefix: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one text encoder of a single file, and no other, under their names in the file: those under
    `prefix`, by default the text encoder its family reads from its own keys alone (SDXL's second, OpenCLIP bigG,
    `conditioner.embedders.1.model.`; see pipeline/single_file.py)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        if prefix is None:
            family = families.recognise_keys(keys)
            alone = [c.single_file_prefix for c in family.components if c.read_alone] if family else []
            if not alone:
                return {}
            prefix = alone[0]
        return {key: f.get_tensor(key) for key in keys if key.startswith(prefix)}


def original_architecture(keys: Iterable[str]) -> str | None:
    """The architecture of an original-layout checkpoint from its keys (`families.recognise_keys`): "sdxl", "sd2",
    "sd15" or None when no key tells."""
    family = families.recognise_keys(keys)
    return family.name if family is not None else None


def _safetensors_header(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype, metadata: Mapping[str, str]) -> bytes:
    """The header of a .safetensors file holding `tensors`, cast to `dtype`, in sorted key order."""
    entries: dict[str, dict] = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}} if metadata else {}
    offset = 0
    for name in sorted(tensors):
        size = tensors[name].numel() * dtype.itemsize
        shape = list(tensors[name].shape)
        entries[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as with safetensors' own writer
    return struct.pack("<Q", len(header)) + header


def _write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype, metadata) -> Path:
    """`tensors` as a .safetensors file, written atomically and streamed one cast tensor at a time (the file is never
    built in memory)."""

    def stream(f) -> None:
        f.write(_safetensors_header(tensors, dtype, metadata))
        for name in sorted(tensors):
            f.write(tensors[name].detach().to("cpu", dtype).contiguous().reshape(-1).view(torch.uint8).numpy())

    return write_atomic(path, stream)


def save_single_file(pipe, path: str | os.PathLike, dtype: torch.dtype, metadata: dict[str, str] | None = None) -> Path:
    """Write `to_original(pipe)` as one .safetensors file, every tensor cast to `dtype`, atomically. The extra memory
    is one tensor's worth (plus OpenCLIP's concatenated q, k, v), not a second copy of the model."""
    if dtype not in _SAFETENSORS_DTYPES:
        raise KronaError(f"cannot write a checkpoint in {dtype}; use fp32, fp16 or bf16")
    return _write_safetensors(Path(path), to_original(pipe), dtype, metadata or {})
