"""A tiny, offline, random-weight Qwen-Image-shaped diffusers pipeline for tests and smoke runs (as tiny_flux.py for
FLUX.1): 2 double-stream blocks 32 wide (2 heads of 16, rotary axes 8 + 4 + 4); a Qwen2.5-VL model 16 wide (its
vision tower 2 blocks, unused for text-to-image as in the real pipeline); the byte-level Qwen-style tokenizer
(tiny_qwen.py), whose vocabulary the VL model's special token ids follow; a 16-channel 8x Wan-style VAE with the
real model's per-channel latent means and deviations; the real scheduler's settings as third-party copies give them."""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from .tiny_qwen import build_qwen_tokenizer

_TEXT_WIDTH = 16


def _text_encoder(vocab: int) -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL at toy size: 2 text layers (multimodal rotary sections 1 + 1 + 2), a 2-block vision tower; the
    image and video token ids past the tokenizer's vocabulary (text-to-image prompts never hold them)."""
    text = dict(
        hidden_size=_TEXT_WIDTH,
        intermediate_size=2 * _TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
        rope_theta=1000000.0,
        vocab_size=vocab + 4,
    )
    vision = dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=_TEXT_WIDTH)
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        vocab_size=vocab + 4,
        vision_start_token_id=vocab,
        vision_end_token_id=vocab + 1,
        image_token_id=vocab + 2,
        video_token_id=vocab + 3,
        bos_token_id=None,
        eos_token_id=None,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def build_tiny(arch: str, seed: int = 0) -> QwenImagePipeline:
    """The tiny Qwen-Image pipeline, its weights drawn under `torch.manual_seed(seed)` in a forked RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = build_qwen_tokenizer()
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=1.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=0.9,
            base_image_seq_len=256,
            max_image_seq_len=8192,
            shift_terminal=0.02,
        )
        transformer = QwenImageTransformer2DModel(
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=_TEXT_WIDTH,
            axes_dims_rope=(8, 4, 4),
        )
        vae = AutoencoderKLQwenImage(base_dim=8, num_res_blocks=1)
        return QwenImagePipeline(
            scheduler=scheduler,
            vae=vae,
            text_encoder=_text_encoder(len(tokenizer)),
            tokenizer=tokenizer,
            transformer=transformer,
        )
