"""Base-model architectures: the public SDXL and SD 1.5 configs, built without weights on the meta device."""

from __future__ import annotations

import json
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
