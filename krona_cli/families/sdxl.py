"""SDXL: two CLIP text encoders (ViT-L and OpenCLIP bigG, 2048-wide states together) and text-time conditioning."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .base import Component, ConfigGet, SingleFile, UiNames
from .prompts import Conditioning, tokenize
from .unet import CLIP_L, UNET_LORA_MODULES, UNET_SCHEDULERS, WHOLE_FILE, UNetFamily, unet


@dataclass(frozen=True)
class SDXLFamily(UNetFamily):
    def matches_denoiser(self, get: ConfigGet) -> bool:
        return get("addition_embed_type") == "text_time"

    def encode_prompts(self, tokenizers: list, text_models: list, prompts: list[str]) -> Conditioning:
        """The penultimate hidden states of both CLIP encoders, concatenated on the feature axis, and the pooled
        (projected) output of the second one."""
        import torch

        hidden, pooled = [], None
        for tokenizer, encoder in zip(tokenizers, text_models):
            device = next(encoder.parameters()).device
            out = encoder(tokenize(tokenizer, prompts).to(device), output_hidden_states=True)
            pooled = out[0]  # the last encoder's projected pooled output is the one SDXL uses
            hidden.append(out.hidden_states[-2])
        return Conditioning(torch.cat(hidden, dim=-1), pooled)

    def unused_text_layers(self, pipe) -> dict[str, int]:
        """SDXL reads the first encoder's penultimate hidden states only: its last layer."""
        return {"text_encoder": pipe.text_encoder.config.num_hidden_layers - 1}

    def denoise(self, model, noisy, timesteps, cond: Conditioning, geometry, dtype):
        """The UNet with SDXL's added conditions: the pooled text and each image's micro-conditioning."""
        extra = {"added_cond_kwargs": {"text_embeds": cond.pooled.to(dtype), "time_ids": geometry}}
        return model(noisy.to(dtype), timesteps, cond.embeds.to(dtype), **extra).sample


# its single file: CLIP ViT-L in transformers' names, OpenCLIP bigG in its own layout
_OPENCLIP_PREFIX = "conditioner.embedders.1.model."

SDXL = SDXLFamily(
    name="sdxl",
    title="SDXL",
    pipeline_class="StableDiffusionXLPipeline",
    components=(
        unet("sdxl_unet.json"),
        dataclasses.replace(
            CLIP_L, kohya_prefix="lora_te1_", single_file_prefix="conditioner.embedders.0.transformer."
        ),
        Component(
            "text_encoder_2",
            "text",
            "clip_vit_bigg_text.json",
            "tokenizer_2",
            pad="!",
            kohya_prefix="lora_te2_",
            single_file_prefix=_OPENCLIP_PREFIX,
            openclip=True,
            read_alone=True,
        ),
    ),
    context_width=2048,
    default_resolution=1024,
    lora_modules=UNET_LORA_MODULES,
    schedulers=UNET_SCHEDULERS,
    layer_list=True,
    buckets_by_default=True,
    ui=UiNames(
        modelspec_id="stable-diffusion-xl-v1-base",
        resolution=1024,
        base_model_version="sdxl_base_v1-0",  # A1111/Forge take a file for SDXL when it starts with `sdxl_`
        reads_versions=("sdxl_",),
        v2="False",
    ),
    single_file=SingleFile(WHOLE_FILE, marks=(_OPENCLIP_PREFIX,), vae="sdxl_vae.json", scheduler="sdxl_scheduler.json"),
    tiny=("sdxl",),
)
