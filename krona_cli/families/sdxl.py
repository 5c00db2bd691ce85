"""SDXL: two CLIP text encoders (ViT-L and OpenCLIP bigG, 2048-wide states together) and text-time conditioning."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Component, ConfigGet
from .prompts import Conditioning, tokenize
from .unet import CLIP_L, UNET, UNET_LORA_MODULES, UNET_SCHEDULERS, UNetFamily


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


SDXL = SDXLFamily(
    name="sdxl",
    title="SDXL",
    pipeline_class="StableDiffusionXLPipeline",
    components=(
        Component(UNET, "denoiser", "sdxl_unet.json"),
        CLIP_L,
        Component("text_encoder_2", "text", "clip_vit_bigg_text.json", "tokenizer_2"),
    ),
    context_width=2048,
    default_resolution=1024,
    lora_modules=UNET_LORA_MODULES,
    schedulers=UNET_SCHEDULERS,
    layer_list=True,
)
