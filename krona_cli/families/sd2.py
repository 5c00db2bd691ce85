"""Stable Diffusion 2.x: one OpenCLIP ViT-H text encoder, 1024-wide text states. Trained at 512 px by default (the
768-px v-prediction models included: docs/families-plan.md §5.1)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Component, ConfigGet
from .unet import NO_SAFETY_CHECKER, UNET, UNET_LORA_MODULES, UNET_SCHEDULERS, UNetFamily


@dataclass(frozen=True)
class SD2Family(UNetFamily):
    def matches_denoiser(self, get: ConfigGet) -> bool:
        return get("addition_embed_type") != "text_time" and get("cross_attention_dim") == self.context_width


SD2 = SD2Family(
    name="sd2",
    title="SD 2.x",
    pipeline_class="StableDiffusionPipeline",
    components=(
        Component(UNET, "denoiser", "sd2_unet.json"),
        Component("text_encoder", "text", "clip_vit_h_text.json", "tokenizer"),
    ),
    context_width=1024,
    default_resolution=512,
    load_extras=NO_SAFETY_CHECKER,
    lora_modules=UNET_LORA_MODULES,
    schedulers=UNET_SCHEDULERS,
    layer_list=False,
)
