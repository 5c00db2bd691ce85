"""The base-model architectures krona knows, as data: the public configs shipped in configs/ and how an architecture is
told from a UNet's config or its cross-attention width. No torch, no pipelines: file formats and model loading both
read it."""

from __future__ import annotations

import json
from pathlib import Path

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


def native_resolution(arch: str) -> int:
    """The image size an architecture was trained at and samples at by default: 1024 px for SDXL, 512 otherwise."""
    return 1024 if arch == "sdxl" else 512


LAYERS_DIR = MODEL_CONFIGS_DIR / "layers"


def linear_layers(arch: str) -> dict[str, list[tuple[str, int, int]]]:
    """Every nn.Linear of each adaptable component of a real architecture, as (name, d_out, d_in) in module order:
    data in configs/models/layers/ARCH.json, written by scripts/layer_lists.py from the diffusers and transformers
    models built on the meta device (tests/test_plan.py holds them equal), so `krona plan` needs no model library."""
    data = json.loads((LAYERS_DIR / f"{check_arch(arch)}.json").read_text())
    return {component: [tuple(layer) for layer in layers] for component, layers in data["components"].items()}
