"""A tiny, offline, random-weight Z-Image-shaped diffusers pipeline for tests and smoke runs (as tiny_flux.py for
FLUX.1): a single-stream DiT of 2 joint layers and one text and one image refiner layer, 32 wide (2 heads of 16,
rotary axes 8 + 4 + 4); a Qwen3 text model 32 wide; a byte-level Qwen-style tokenizer with Qwen3's chat template
(thinking on and off, as the real one); the 16-channel 8x VAE with FLUX's scale and shift; Z-Image's scheduler
(static shift 6). Every projection divides by 2, 4, 8 and 16."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from transformers import Qwen2Tokenizer, Qwen3Config, Qwen3Model

from .clip_tokenizer import bytes_to_unicode
from .tiny import tiny_vae

_WIDTH = 32
_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
# Qwen3's chat template, cut to what the pipelines use: the messages, the assistant's turn, and with thinking off the
# empty thinking block Qwen3 writes
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def build_qwen_tokenizer() -> Qwen2Tokenizer:
    """A byte-level tokenizer in Qwen's layout without merges (every byte a token), its special tokens after the 256
    byte symbols (`<|endoftext|>` pads), and the chat template."""
    vocab = {symbol: i for i, symbol in enumerate(bytes_to_unicode().values())}
    vocab |= {token: len(vocab) + i for i, token in enumerate(_SPECIALS)}
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        model_max_length=131072,
        chat_template=CHAT_TEMPLATE,
        additional_special_tokens=_SPECIALS[1:],
    )


def qwen3_config(tokenizer: Qwen2Tokenizer, width: int, layers: int, **more) -> Qwen3Config:
    """A Qwen3 text model's config `width` wide (2 heads, as many key/value heads) and `layers` deep, its vocabulary
    and pad id the tokenizer's."""
    return Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=width // 2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        **more,
    )


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


def build_tiny_z_image_pipeline(seed: int = 0) -> ZImagePipeline:
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
