"""Tiny Qwen text models' parts, built offline: a byte-level tokenizer in Qwen's layout with Qwen3's chat template,
and a Qwen3 config of a given width and depth (the text encoders of several families' tiny pipelines)."""

from __future__ import annotations

from transformers import Qwen2Tokenizer, Qwen3Config

from .clip_tokenizer import bytes_to_unicode

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
