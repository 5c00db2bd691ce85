"""What the Stable Diffusion families (SD 1.x, SD 2.x, SDXL) share: a UNet denoiser read through CLIP text encoders."""

from __future__ import annotations

from .base import Component

UNET = "unet"
CLIP_L = Component("text_encoder", "text", "clip_vit_l_text.json")
