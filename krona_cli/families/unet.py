"""What the Stable Diffusion families (SD 1.x, SD 2.x, SDXL) share: a UNet denoiser read through CLIP text encoders."""

from __future__ import annotations

from .base import Component

UNET = "unet"
CLIP_L = Component("text_encoder", "text", "clip_vit_l_text.json")
# SD 1.x and 2.x pipelines load without their safety checker (its weights are not in single files, nor needed)
NO_SAFETY_CHECKER = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
