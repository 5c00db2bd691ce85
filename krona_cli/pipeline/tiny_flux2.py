"""A tiny, offline, random-weight FLUX.2 [klein]-shaped diffusers pipeline for tests and smoke runs (as tiny_flux.py for
FLUX.1): 2 double- and 2 single-stream blocks 32 wide (2 heads of 16, rotary axes 4 + 4 + 4 + 4), no guidance input;
a Qwen3 causal LM 16 wide with the 27 layers whose 9th, 18th and 27th states the transformer reads (48 wide side by
side); the byte-level Qwen-style tokenizer with Qwen3's chat template (tiny_qwen.py); a 32-channel 8x FLUX.2 VAE
whose batch-norm statistics are drawn away from 0 and 1, so that training that skipped them would show; FLUX.1
[dev]'s flow-matching scheduler settings."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
from transformers import Qwen3ForCausalLM

from .tiny_flux import flux_scheduler
from .tiny_qwen import build_qwen_tokenizer, qwen3_config

_TEXT_WIDTH = 16


def _vae() -> AutoencoderKLFlux2:
    vae = AutoencoderKLFlux2(
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=32,
        norm_num_groups=4,
        sample_size=64,
    )
    with torch.no_grad():
        vae.bn.running_mean.normal_(0.0, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    return vae


def build_tiny(arch: str, seed: int = 0) -> Flux2KleinPipeline:
    """The tiny FLUX.2 [klein] pipeline (undistilled), its weights drawn under `torch.manual_seed(seed)` in a forked
    RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = build_qwen_tokenizer()
        text = qwen3_config(tokenizer, _TEXT_WIDTH, layers=27, tie_word_embeddings=True)
        transformer = Flux2Transformer2DModel(
            in_channels=128,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=3 * _TEXT_WIDTH,
            axes_dims_rope=(4, 4, 4, 4),
            guidance_embeds=False,
        )
        scheduler: FlowMatchEulerDiscreteScheduler = flux_scheduler()
        return Flux2KleinPipeline(
            scheduler=scheduler,
            vae=_vae(),
            text_encoder=Qwen3ForCausalLM(text),
            tokenizer=tokenizer,
            transformer=transformer,
        )
