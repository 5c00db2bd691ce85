"""What the Stable Diffusion families (SD 1.x, SD 2.x, SDXL) share: a UNet denoiser read through CLIP text encoders,
trained on a DDPM schedule (epsilon or v-prediction, as the base model's scheduler says)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .base import Component, Family, SamplerDefaults
from .prompts import Conditioning, tokenize

UNET_SAMPLER = SamplerDefaults(steps=30, guidance=7.0, preview_steps=25)

UNET = "unet"
CLIP_L = Component("text_encoder", "text", "clip_vit_l_text.json", "tokenizer")
# What a single file of a UNet family holds
WHOLE_FILE = "the whole pipeline in the original layout"
# SD 1.x and 2.x pipelines load without their safety checker (its weights are not in single files, nor needed)
NO_SAFETY_CHECKER = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
# krona's sampler names -> diffusers scheduler classes, each built from the pipeline's own scheduler config so that it
# keeps the model's beta schedule, prediction type and timestep spacing
UNET_SCHEDULERS = {
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
}
# peft's target module names of the UNet presets (diffusers' DreamBooth LoRA scripts' choice)
UNET_LORA_MODULES = {
    "attn": ["to_q", "to_k", "to_v", "to_out.0"],
    "attn-ff": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"],
}


def unet(config: str) -> Component:
    """A UNet denoiser with this shipped config, `lora_unet_` in kohya's names."""
    return Component(UNET, "denoiser", config, kohya_prefix="lora_unet_")


@dataclass(frozen=True)
class UNetFamily(Family):
    """SD 1.x and 2.x as they are; SDXL overrides the prompt encoding and the denoiser call. This is what diffusers'
    DreamBooth scripts compute (no classifier-free guidance, no prompt weighting)."""

    # 30 steps (25 in training's grids) at classifier-free guidance 7.0, the DiffuseKronA paper's best
    samplers: Mapping[str, SamplerDefaults] = field(default_factory=lambda: {"": UNET_SAMPLER})

    def encode_prompts(self, tokenizers: list, text_models: list, prompts: list[str]) -> Conditioning:
        """The last hidden state of the one CLIP encoder."""
        encoder = text_models[0]
        device = next(encoder.parameters()).device
        return Conditioning(encoder(tokenize(tokenizers[0], prompts).to(device))[0])

    def denoise(self, model, noisy, timesteps, cond: Conditioning, geometry, dtype):
        return model(noisy.to(dtype), timesteps, cond.embeds.to(dtype)).sample

    def objective(self, scheduler_config: Mapping):
        from .ddpm import DDPM

        return DDPM.from_scheduler_config(scheduler_config)
