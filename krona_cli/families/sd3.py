"""Stable Diffusion 3 and 3.5 (Medium, Large): an MM-DiT over the 16-channel VAE's latents (it patchifies them
itself), reading CLIP ViT-L and OpenCLIP bigG (their penultimate states and projected pooled vectors) and T5-XXL.

Training computes what diffusers' DreamBooth SD3 script computes by default (flow_match.py for the objective): noise
levels drawn by the logit-normal density from the scheduler's statically shifted table (shift 3), the transformer
given the scheduler's own timestep σ·1000, its output preconditioned to the x0 it implies (−σ·v̂ + x_σ) and compared
with the latents. Prompts: both CLIPs' penultimate states side by side, zero-padded to T5's width, then T5's states
after them on the token axis (77 T5 tokens, the script's `--max_sequence_length` and ComfyUI's); pooled, both CLIPs'
projections side by side (StableDiffusion3Pipeline.encode_prompt)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..errors import KronaError
from ..kron.targets import TARGET_PRESETS
from .base import Component, ConfigGet, Family, SamplerDefaults, SingleFile, UiNames
from .prompts import Conditioning, tokenize

# T5 tokens per prompt: the DreamBooth SD3 script's default (and what ComfyUI pads T5 to for SD3); T5's context at most.
SEQUENCE_LENGTH = 77
MAX_SEQUENCE_LENGTH = 512
CLIP_TOKENS = 77  # the CLIPs' context, which their states fill (prompts.tokenize pads to it)

# --targets presets over the transformer's module names: `attn` is every attention projection of the joint blocks
# (image q/k/v/out, text add_q/k/v and to_add_out, and SD3.5 Medium's second image attention `attn2`), as diffusers'
# script adapts them; `attn-ff` adds the image and text feed-forward layers.
_ATTN = r"\.attn2?\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$"
_FF = r"\.(ff|ff_context)\.net\.(0\.proj|2)$"
PRESETS = {"attn": _ATTN, "attn-ff": f"(?:{_ATTN})|(?:{_FF})", "text": TARGET_PRESETS["text"]}


@dataclass(frozen=True)
class SD3Family(Family):
    max_sequence_length: int | None = None  # --max-sequence-length; None: SEQUENCE_LENGTH
    weighting: str = "logit_normal"  # --weighting-scheme; diffusers' SD3 script's default

    def configured(self, guidance=None, max_sequence_length=None, weighting_scheme=None) -> SD3Family:
        """The family with a run's --max-sequence-length and --weighting-scheme; --guidance is refused (SD3 has no
        guidance input: it samples with classifier-free guidance)."""
        if guidance is not None:
            raise KronaError("--guidance is the distilled guidance input of FLUX.1 [dev]; SD3 has none, leave it out")
        if max_sequence_length is not None and max_sequence_length > MAX_SEQUENCE_LENGTH:
            raise KronaError(f"--max-sequence-length is at most {MAX_SEQUENCE_LENGTH} (T5's context)")
        given = {"max_sequence_length": max_sequence_length, "weighting": weighting_scheme}
        return dataclasses.replace(self, **{k: v for k, v in given.items() if v is not None})

    def sequence_length_in_words(self) -> str:
        return str(SEQUENCE_LENGTH)

    def sequence_length(self) -> int:
        return self.max_sequence_length or SEQUENCE_LENGTH

    def matches_denoiser(self, get: ConfigGet) -> bool:
        """SD3Transformer2DModel: a caption projection and a learned position embedding table."""
        return get("caption_projection_dim") is not None and get("pos_embed_max_size") is not None

    def encode_prompts(self, tokenizers: list, text_models: list, prompts: list[str]) -> Conditioning:
        """As StableDiffusion3Pipeline.encode_prompt computes them: the CLIPs' penultimate states side by side,
        zero-padded to T5's width, then T5's last states; the CLIPs' projected pooled outputs side by side. Without T5
        (--drop-t5) the CLIPs' states alone: `denoise` completes them, where the transformer's text width is known."""
        import torch
        import torch.nn.functional as F

        states, pooled = [], []
        for tokenizer, encoder in zip(tokenizers[:2], text_models[:2]):
            device = next(encoder.parameters()).device
            out = encoder(tokenize(tokenizer, prompts).to(device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled.append(out[0])
        clip, pooled = torch.cat(states, dim=-1), torch.cat(pooled, dim=-1)
        if len(text_models) < 3:
            return Conditioning(clip, pooled)
        t5 = text_models[2]
        device = next(t5.parameters()).device
        t5_states = t5(tokenize(tokenizers[2], prompts, self.sequence_length()).to(device))[0]
        clip = F.pad(clip, (0, t5_states.shape[-1] - clip.shape[-1]))
        return Conditioning(torch.cat([clip, t5_states.to(clip.device)], dim=-2), pooled)

    def _with_t5_zeros(self, embeds, width: int):
        """The CLIPs' states alone (a run without T5: their 77 tokens, where T5's follow them otherwise) as the pipeline
        completes them: zero-padded to the transformer's text width `width`, then T5's tokens as zeros."""
        import torch
        import torch.nn.functional as F

        if embeds.shape[-2] > CLIP_TOKENS:
            return embeds
        zeros = embeds.new_zeros(embeds.shape[0], self.sequence_length(), width)
        return torch.cat([F.pad(embeds, (0, width - embeds.shape[-1])), zeros], dim=-2)

    def unused_denoiser_layers(self, linears: Iterable[str]) -> tuple[str, ...]:
        """The text queries of a block without a text output (`to_add_out`): the last block, `context_pre_only`,
        drops the text stream after its attention."""
        names = set(linears)
        return tuple(
            n
            for n in sorted(names)
            if n.endswith(".attn.add_q_proj") and n[: -len("add_q_proj")] + "to_add_out" not in names
        )

    def denoise(self, model, noisy, timesteps, cond: Conditioning, geometry, dtype):
        """The transformer on the latents as they are (it patchifies them), at the scheduler's timesteps."""
        width = getattr(model, "module", model).config.joint_attention_dim  # DDP wraps the transformer in processes
        return model(
            hidden_states=noisy.to(dtype),
            encoder_hidden_states=self._with_t5_zeros(cond.embeds, width).to(dtype),
            pooled_projections=cond.pooled.to(dtype),
            timestep=timesteps,
            return_dict=False,
        )[0]

    def call_kwargs(self, pipe) -> dict:
        """The pipeline pads T5 to 256 tokens unless told: the length training used."""
        return {"max_sequence_length": self.sequence_length()}

    def size_multiple(self, pipe) -> int:
        """The VAE's scale factor times the transformer's patch size (16 for SD3)."""
        return int(pipe.vae_scale_factor) * int(pipe.transformer.config.patch_size)

    def objective(self, scheduler_config: Mapping):
        from .flow_match import FlowMatch

        return FlowMatch.from_scheduler_config(scheduler_config, self.weighting, time_divisor=1, precondition=True)


SD3 = SD3Family(
    name="sd3",
    title="SD3",
    pipeline_class="StableDiffusion3Pipeline",
    components=(
        Component("transformer", "denoiser", "sd35_medium_transformer.json"),
        Component("text_encoder", "text", "sd3_clip_l_text.json", "tokenizer", kohya_prefix="lora_te1_"),
        Component("text_encoder_2", "text", "clip_vit_bigg_text.json", "tokenizer_2", kohya_prefix="lora_te2_"),
        Component("text_encoder_3", "text", "t5_xxl_text.json", "tokenizer_3", trainable=False, optional=True),
    ),
    context_width=None,
    default_resolution=512,  # diffusers' DreamBooth SD3 script's default --resolution
    layer_list=True,
    target_presets=PRESETS,
    schedulers={"euler": "FlowMatchEulerDiscreteScheduler"},  # the pipeline's own, shift 3
    ui=UiNames(
        modelspec_id="stable-diffusion-3.5-medium",
        modelspec_variants=(("large", "stable-diffusion-3.5-large"),),
        resolution=1024,
        base_model_version="sd3",
        reads_versions=("sd3",),
    ),
    # Stability's MMDiT alone, the file ComfyUI loads as a diffusion model beside its text encoders and VAE
    single_file=SingleFile(
        "the SD3 transformer alone, in Stability's MMDiT layout",
        denoiser_only=True,
        layout="sd3",
        denoiser_marks=("joint_blocks.0.x_block.attn.qkv.weight",),
    ),
    file_naming="diffusers_names",
    samplers={"": SamplerDefaults(steps=28, guidance=7.0, preview_steps=20)},  # the pipeline's (20 in grids)
    tiny=("sd3",),
)
