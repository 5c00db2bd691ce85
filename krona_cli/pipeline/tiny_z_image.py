"""A tiny, offline, random-weight Z-Image-shaped diffusers pipeline for tests and smoke runs (as tiny_flux.py for
FLUX.1): a single-stream DiT of 2 joint layers and one text and one image refiner layer, 32 wide (2 heads of 16,
rotary axes 8 + 4 + 4); a Qwen3 text model 32 wide; a byte-level Qwen-style tokenizer with Qwen3's chat template
(thinking on and off, as the real one); the 16-channel 8x VAE with FLUX's scale and shift; Z-Image's scheduler
(static shift 6). Every projection divides by 2, 4, 8 and 16."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from transformers import Qwen3Model

from .tiny import tiny_vae
from .tiny_qwen import build_qwen_tokenizer, qwen3_config

_WIDTH = 32


def _transformer() -> ZImageTransformer2DModel:
    model = ZImageTransformer2DModel(
        in_channels=16,
        dim=_WIDTH,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=_WIDTH,
        axes_dims=[8, 4, 4],
        axes_lens=[256, 32, 32],
    )
    with torch.no_grad():  # made with torch.empty: drawn here, so a seed gives the same model
        model.x_pad_token.normal_()
        model.cap_pad_token.normal_()
    return model


def build_tiny(arch: str, seed: int = 0) -> ZImagePipeline:
    """The tiny Z-Image pipeline, its weights drawn under `torch.manual_seed(seed)` in a forked RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = build_qwen_tokenizer()
        return ZImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=6.0),
            vae=tiny_vae(0.3611, 16, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
            text_encoder=Qwen3Model(qwen3_config(tokenizer, _WIDTH, layers=2)),
            tokenizer=tokenizer,
            transformer=_transformer(),
        )
