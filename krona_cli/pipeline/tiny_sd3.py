"""A tiny, offline, random-weight SD3.5-shaped diffusers pipeline for tests and smoke runs (as tiny_flux.py for FLUX.1):
an MM-DiT of 2 joint blocks, the first with SD3.5 Medium's second image attention (`attn2`) and every one with its
RMS q/k norms, the last without text outputs, as in the real model; two CLIP encoders with projections (ViT-L's and
bigG's roles), a T5-style encoder, a 16-channel 8x VAE with SD3's scale and shift, and SD3's scheduler (shift 3).

Widths: both CLIPs 16 (their states side by side fill T5's 32), the transformer 32 (2 heads of 16), its feed-forward
128: every projection divides by 2, 4, 8 and 16."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextModelWithProjection

from .tiny import build_tokenizer, clip_text_config, tiny_vae
from .tiny_flux import build_t5_tokenizer, t5_encoder

_CLIP_WIDTH = 16
_WIDTH = 32


def _transformer() -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=8,  # 64-pixel pictures
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_WIDTH,  # T5's width
        caption_projection_dim=_WIDTH,
        pooled_projection_dim=2 * _CLIP_WIDTH,  # both CLIPs' projections side by side
        pos_embed_max_size=32,  # up to 512 pixels a side
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )


def build_tiny(arch: str, seed: int = 0) -> StableDiffusion3Pipeline:
    """The tiny SD3.5 pipeline, its weights drawn under `torch.manual_seed(seed)` in a forked RNG (the same seed gives
    the same weights; the caller's RNG is left alone)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer, tokenizer_2, tokenizer_3 = build_tokenizer(), build_tokenizer(), build_t5_tokenizer()
        return StableDiffusion3Pipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
            vae=tiny_vae(1.5305, 16, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
            text_encoder=CLIPTextModelWithProjection(clip_text_config(tokenizer, _CLIP_WIDTH, "quick_gelu")),
            tokenizer=tokenizer,
            text_encoder_2=CLIPTextModelWithProjection(clip_text_config(tokenizer_2, _CLIP_WIDTH, "gelu")),
            tokenizer_2=tokenizer_2,
            text_encoder_3=t5_encoder(tokenizer_3, _WIDTH),
            tokenizer_3=tokenizer_3,
            transformer=_transformer(),
        )
