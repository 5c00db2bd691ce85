"""Stable Diffusion 1.x: one CLIP ViT-L text encoder, 768-wide text states, 512 px."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Component, ConfigGet
from .unet import CLIP_L, NO_SAFETY_CHECKER, UNET, UNET_LORA_MODULES, UNET_SCHEDULERS, UNetFamily


@dataclass(frozen=True)
class SD15Family(UNetFamily):
    def matches_denoiser(self, get: ConfigGet) -> bool:
        return get("addition_embed_type") != "text_time" and get("cross_attention_dim") == self.context_width


SD15 = SD15Family(
    name="sd15",
    title="SD 1.x",
    pipeline_class="StableDiffusionPipeline",
    components=(Component(UNET, "denoiser", "sd15_unet.json"), CLIP_L),
    context_width=768,
    default_resolution=512,
    load_extras=NO_SAFETY_CHECKER,
    lora_modules=UNET_LORA_MODULES,
    schedulers=UNET_SCHEDULERS,
    layer_list=True,
)
