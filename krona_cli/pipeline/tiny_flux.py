"""A tiny, offline, random-weight FLUX.1-shaped diffusers pipeline for tests and smoke runs.

Like :mod:`krona_cli.pipeline.tiny` for SDXL and SD 1.5, everything is built in-process in about a second, with no
model hub access:

* :func:`build_t5_tokenizer` lays out a small T5-style Unigram tokenizer (``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2,
  Metaspace pre-tokenizer, ``</s>`` appended to every sequence) over the same corpus of prompt words as
  :func:`~krona_cli.pipeline.tiny.build_tokenizer`, without sentencepiece.
* :func:`build_tiny_flux_pipeline` assembles a :class:`~diffusers.FluxPipeline` whose components keep FLUX.1's
  structure: an MM-DiT with double-stream and single-stream blocks, 3-axis rotary embeddings and (dev-like) a
  guidance embedding; a 16-channel, 8x VAE with FLUX's scaling and shift factors and no quant convs; a CLIP-L-like
  encoder whose pooled output conditions the transformer; a T5-encoder-like text model it attends to; and
  FLUX.1-dev's (or schnell's) flow-matching scheduler.
* :func:`make_tiny_flux` saves such a pipeline with ``save_pretrained`` into a folder that
  ``FluxPipeline.from_pretrained(folder)`` loads like a real checkpoint.

The transformer is 32 wide (2 heads of 16), so every attention projection (``to_q``, ``to_k``, ``to_v``,
``to_out.0``, ``add_q_proj``, ``add_k_proj``, ``add_v_proj``, ``to_add_out``) is 32 -> 32, and the single blocks'
``proj_mlp`` is 32 -> 128 and ``proj_out`` 160 -> 32: all divisible by 2, 4, 8 and 16, so Kronecker factorisations
such as 2x2, 4x4 or 8x4 divide every one of them.
"""

from __future__ import annotations

import math
import string
from collections import Counter
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, T5Config, T5EncoderModel, T5Tokenizer

from krona_cli.pipeline.tiny import _CORPUS, build_tokenizer, clip_text_config, tiny_vae

__all__ = ["build_t5_tokenizer", "build_tiny_flux_pipeline", "flux_scheduler", "make_tiny_flux", "t5_encoder"]

#: T5's special pieces, at T5's ids 0, 1 and 2.
_T5_SPECIALS = ("<pad>", "</s>", "<unk>")
#: SentencePiece's word-boundary mark, which the Metaspace pre-tokenizer puts before every word.
_SPACE = "\u2581"
#: FLUX.1's T5 context: ``FluxPipeline`` refuses ``max_sequence_length`` above 512.
_T5_MAX_LENGTH = 512
#: Width of both text encoders and of the transformer's attention (2 heads of 16).
_WIDTH = 32


def _t5_vocab(corpus: str) -> list[tuple[str, float]]:
    """T5's vocabulary layout with Unigram log-probability scores: the specials, the bare word mark, every corpus
    word and its capitalised form as one ``▁word`` piece, then single characters as the fallback.

    Character pieces score far below any word piece, and a word piece only matches at a word start (after the mark),
    so the best segmentation of every corpus word is the word itself; other words fall back to ``▁`` plus
    characters, and characters outside the alphabet to ``<unk>``, as in T5.
    """
    counts = Counter(corpus.split())
    total = sum(counts.values())
    pieces: dict[str, float] = {_SPACE: math.log(0.5)}
    for word in sorted(counts):
        score = math.log(counts[word] / total)
        pieces.setdefault(_SPACE + word, score)
        pieces.setdefault(_SPACE + word.capitalize(), score - 1.0)
    floor = min(pieces.values()) - 10.0
    for char in string.ascii_letters + string.digits + string.punctuation:
        pieces.setdefault(char, floor)
    return [(token, 0.0) for token in _T5_SPECIALS] + list(pieces.items())


def build_t5_tokenizer(extra_words: str = "", max_length: int = _T5_MAX_LENGTH) -> T5Tokenizer:
    """A small T5-style Unigram tokenizer, identical on every call and in every process; ``extra_words`` join the
    built-in corpus (each then one token, as are the corpus words and their capitalised forms).

    Built with transformers' own ``T5Tokenizer(vocab=[(piece, score), ...])``, so it has T5's Metaspace
    pre-tokenizer and decoder and the ``</s>`` post-processor, and ``save_pretrained`` writes a ``tokenizer.json``
    that ``T5Tokenizer.from_pretrained`` reloads offline (no ``spiece.model``). Ids: ``<pad>`` 0, ``</s>`` 1,
    ``<unk>`` 2; no sentinel ``<extra_id_*>`` tokens; context length ``max_length`` (FLUX's T5 maximum by default:
    krona pads prompts to it in training and sampling).
    """
    return T5Tokenizer(vocab=_t5_vocab(_CORPUS + extra_words), extra_ids=0, model_max_length=max_length)


def t5_encoder(tokenizer: T5Tokenizer, width: int = _WIDTH) -> T5EncoderModel:
    """A T5 v1.1-style encoder (gated GELU, untied embeddings) of 2 layers and 4 heads, ``width`` wide (32: FLUX's
    T5-XXL at 1/128 the width)."""
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=width // 4,
        num_heads=4,
        d_ff=2 * width,
        num_layers=2,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def _flux_vae() -> AutoencoderKL:
    """FLUX's VAE layout at tiny size: 16 latent channels, no quant / post-quant convs, FLUX.1's scale and shift."""
    return tiny_vae(0.3611, 16, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)


def _flux_transformer(guidance_embeds: bool) -> FluxTransformer2DModel:
    """FLUX.1's MM-DiT with 2 double-stream and 2 single-stream blocks, 2 heads of 16 channels (rotary axes 4 + 6 + 6
    for the id, row and column positions), over 2x2-packed 16-channel latents (64 inputs)."""
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16 * 4,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_WIDTH,  # the T5 encoder's width
        pooled_projection_dim=_WIDTH,  # the CLIP encoder's width
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )


def flux_scheduler(guidance_embeds: bool = True) -> FlowMatchEulerDiscreteScheduler:
    """Flow-matching Euler as FLUX.1-dev ships it (resolution-dependent shift) or, without the guidance embedding, as
    FLUX.1-schnell does (no shift)."""
    if not guidance_embeds:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def build_tiny(arch: str, seed: int = 0) -> FluxPipeline:
    """make-tiny's `flux` (dev-like) or `flux-schnell` (see build_tiny_flux_pipeline)."""
    return build_tiny_flux_pipeline(seed, guidance_embeds=arch == "flux")


def build_tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True) -> FluxPipeline:
    """Build a tiny random-weight :class:`~diffusers.FluxPipeline` in memory: FLUX.1-dev-like with
    ``guidance_embeds`` (a guidance embedding and dev's shifted scheduler), schnell-like without.

    Weights are drawn under ``torch.manual_seed(seed)`` inside a forked RNG, so the same seed always gives the same
    weights and the caller's global RNG state is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = build_tokenizer()
        tokenizer_2 = build_t5_tokenizer()
        return FluxPipeline(
            scheduler=flux_scheduler(guidance_embeds),
            vae=_flux_vae(),
            text_encoder=CLIPTextModel(clip_text_config(tokenizer, _WIDTH, "quick_gelu")),
            tokenizer=tokenizer,
            text_encoder_2=t5_encoder(tokenizer_2),
            tokenizer_2=tokenizer_2,
            transformer=_flux_transformer(guidance_embeds),
            image_encoder=None,
            feature_extractor=None,
        )


def make_tiny_flux(path: str | Path, seed: int = 0, overwrite: bool = False, guidance_embeds: bool = True) -> Path:
    """Build a tiny FLUX pipeline (see :func:`build_tiny_flux_pipeline`) and save it as a diffusers folder at
    ``path``, with the same marker file and replacement rules as :func:`~krona_cli.pipeline.tiny.make_tiny`.

    Returns:
        ``path`` as an absolute :class:`~pathlib.Path`.

    Raises:
        KronaError: ``path`` holds something that may not be replaced.
    """
    from .tiny import make_tiny

    return make_tiny(path, "flux" if guidance_embeds else "flux-schnell", seed, overwrite)
