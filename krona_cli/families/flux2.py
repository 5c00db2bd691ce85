"""FLUX.2 [klein] (4B and 9B, their step-distilled releases and undistilled bases): a rectified-flow transformer with
double- and single-stream blocks over the 32-channel VAE's latents, patchified 2x2 into 128 channels and normalised
by the VAE's batch-norm statistics, reading three hidden layers of a Qwen3 model (no pooled vector, no guidance input).

Training computes what diffusers' DreamBooth FLUX.2 [klein] script computes (flow_match.py for the objective): noise
levels from the scheduler's unshifted table (its sampler shifts by an empirical fit of the step count, which training
has no counterpart of), the transformer given the packed tokens, 4-axis position ids and σ, the target ε − x0. The
batch-norm normalisation is one affine map per channel and position parity, so krona applies it to the unpatchified
latents and patchifies inside the denoiser call: the same numbers, in a permuted order."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..kron.targets import TARGET_PRESETS
from .base import Component, ConfigGet, SamplerDefaults, SingleFile, UiNames, WeightedFamily
from .prompts import Conditioning

SEQUENCE_LENGTH = 512  # Flux2KleinPipeline's max_sequence_length
TEXT_LAYERS = (9, 18, 27)  # the Qwen3 hidden states the transformer reads, side by side (the pipeline's default)

# --targets presets: `attn` is the double blocks' attention projections and the single blocks' fused q/k/v+MLP input
# and attention+MLP output (attention and MLP share those weights: diffusers' script adapts them); `attn-ff` adds the
# double blocks' feed-forward layers.
_ATTN = r"\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$"
_SINGLE = r"^single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)$"
_FF = r"\.(ff|ff_context)\.(linear_in|linear_out)$"
PRESETS = {
    "attn": f"(?:{_ATTN})|(?:{_SINGLE})",
    "attn-ff": f"(?:{_ATTN})|(?:{_SINGLE})|(?:{_FF})",
    "text": TARGET_PRESETS["text"],
}


@dataclass(frozen=True)
class Flux2Family(WeightedFamily):
    """--weighting-scheme 'none' by default, as diffusers' script; --guidance and --max-sequence-length refused."""

    def matches_denoiser(self, get: ConfigGet) -> bool:
        """Flux2Transformer2DModel without a guidance input ([klein]; FLUX.2 [dev] has one)."""
        return get("timestep_guidance_channels") is not None and get("guidance_embeds") is False

    def encode_prompts(self, tokenizers: list, text_models: list, prompts: list[str]) -> Conditioning:
        """As Flux2KleinPipeline: each prompt in the chat template (thinking off), 512 tokens, Qwen3's hidden states
        of TEXT_LAYERS side by side for each token."""
        import torch

        tokenizer, encoder = tokenizers[0], text_models[0]
        chat = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=False
            )
            for p in prompts
        ]
        device = next(encoder.parameters()).device
        tokens = tokenizer(chat, padding="max_length", max_length=SEQUENCE_LENGTH, truncation=True, return_tensors="pt")
        out = encoder(
            input_ids=tokens.input_ids.to(device),
            attention_mask=tokens.attention_mask.to(device),
            output_hidden_states=True,
            use_cache=False,
        )
        states = torch.stack([out.hidden_states[k] for k in TEXT_LAYERS], dim=2)  # (N, tokens, layers, width)
        return Conditioning(states.reshape(*states.shape[:2], -1))

    def normalise_latents(self, vae, z):
        """The VAE's batch-norm normalisation of the 2x2-patchified latents, applied in place of each patch's values:
        channel c's value at row parity a and column parity b is normalised by statistic 4c + 2a + b."""
        import torch

        c = z.shape[1]
        mean = vae.bn.running_mean.to(z).view(1, c, 1, 2, 1, 2)
        std = torch.sqrt(vae.bn.running_var.to(z) + vae.config.batch_norm_eps).view(1, c, 1, 2, 1, 2)
        b, _, h, w = z.shape
        patches = z.reshape(b, c, h // 2, 2, w // 2, 2)
        return ((patches - mean) / std).reshape(b, c, h, w)

    def denoise(self, model, noisy, timesteps, cond: Conditioning, geometry, dtype):
        """The transformer on the patchified latents as tokens, with FLUX.2's (t, row, column, layer) ids; its
        prediction back in the latents' layout."""
        import torch

        b, c, h, w = noisy.shape
        patches = noisy.to(dtype).reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        tokens = patches.reshape(b, c * 4, (h // 2) * (w // 2)).permute(0, 2, 1)
        zero = torch.zeros(1, dtype=torch.long)
        rows, cols = torch.arange(h // 2), torch.arange(w // 2)
        img_ids = torch.cartesian_prod(zero, rows, cols, zero).to(noisy.device)
        txt_ids = torch.cartesian_prod(zero, zero, zero, torch.arange(cond.embeds.shape[1])).to(noisy.device)
        prediction = model(
            hidden_states=tokens,
            encoder_hidden_states=cond.embeds.to(dtype),
            timestep=timesteps,
            img_ids=img_ids,
            txt_ids=txt_ids,
            return_dict=False,
        )[0]
        prediction = prediction.permute(0, 2, 1).reshape(b, c, 2, 2, h // 2, w // 2).permute(0, 1, 4, 2, 5, 3)
        return prediction.reshape(b, c, h, w)

    def sampler_variant(self, pipe) -> str:
        """The step-distilled releases (`is_distilled`) or the undistilled bases."""
        return "distilled" if getattr(pipe.config, "is_distilled", False) else "base"

    def native_size(self, pipe) -> int:
        """The VAE's sample size (1024 for the real model)."""
        return int(pipe.vae.config.sample_size)

    def size_multiple(self, pipe) -> int:
        """The VAE's scale factor times 2: latents are patchified 2x2."""
        return 2 * int(pipe.vae_scale_factor)

    def objective(self, scheduler_config: Mapping):
        from .flow_match import FlowMatch

        return FlowMatch.from_scheduler_config(scheduler_config, self.weighting, shift_by_resolution=False)


FLUX2 = Flux2Family(
    name="flux2",
    title="FLUX.2 [klein]",
    pipeline_class="Flux2KleinPipeline",
    components=(
        Component("transformer", "denoiser", "flux2_klein_4b_transformer.json"),
        Component("text_encoder", "text", "qwen3_4b_causal_text.json", "tokenizer", trainable=False),
    ),
    context_width=None,
    default_resolution=1024,  # diffusers' DreamBooth FLUX.2 [klein] README's --resolution
    layer_list=True,
    target_presets=PRESETS,
    schedulers={"euler": "FlowMatchEulerDiscreteScheduler"},  # the pipeline's own
    ui=UiNames(modelspec_id="flux-2-klein", resolution=1024, base_model_version="flux2", reads_versions=("flux2",)),
    # the transformer alone in BFL's FLUX.2 names, the file ComfyUI loads as a diffusion model
    single_file=SingleFile(
        "the FLUX.2 transformer alone, in Black Forest Labs' layout",
        denoiser_only=True,
        layout="flux2",
        denoiser_marks=("double_stream_modulation_img.lin.weight",),
    ),
    file_naming="diffusers_names",
    samplers={  # the bases: Flux2KleinPipeline's (20 in training's grids); distilled: 4 steps, guidance unused
        "base": SamplerDefaults(steps=50, guidance=4.0, preview_steps=20),
        "distilled": SamplerDefaults(steps=4, guidance=1.0, preview_steps=4),
    },
    tiny=("flux2",),
)
