"""Qwen-Image (Qwen/Qwen-Image): a double-stream MM-DiT over the 2x2-packed latents of a 16-channel Wan-style VAE
that takes frames (one here) and normalises by per-channel means and deviations, reading the last hidden states of
Qwen2.5-VL on a fixed system template whose first 34 tokens are dropped, with a mask of the real tokens.

Training computes what diffusers' DreamBooth Qwen-Image script computes (flow_match.py for the objective): noise
levels from the scheduler's table (shifted by the image size as its sampler does, as for FLUX.1), σ as the timestep,
target ε − x0, the text padded to the batch's longest prompt with its mask (none when every token is real).
Sampling guides with the pipeline's true classifier-free guidance (`true_cfg_scale`) against a blank negative
prompt unless one is given."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..kron.targets import TARGET_PRESETS
from .base import Component, ConfigGet, SamplerDefaults, SingleFile, UiNames, WeightedFamily
from .prompts import Conditioning

TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
DROP = 34  # the template's system tokens (QwenImagePipeline.prompt_template_encode_start_idx)
SEQUENCE_LENGTH = 512  # text tokens kept per prompt: the script's and the pipeline's max_sequence_length

# --targets presets: `attn` is every attention projection, image and text stream (FLUX.1's double blocks' names);
# `attn-ff` adds both streams' feed-forward layers.
_ATTN = r"\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$"
_FF = r"\.(img_mlp|txt_mlp)\.net\.(0\.proj|2)$"
PRESETS = {"attn": _ATTN, "attn-ff": f"(?:{_ATTN})|(?:{_FF})", "text": TARGET_PRESETS["text"]}


@dataclass(frozen=True)
class QwenImageFamily(WeightedFamily):
    """--weighting-scheme 'none' by default, as diffusers' script; --guidance and --max-sequence-length refused."""

    def matches_denoiser(self, get: ConfigGet) -> bool:
        """QwenImageTransformer2DModel: a text input of `joint_attention_dim` and rotary axes, no single blocks, no
        pooled or caption projection."""
        return (
            get("joint_attention_dim") is not None
            and get("axes_dims_rope") is not None
            and get("num_single_layers") is None
            and get("pooled_projection_dim") is None
        )

    def unused_denoiser_layers(self, linears: Iterable[str]) -> tuple[str, ...]:
        """The last block's text stream after its attention (its text query, output and feed-forward): the model's
        output is the image stream's, so they cannot learn."""
        names = list(linears)
        last = max(int(n.split(".")[1]) for n in names if n.startswith("transformer_blocks."))
        unused = ("attn.add_q_proj", "attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2")
        return tuple(f"transformer_blocks.{last}.{m}" for m in unused if f"transformer_blocks.{last}.{m}" in names)

    def encode_pixels(self, vae, pixels):
        """The VAE takes frames: the pictures as one-frame videos (B, 3, 1, H, W)."""
        return vae.encode(pixels.unsqueeze(2)).latent_dist

    def normalise_latents(self, vae, z):
        """(z − latents_mean) · (1 / latents_std), per channel, as the script computes it."""
        import torch

        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(z)
        inverse = 1.0 / torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(z)
        return (z - mean) * inverse

    def encode_prompts(self, tokenizers: list, text_models: list, prompts: list[str]) -> Conditioning:
        """As QwenImagePipeline: the template around each prompt, Qwen2.5-VL's last hidden states of the real tokens
        after the first DROP, at most SEQUENCE_LENGTH of them, zero-padded to SEQUENCE_LENGTH with their mask."""
        import torch
        import torch.nn.functional as F

        tokenizer, encoder = tokenizers[0], text_models[0]
        device = next(encoder.parameters()).device
        texts = [TEMPLATE.format(p) for p in prompts]
        tokens = tokenizer(texts, max_length=1024 + DROP, padding=True, truncation=True, return_tensors="pt")
        mask = tokens.attention_mask.to(device)
        states = encoder(input_ids=tokens.input_ids.to(device), attention_mask=mask, output_hidden_states=True)
        rows = [row[m.bool()][DROP:][:SEQUENCE_LENGTH] for row, m in zip(states.hidden_states[-1], mask)]
        embeds = torch.stack([F.pad(r, (0, 0, 0, SEQUENCE_LENGTH - r.shape[0])) for r in rows])
        real = torch.stack([torch.arange(SEQUENCE_LENGTH, device=device) < r.shape[0] for r in rows])
        return Conditioning(embeds, None, real)

    def denoise(self, model, noisy, timesteps, cond: Conditioning, geometry, dtype):
        """The transformer on the packed latents of the one frame, the text cut to the batch's longest prompt (its
        mask given only where some token is padding, as the pipeline does); the prediction as a frame again."""
        from .flow_match import pack_latents, unpack_latents

        b, _, _, h, w = noisy.shape
        longest = int(cond.mask.sum(dim=1).max())
        embeds, mask = cond.embeds[:, :longest].to(dtype), cond.mask[:, :longest]
        prediction = model(
            hidden_states=pack_latents(noisy[:, :, 0].to(dtype)),
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=None if bool(mask.all()) else mask.long(),
            timestep=timesteps,
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
        )[0]
        return unpack_latents(prediction, h, w).unsqueeze(2)

    def guidance_kwargs(self, guidance: float, negative: list[str] | None, count: int) -> dict:
        """QwenImagePipeline's true classifier-free guidance: `true_cfg_scale`, against a blank prompt unless one is
        given (the pipeline guides only with a negative prompt)."""
        return {"true_cfg_scale": guidance, "negative_prompt": negative or [" "] * count}

    def native_size(self, pipe) -> int:
        """QwenImagePipeline's default side: its default sample size in latent pixels through the VAE (1024)."""
        return int(pipe.default_sample_size) * int(pipe.vae_scale_factor)

    def size_multiple(self, pipe) -> int:
        """The VAE's scale factor times 2: latents are packed in 2x2 patches."""
        return 2 * int(pipe.vae_scale_factor)

    def objective(self, scheduler_config: Mapping):
        from .flow_match import FlowMatch

        return FlowMatch.from_scheduler_config(scheduler_config, self.weighting)


QWEN_IMAGE = QwenImageFamily(
    name="qwen-image",
    title="Qwen-Image",
    pipeline_class="QwenImagePipeline",
    components=(
        Component("transformer", "denoiser", "qwen_image_transformer.json"),
        Component("text_encoder", "text", "qwen25_vl_7b_text.json", "tokenizer", trainable=False),
    ),
    context_width=None,
    default_resolution=512,  # diffusers' DreamBooth Qwen-Image script's default --resolution
    layer_list=True,
    target_presets=PRESETS,
    schedulers={"euler": "FlowMatchEulerDiscreteScheduler"},  # the pipeline's own, its shift by the image size
    ui=UiNames(modelspec_id="qwen-image", resolution=1024, base_model_version="qwen_image", reads_versions=("qwen",)),
    # the transformer alone in diffusers' own names, which ComfyUI's Qwen-Image model also uses
    single_file=SingleFile(
        "the Qwen-Image transformer alone, in its own names",
        denoiser_only=True,
        layout="diffusers",
        denoiser_marks=("txt_norm.weight",),
    ),
    file_naming="diffusers_names",
    samplers={"": SamplerDefaults(steps=50, guidance=4.0, preview_steps=20)},  # the pipeline's, true CFG 4
    tiny=("qwen-image",),
)
