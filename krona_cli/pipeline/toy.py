"""Toy pipelines: small SDXL-, SD1.5- and FLUX.1-shaped diffusers pipelines *pretrained* on the toy world
(world/scenes.py).

They are made of the real models' classes (``StableDiffusionXLPipeline`` with two CLIP text encoders and
"text_time" micro-conditioning; ``StableDiffusionPipeline``; ``FluxPipeline`` with double- and single-stream blocks,
a guidance embedding, a CLIP and a T5 encoder), so every krona command works on them unchanged, and
they draw what they are asked for: a red ring on a blue background. The architectures are defined here; the weights
(fp16, a few MB) are trained from scratch by ``scripts/pretrain_toy.py`` and shipped in ``krona_cli/weights/``, so
:func:`make_toy` takes seconds and needs no download.

Sizes: 64x64 images through a VAE with a 4x downscale (16x16x4 latents); UNets (32, 64, 64) wide with
cross-attention at two levels; text encoders 64 wide (3 layers for SDXL, whose UNet reads the penultimate layer;
2 for SD 1.5); a tokenizer whose corpus includes every word of the world. The toy FLUX: the same VAE (its 16x16x4
latents packed 2x2 into 64 tokens of 16), a FLUX transformer (docs/toy.md has its sizes), a CLIP (pooled) and a T5
encoder 64 wide, 32 T5 tokens per prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from krona_cli.errors import KronaError
from krona_cli.pipeline.tiny import build_tokenizer, clip_text_config, save_marked_pipeline
from krona_cli.pipeline.tiny_flux import build_t5_tokenizer, flux_scheduler, t5_encoder
from krona_cli.world.scenes import COLOURS, SHAPES

ARCHS = ("sdxl", "sd15", "flux")
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
MARKER = "krona-toy.json"  # in every folder make_toy writes: what --overwrite may replace
TEXT_WIDTH = 64
TIME_EMBED_DIM = 8
T5_LENGTH = 32  # T5 tokens per prompt of the toy FLUX (the world's longest caption with "sks" is 15)
WORLD_WORDS = " ".join([*COLOURS, *SHAPES, "background", "front"])


def weights_file(arch: str) -> Path:
    return WEIGHTS_DIR / f"toy-{arch}.safetensors"


def read_weights(path: Path) -> tuple[dict, dict]:
    """(tensors in fp32, the settings they were pretrained with) of a file scripts/pretrain_toy.py wrote: a shipped
    pipeline's weights or the VAE stage's."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return {key: f.get_tensor(key).float() for key in f.keys()}, json.loads(f.metadata()["krona_toy"])


def toy_tokenizer() -> CLIPTokenizer:
    """The tiny tokenizer's corpus plus every word of the toy world (each one token)."""
    return build_tokenizer(WORLD_WORDS)


def toy_vae(scaling_factor: float = 1.0, **flux: float) -> AutoencoderKL:
    """Three resolution levels: 64x64 pictures to 16x16x4 latents (FLUX's pipeline also reads a ``shift_factor``)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
        **flux,
    )


_UNET_COMMON = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    attention_head_dim=(2, 4, 4),  # heads per block (diffusers' legacy name): 16 channels each
    norm_num_groups=16,
)


def toy_unet(arch: str) -> UNet2DConditionModel:
    if arch == "sdxl":  # attention at the two lower levels, linear projections, "text_time" conditioning
        return UNet2DConditionModel(
            **_UNET_COMMON,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            use_linear_projection=True,
            cross_attention_dim=2 * TEXT_WIDTH,
            addition_embed_type="text_time",
            addition_time_embed_dim=TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TEXT_WIDTH,
        )
    return UNet2DConditionModel(  # SD 1.5: attention at the two higher levels, conv projections
        **_UNET_COMMON,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
    )


def toy_flux_transformer() -> FluxTransformer2DModel:
    """FLUX.1's MM-DiT at toy size: 2 double-stream and 4 single-stream blocks, 2 heads of 32 (rotary axes 8 + 12 +
    12), over the 2x2-packed toy latents (16 inputs), reading the 64-wide T5 and CLIP, with [dev]'s guidance input."""
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=TEXT_WIDTH,
        pooled_projection_dim=TEXT_WIDTH,
        guidance_embeds=True,
        axes_dims_rope=(8, 12, 12),
    )


def toy_scheduler() -> EulerDiscreteScheduler:
    """Euler, as SD 1.5 and SDXL ship with, on DDPM's linear noise schedule (1e-4 to 0.02), v-prediction, trailing
    timesteps.

    Not SD's "scaled_linear" schedule: at 16x16 latents it leaves so much of a picture at its last step (signal 0.07
    against noise whose mean over 256 pixels varies by 0.06) that a model learns to read the background's colour
    from the noise instead of the prompt. DDPM's leaves 0.006, and trailing timesteps start sampling there; so close
    to pure noise an epsilon model's picture is its noise estimate's error times 157, so the model predicts the
    velocity (as SD 2 does), which there is the picture itself.
    """
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        steps_offset=1,  # unused with trailing timesteps; what diffusers' SD pipeline asks of every scheduler
    )


def _toy_sdxl(scaling: float) -> StableDiffusionXLPipeline:
    tokenizer = toy_tokenizer()
    return StableDiffusionXLPipeline(
        vae=toy_vae(scaling),
        unet=toy_unet("sdxl"),
        text_encoder=CLIPTextModel(clip_text_config(tokenizer, TEXT_WIDTH, "quick_gelu", layers=3)),
        text_encoder_2=CLIPTextModelWithProjection(clip_text_config(tokenizer, TEXT_WIDTH, "gelu", layers=3)),
        tokenizer=tokenizer,
        tokenizer_2=toy_tokenizer(),
        scheduler=toy_scheduler(),
        add_watermarker=False,
    )


def _toy_sd15(scaling: float) -> StableDiffusionPipeline:
    tokenizer = toy_tokenizer()
    return StableDiffusionPipeline(
        vae=toy_vae(scaling),
        unet=toy_unet("sd15"),
        text_encoder=CLIPTextModel(clip_text_config(tokenizer, TEXT_WIDTH, "quick_gelu")),
        tokenizer=tokenizer,
        scheduler=toy_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def _toy_flux(scaling: float) -> FluxPipeline:
    """The shared VAE (no shift: its latents are scaled to unit variance), a CLIP read for its pooled output and a
    T5 encoder with its own tokenizer, 32 tokens per prompt."""
    tokenizer, tokenizer_2 = toy_tokenizer(), build_t5_tokenizer(WORLD_WORDS, max_length=T5_LENGTH)
    transformer = toy_flux_transformer()  # first: the order of the random inits the shipped weights started from
    return FluxPipeline(
        transformer=transformer,
        vae=toy_vae(scaling, shift_factor=0.0),
        text_encoder=CLIPTextModel(clip_text_config(tokenizer, TEXT_WIDTH, "quick_gelu")),
        text_encoder_2=t5_encoder(tokenizer_2, TEXT_WIDTH),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=flux_scheduler(),  # [dev]'s: shifted by the token count (64 tokens: shift 1.6)
        image_encoder=None,
        feature_extractor=None,
    )


_BUILDERS = {"sdxl": _toy_sdxl, "sd15": _toy_sd15, "flux": _toy_flux}


def build_toy_pipeline(
    arch: str, weights: bool = True
) -> StableDiffusionXLPipeline | StableDiffusionPipeline | FluxPipeline:
    """The toy pipeline of ``arch`` in memory, in fp32: with the shipped pretrained weights, or freshly initialised
    (``weights=False``, for pretraining).

    Raises:
        KronaError: ``arch`` is unknown, or its weights file is missing.
    """
    if arch not in ARCHS:
        raise KronaError(f"Unknown toy architecture {arch!r}: expected one of {', '.join(repr(a) for a in ARCHS)}.")
    state, scaling = {}, 1.0
    if weights:
        path = weights_file(arch)
        if not path.is_file():
            raise KronaError(
                f"The toy {arch} weights are missing ({path}): re-install krona, or run scripts/pretrain_toy.py."
            )
        state, settings = read_weights(path)
        scaling = float(settings["scaling_factor"])
    pipe = _BUILDERS[arch](scaling)
    for name, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        if state:
            own = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")}
            missing, unexpected = module.load_state_dict(own, strict=False)
            if missing or unexpected:
                raise KronaError(f"The toy {arch} weights do not fit its {name}: re-install krona.")
        module.eval()
    return pipe


def make_toy(path: str | Path, arch: str = "sdxl", overwrite: bool = False) -> Path:
    """Save the pretrained toy pipeline of ``arch`` as a diffusers folder at ``path`` (written atomically; like
    make_tiny, only an empty folder or a toy pipeline this function wrote, with ``overwrite``, is replaced).

    Returns:
        ``path`` as an absolute :class:`~pathlib.Path`.
    """
    return save_marked_pipeline(path, MARKER, {"arch": arch}, overwrite, lambda: build_toy_pipeline(arch))
