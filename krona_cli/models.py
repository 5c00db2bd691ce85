"""Base-model architectures: the public SDXL and SD 1.5 configs, built without weights on the meta device."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import KronaError

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
MODEL_CONFIGS_DIR = CONFIGS_DIR / "models"

# component name (as in a diffusers pipeline folder) -> config file under configs/models/
ARCHITECTURES: dict[str, dict[str, str]] = {
    "sdxl": {
        "unet": "sdxl_unet.json",
        "text_encoder": "clip_vit_l_text.json",
        "text_encoder_2": "clip_vit_bigg_text.json",
    },
    "sd15": {
        "unet": "sd15_unet.json",
        "text_encoder": "clip_vit_l_text.json",
    },
}


def check_arch(arch: str) -> str:
    if arch not in ARCHITECTURES:
        raise KronaError(f"unknown architecture '{arch}'; use one of {', '.join(ARCHITECTURES)}")
    return arch


def load_model_config(name: str) -> dict:
    """A config file from configs/models/, without its `_comment`."""
    path = MODEL_CONFIGS_DIR / name
    config = json.loads(path.read_text())
    config.pop("_comment", None)
    return config


def build_component(arch: str, component: str, device: str | torch.device = "meta") -> nn.Module:
    """One component (unet, text_encoder, text_encoder_2) of a real architecture, random or meta weights."""
    files = ARCHITECTURES[check_arch(arch)]
    if component not in files:
        raise KronaError(f"architecture '{arch}' has no component '{component}'; it has {', '.join(files)}")
    config = load_model_config(files[component])
    with torch.device(device):
        if component == "unet":
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel.from_config(config)
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        cls = CLIPTextModelWithProjection if config.pop("architectures") == ["CLIPTextModelWithProjection"] else CLIPTextModel
        return cls(CLIPTextConfig(**config))


def build_meta_components(arch: str) -> dict[str, nn.Module]:
    """Every adaptable component of a real architecture, on the meta device (no memory, no download)."""
    return {component: build_component(arch, component) for component in ARCHITECTURES[check_arch(arch)]}


# Width of the text states the UNet's cross-attention reads (attn2.to_k / to_v inputs), per architecture.
ARCH_BY_CONTEXT_WIDTH = {2048: "sdxl", 768: "sd15", 1024: "sd2"}


def architecture_from_context_widths(widths: set[int]) -> str | None:
    """The architecture whose cross-attention reads text of these widths; None unless they name exactly one."""
    found = {ARCH_BY_CONTEXT_WIDTH.get(w) for w in widths}
    return found.pop() if len(found) == 1 else None


def architecture_of(unet_config) -> str:
    """`sdxl` for SDXL-style UNets (text-time conditioning), else `sd15` (SD 1.x) or `sd2` (1024-wide text)."""
    get = unet_config.get if isinstance(unet_config, dict) else lambda k, d=None: getattr(unet_config, k, d)
    if get("addition_embed_type") == "text_time":
        return "sdxl"
    return "sd2" if architecture_from_context_widths({get("cross_attention_dim")}) == "sd2" else "sd15"


def load_pipeline(
    pretrained: str,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    vae: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
):
    """A diffusers SDXL or SD pipeline from a local folder, a single .safetensors checkpoint, or a hub id.

    `vae` replaces the pipeline's VAE (a diffusers AutoencoderKL folder or hub id); `revision` and `variant`
    (e.g. fp16) pick the files of a hub model or folder. Returns (pipeline, architecture). Local paths never touch
    the network.
    """
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    path = Path(pretrained).expanduser()
    sd_extras = {"safety_checker": None, "requires_safety_checker": False}
    choice = {k: v for k, v in (("revision", revision), ("variant", variant)) if v}
    # diffusers 0.42 renamed torch_dtype to dtype and warns on the old name; krona keeps the name older releases know
    warnings.filterwarnings("ignore", message=".*`torch_dtype` is deprecated", category=FutureWarning)
    try:
        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise KronaError(
                    f"'{pretrained}' is a folder but not a diffusers pipeline (no model_index.json); "
                    "give a pipeline folder, a single .safetensors checkpoint or a hub id"
                )
            index = json.loads((path / "model_index.json").read_text())
            extras = sd_extras if index.get("_class_name") == "StableDiffusionPipeline" else {}
            pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=dtype, **extras, **choice)
        elif path.is_file():
            if path.suffix != ".safetensors":
                raise KronaError(f"'{pretrained}' is not a .safetensors checkpoint; krona never loads pickles")
            try:
                pipe = StableDiffusionXLPipeline.from_single_file(str(path), torch_dtype=dtype)
            except Exception:
                pipe = StableDiffusionPipeline.from_single_file(str(path), torch_dtype=dtype, **sd_extras)
        elif path.suffix or path.is_absolute() or str(pretrained).startswith("."):
            raise KronaError(f"base model '{pretrained}' does not exist; check the path")
        else:
            pipe = DiffusionPipeline.from_pretrained(pretrained, torch_dtype=dtype, **choice)
    except KronaError:
        raise
    except Exception as e:
        raise KronaError(
            f"could not load the base model '{pretrained}': {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
            "give a local diffusers folder, a single .safetensors checkpoint, or a hub id while online"
        ) from None
    if not hasattr(pipe, "unet"):
        raise KronaError(f"'{pretrained}' is a {type(pipe).__name__}, not an SDXL or SD pipeline with a UNet")
    if vae:
        pipe.vae = load_vae(vae, dtype)
    return pipe.to(device), architecture_of(pipe.unet.config)


def load_vae(name: str, dtype: torch.dtype = torch.float32):
    """A diffusers AutoencoderKL from a folder (with or without a `vae` sub-folder) or a hub id."""
    from diffusers import AutoencoderKL

    path = Path(name).expanduser()
    if path.is_dir() and (path / "vae" / "config.json").is_file():
        path = path / "vae"
    elif not path.is_dir() and (path.suffix or path.is_absolute() or name.startswith(".")):
        raise KronaError(f"VAE '{name}' does not exist; give a diffusers VAE folder or a hub id (--vae)")
    try:
        return AutoencoderKL.from_pretrained(path if path.is_dir() else name, torch_dtype=dtype)
    except Exception as e:
        raise KronaError(f"could not load the VAE '{name}': {type(e).__name__}; give a diffusers VAE folder or hub id") from None


def cast(model: nn.Module, device, dtype: torch.dtype) -> None:
    """Move and cast a model; diffusers' warning about modules to keep in float32 (none, in these models) is muted."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        model.to(device, dtype)
    finally:
        diffusers_logging.set_verbosity(level)
