"""SDXL: two CLIP text encoders (ViT-L and OpenCLIP bigG, 2048-wide states together) and text-time conditioning."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Component, ConfigGet, Family
from .unet import CLIP_L, UNET


@dataclass(frozen=True)
class SDXLFamily(Family):
    def matches_denoiser(self, get: ConfigGet) -> bool:
        return get("addition_embed_type") == "text_time"


SDXL = SDXLFamily(
    name="sdxl",
    title="SDXL",
    pipeline_class="StableDiffusionXLPipeline",
    components=(
        Component(UNET, "denoiser", "sdxl_unet.json"),
        CLIP_L,
        Component("text_encoder_2", "text", "clip_vit_bigg_text.json"),
    ),
    context_width=2048,
    default_resolution=1024,
    layer_list=True,
)
