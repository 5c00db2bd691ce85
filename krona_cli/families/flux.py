"""FLUX.1 ([dev], [schnell] and fine-tunes of the same architecture): a rectified-flow transformer over 2x2-packed
latents of a 16-channel VAE, read through CLIP ViT-L (its pooled vector) and T5-XXL (its per-token states).

Training computes what diffusers' DreamBooth FLUX script computes (flow_match.py for the objective): the transformer
gets the packed noisy latents, their image position ids, zero text ids, the timestep σ (its scheduler's timestep / 1000)
and, on guidance-distilled models ([dev]), the guidance embedding (`--guidance`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import KronaError
from ..kron.targets import TARGET_PRESETS
from .base import Component, ConfigGet, Family, SamplerDefaults, SingleFile, UiNames
from .prompts import Conditioning, tokenize

# The guidance value [dev] is trained with by default: diffusers' DreamBooth FLUX scripts' default `--guidance_scale`
# (3.5, also FluxPipeline's sampling default). [schnell] has no guidance embedding and ignores it.
TRAIN_GUIDANCE = 3.5
# T5 tokens per prompt at most: FluxPipeline refuses more. By default a model's T5 tokenizer's length (FLUX.1's: 512,
# FluxPipeline's and the DreamBooth script's default for [dev]; the toy FLUX's: 32)
MAX_SEQUENCE_LENGTH = 512

# --targets presets over the transformer's module names: `attn` is every attention projection (double blocks: image
# and text q/k/v and outputs; single blocks: q/k/v, whose output is part of proj_out), `attn-ff` adds the feed-forward
# layers (double blocks' ff and ff_context, single blocks' proj_mlp and proj_out).
_ATTN = r"\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$"
_FF = r"\.(ff|ff_context)\.net\.(0\.proj|2)$|^single_transformer_blocks\.\d+\.(proj_mlp|proj_out)$"
PRESETS = {"attn": _ATTN, "attn-ff": f"(?:{_ATTN})|(?:{_FF})", "text": TARGET_PRESETS["text"]}


@dataclass(frozen=True)
class FluxFamily(Family):
    guidance: float = TRAIN_GUIDANCE  # --guidance
    max_sequence_length: int | None = None  # --max-sequence-length; None: the T5 tokenizer's length
    weighting: str = "none"  # --weighting-scheme

    def configured(self, guidance=None, max_sequence_length=None, weighting_scheme=None) -> FluxFamily:
        """The family with a run's --guidance, --max-sequence-length and --weighting-scheme (None: the default)."""
        if max_sequence_length is not None and max_sequence_length > MAX_SEQUENCE_LENGTH:
            raise KronaError(f"--max-sequence-length is at most {MAX_SEQUENCE_LENGTH} (FLUX.1's T5 context)")
        given = {"guidance": guidance, "max_sequence_length": max_sequence_length, "weighting": weighting_scheme}
        return dataclasses.replace(self, **{k: v for k, v in given.items() if v is not None})

    def sequence_length_in_words(self) -> str:
        return f"the T5 tokenizer's length ({MAX_SEQUENCE_LENGTH})"

    def sequence_length(self, t5_tokenizer) -> int:
        """T5 tokens per prompt: --max-sequence-length, else the tokenizer's own length (at most 512)."""
        return self.max_sequence_length or min(MAX_SEQUENCE_LENGTH, int(t5_tokenizer.model_max_length))

    def matches_denoiser(self, get: ConfigGet) -> bool:
        """FluxTransformer2DModel: double and single blocks, and a pooled text projection (which other double- and
        single-block transformers lack)."""
        return get("num_single_layers") is not None and get("pooled_projection_dim") is not None

    def encode_prompts(self, tokenizers: list, text_models: list, prompts: list[str]) -> Conditioning:
        """T5's last hidden states (the tokens the transformer attends to, `max_sequence_length` of them) and CLIP's
        pooled output, as FluxPipeline.encode_prompt computes them."""
        clip, t5 = text_models
        device = next(clip.parameters()).device
        pooled = clip(tokenize(tokenizers[0], prompts).to(device), output_hidden_states=False).pooler_output
        device = next(t5.parameters()).device
        ids = tokenize(tokenizers[1], prompts, self.sequence_length(tokenizers[1])).to(device)
        embeds = t5(ids, output_hidden_states=False)[0]
        return Conditioning(embeds, pooled)

    def denoise(self, model, noisy, timesteps, cond: Conditioning, geometry, dtype, guidance=None):
        """The transformer on the packed latents; the prediction unpacked to the latents' layout. `guidance`: each
        sample's float32 guidance input (None: --guidance for all; scripts/pretrain_toy.py distils it per sample);
        models without a guidance embedding ([schnell]) get none."""
        import torch

        from .flow_match import image_ids, pack_latents, unpack_latents

        batch, _, height, width = noisy.shape
        device = noisy.device
        if not getattr(model, "module", model).config.guidance_embeds:  # DDP wraps the transformer in processes
            guidance = None
        elif guidance is None:
            guidance = torch.full((batch,), self.guidance, device=device, dtype=torch.float32)
        prediction = model(
            hidden_states=pack_latents(noisy.to(dtype)),
            timestep=timesteps,
            guidance=guidance,
            pooled_projections=cond.pooled.to(dtype),
            encoder_hidden_states=cond.embeds.to(dtype),
            txt_ids=torch.zeros(cond.embeds.shape[1], 3, device=device, dtype=dtype),
            img_ids=image_ids(height, width).to(device, dtype),
            return_dict=False,
        )[0]
        return unpack_latents(prediction, height, width)

    def sampler_variant(self, pipe) -> str:
        """[dev] (guidance-distilled) or [schnell] (timestep-distilled, no guidance embedding)."""
        return "[dev]" if pipe.transformer.config.guidance_embeds else "[schnell]"

    def native_size(self, pipe) -> int:
        """The VAE's sample size (FLUX.1's: 1024, FluxPipeline's default side; the toy FLUX's: 64)."""
        return int(pipe.vae.config.sample_size)

    def call_kwargs(self, pipe) -> dict:
        """FluxPipeline pads prompts to 512 T5 tokens unless told: the model's own length, as training uses."""
        return {"max_sequence_length": self.sequence_length(pipe.tokenizer_2)}

    def size_multiple(self, pipe) -> int:
        """The VAE's scale factor times 2: latents are packed in 2x2 patches."""
        return 2 * int(pipe.vae_scale_factor)

    def objective(self, scheduler_config: Mapping):
        from .flow_match import FlowMatch

        return FlowMatch.from_scheduler_config(scheduler_config, weighting=self.weighting)


FLUX = FluxFamily(
    name="flux",
    title="FLUX.1",
    pipeline_class="FluxPipeline",
    components=(
        Component("transformer", "denoiser", "flux_dev_transformer.json"),
        Component("text_encoder", "text", "clip_vit_l_text.json", "tokenizer"),
        Component("text_encoder_2", "text", "t5_xxl_text.json", "tokenizer_2", trainable=False),
    ),
    context_width=None,
    default_resolution=512,  # diffusers' DreamBooth FLUX scripts' default --resolution
    layer_list=True,
    target_presets=PRESETS,
    schedulers={"euler": "FlowMatchEulerDiscreteScheduler"},  # FluxPipeline's own, with its resolution shift
    # modelspec says [schnell] where the base model's name does (kohya's sd-scripts' rule too)
    ui=UiNames(
        modelspec_id="flux-1-dev",
        modelspec_variants=(("schnell", "flux-1-schnell"),),
        resolution=1024,
        base_model_version="flux1",
        reads_versions=("flux",),
    ),
    # the file BFL release, and ComfyUI and Forge load as a diffusion model beside their text encoders and VAE
    single_file=SingleFile("the FLUX.1 transformer alone, in Black Forest Labs' layout", denoiser_only=True),
    file_naming="flux_names",
    samplers={  # [dev]: FluxPipeline's (20 in training's grids); [schnell]: its model card's
        "[dev]": SamplerDefaults(steps=28, guidance=3.5, preview_steps=20),
        "[schnell]": SamplerDefaults(steps=4, guidance=0.0, preview_steps=4),
    },
    tiny=("flux", "flux-schnell"),
)
