"""Stable Diffusion 1.x: one CLIP ViT-L text encoder, 768-wide text states, 512 px."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .base import ConfigGet, SingleFile, UiNames
from .unet import (
    CLIP_L,
    NO_SAFETY_CHECKER,
    UNET_LORA_MODULES,
    UNET_SCHEDULERS,
    WHOLE_FILE,
    UNetFamily,
    unet,
)


@dataclass(frozen=True)
class SD15Family(UNetFamily):
    def matches_denoiser(self, get: ConfigGet) -> bool:
        return get("addition_embed_type") != "text_time" and get("cross_attention_dim") == self.context_width


_TEXT_PREFIX = "cond_stage_model.transformer."  # CLIP ViT-L in transformers' names, in a single file

SD15 = SD15Family(
    name="sd15",
    title="SD 1.x",
    pipeline_class="StableDiffusionPipeline",
    components=(
        unet("sd15_unet.json"),
        dataclasses.replace(CLIP_L, kohya_prefix="lora_te_", single_file_prefix=_TEXT_PREFIX),
    ),
    context_width=768,
    default_resolution=512,
    load_extras=NO_SAFETY_CHECKER,
    lora_modules=UNET_LORA_MODULES,
    schedulers=UNET_SCHEDULERS,
    layer_list=True,
    ui=UiNames(
        modelspec_id="stable-diffusion-v1",
        resolution=512,
        base_model_version="sd_v1",
        reads_versions=("sd_v1",),
        v2="False",
    ),
    single_file=SingleFile(WHOLE_FILE, marks=(_TEXT_PREFIX,), vae="sd15_vae.json", scheduler="sd15_scheduler.json"),
    tiny=("sd15",),
)
