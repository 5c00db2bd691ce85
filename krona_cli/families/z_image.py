"""Z-Image (Tongyi-MAI/Z-Image): a single-stream DiT (a text refiner, an image refiner and the joint layers) over the
16-channel FLUX VAE's latents, which it patchifies itself, reading Qwen3's second-to-last hidden states of the prompt's
real tokens only (no pooled vector, no padding given to the model).

Training computes what diffusers' DreamBooth Z-Image script computes (flow_match.py for the objective): noise levels
from the scheduler's statically shifted table (shift 6), the transformer given 1 − σ (it multiplies by 1000) and a
list of per-sample latents (C, 1, H, W), its output negated to the velocity ε − x0. Prompts through the tokenizer's
chat template (thinking enabled, as ZImagePipeline has it), 512 tokens with their attention mask."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..kron.targets import TARGET_PRESETS
from .base import Component, ConfigGet, SamplerDefaults, SingleFile, UiNames, WeightedFamily
from .prompts import Conditioning

SEQUENCE_LENGTH = 512  # ZImagePipeline's and the script's max_sequence_length

# --targets presets: `attn` is every attention projection of the joint layers and both refiners (diffusers' script's
# to_q, to_k, to_v, to_out.0); `attn-ff` adds their SwiGLU feed-forward layers.
_ATTN = r"\.attention\.(to_q|to_k|to_v|to_out\.0)$"
_FF = r"\.feed_forward\.(w1|w2|w3)$"
PRESETS = {"attn": _ATTN, "attn-ff": f"(?:{_ATTN})|(?:{_FF})", "text": TARGET_PRESETS["text"]}


@dataclass(frozen=True)
class ZImageFamily(WeightedFamily):
    """--weighting-scheme 'none' by default, as diffusers' script; --guidance and --max-sequence-length refused."""

    def matches_denoiser(self, get: ConfigGet) -> bool:
        """ZImageTransformer2DModel: a caption embedder of `cap_feat_dim` and refiner layers."""
        return get("cap_feat_dim") is not None and get("n_refiner_layers") is not None

    def encode_prompts(self, tokenizers: list, text_models: list, prompts: list[str]) -> Conditioning:
        """As ZImagePipeline._encode_prompt: each prompt in the chat template, 512 tokens, Qwen3's second-to-last
        hidden states, with the mask of the real tokens (the transformer reads those alone)."""
        tokenizer, encoder = tokenizers[0], text_models[0]
        chat = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=True
            )
            for p in prompts
        ]
        device = next(encoder.parameters()).device
        tokens = tokenizer(chat, padding="max_length", max_length=SEQUENCE_LENGTH, truncation=True, return_tensors="pt")
        mask = tokens.attention_mask.to(device).bool()
        states = encoder(input_ids=tokens.input_ids.to(device), attention_mask=mask, output_hidden_states=True)
        return Conditioning(states.hidden_states[-2], None, mask)

    def denoise(self, model, noisy, timesteps, cond: Conditioning, geometry, dtype):
        """The transformer on a list of (C, 1, H, W) latents at 1 − σ (from the scheduler's timesteps σ·1000) with
        each prompt's real tokens; its output negated (it predicts x0 − ε)."""
        import torch

        latents = list(noisy.to(dtype).unsqueeze(2).unbind(0))
        text = [embeds[mask].to(dtype) for embeds, mask in zip(cond.embeds, cond.mask)]
        out = model(latents, (1000 - timesteps) / 1000, text, return_dict=False)[0]  # 1 − σ, as the script has it
        return -torch.stack(out).squeeze(2)

    def native_size(self, pipe) -> int:
        """The VAE's sample size (1024 for the real model; the transformer has none)."""
        return int(pipe.vae.config.sample_size)

    def size_multiple(self, pipe) -> int:
        """The VAE's scale factor times the transformer's patch size (16)."""
        return int(pipe.vae_scale_factor) * int(pipe.transformer.config.all_patch_size[0])

    def objective(self, scheduler_config: Mapping):
        from .flow_match import FlowMatch

        return FlowMatch.from_scheduler_config(scheduler_config, self.weighting, time_divisor=1)


Z_IMAGE = ZImageFamily(
    name="z-image",
    title="Z-Image",
    pipeline_class="ZImagePipeline",
    components=(
        Component("transformer", "denoiser", "z_image_transformer.json"),
        Component("text_encoder", "text", "qwen3_4b_text.json", "tokenizer", trainable=False),
    ),
    context_width=None,
    default_resolution=1024,  # diffusers' DreamBooth Z-Image README's --resolution
    layer_list=True,
    target_presets=PRESETS,
    schedulers={"euler": "FlowMatchEulerDiscreteScheduler"},  # the pipeline's own, shift 6
    ui=UiNames(modelspec_id="z-image", resolution=1024, base_model_version="z_image", reads_versions=("z_image",)),
    # the transformer alone in its original names, the file ComfyUI loads as a diffusion model
    single_file=SingleFile(
        "the Z-Image transformer alone, in its original layout",
        denoiser_only=True,
        layout="z_image",
        denoiser_marks=("cap_embedder.1.weight",),
    ),
    file_naming="diffusers_names",
    samplers={"": SamplerDefaults(steps=50, guidance=5.0, preview_steps=20)},  # the pipeline's (20 in grids)
    tiny=("z-image",),
)
