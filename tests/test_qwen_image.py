"""Qwen-Image through krona on the tiny Qwen-Image pipeline: the loss of a training batch is the one diffusers'
DreamBooth Qwen-Image script computes, sampling guides with the pipeline's true CFG, and every adapted layer of the
real model is named as ComfyUI maps it (resume, the single file and the refused settings:
test_transformer_families.py)."""

import re

import pytest
import torch
from helpers import record_losses
from test_train import CLASS_PROMPT, PROMPT, config

from krona_cli import families
from krona_cli.cli import main
from krona_cli.training.train import train

QWEN = families.get("qwen-image")


def diffusers_loss(pipe, transformer, latents, noise, sigmas, captions, scheme="none", instances=None):
    """examples/dreambooth/train_dreambooth_lora_qwen_image.py's loss for these (normalised, one-frame) latents, noise
    and sigmas, with QwenImagePipeline's own prompt encoding, packing and shapes; with `instances`, the first that
    many samples' mean plus the rest's (the prior-preservation loss at weight 1)."""
    from diffusers import QwenImagePipeline as P
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    embeds, mask = pipe.encode_prompt(prompt=list(captions), max_sequence_length=512)
    b, c, _, h, w = latents.shape
    s = sigmas.reshape(-1, 1, 1, 1, 1)
    noisy = (1.0 - s) * latents + s * noise
    timesteps = sigmas * pipe.scheduler.config.num_train_timesteps
    prediction = transformer(
        hidden_states=P._pack_latents(noisy.permute(0, 2, 1, 3, 4), b, c, h, w),
        timestep=timesteps / 1000,
        encoder_hidden_states=embeds,
        encoder_hidden_states_mask=mask,
        img_shapes=[[(1, h // 2, w // 2)]] * b,
        return_dict=False,
    )[0]
    factor = pipe.vae_scale_factor
    prediction = P._unpack_latents(prediction, h * factor, w * factor, factor)
    weighting = compute_loss_weighting_for_sd3(scheme, sigmas=s)
    target = noise - latents
    per_sample = torch.mean((weighting.float() * (prediction.float() - target.float()) ** 2).reshape(b, -1), 1)
    n = instances or b
    return per_sample[:n].mean() + (per_sample[n:].mean() if n < b else 0)


def test_latents_are_normalised_by_the_vaes_channel_statistics(tiny_qwen_image_dir):
    from diffusers import AutoencoderKLQwenImage

    vae = AutoencoderKLQwenImage.from_pretrained(tiny_qwen_image_dir, subfolder="vae")
    z = torch.randn(1, 16, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1)
    torch.testing.assert_close(QWEN.normalise_latents(vae, z), (z - mean) / std)


@pytest.mark.parametrize("captions", ["same", "different"])
def test_the_loss_of_a_training_batch_is_the_one_diffusers_helpers_compute(
    tiny_qwen_image_dir, tmp_path, monkeypatch, captions
):
    """With one caption the text has no padding (no mask); with a class prompt beside it the batch is padded to the
    longer prompt with its mask, as the script pads it."""
    seen = record_losses(monkeypatch, diffusers_loss, instances=1)
    more = {} if captions == "same" else {"class_prompt": CLASS_PROMPT + " on a long plain background"}
    more |= {"class_dir": str(tmp_path / "classes"), "num_class_images": 1} if more else {}
    train(config(tiny_qwen_image_dir, tmp_path / "run", steps=2, batch_size=1, **more))
    assert len(seen) == 2
    for _, loss, expected in seen:
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)


def test_sampling_guides_with_true_cfg(tiny_qwen_image_dir, tmp_path):
    """The guidance reaches QwenImagePipeline's true_cfg_scale (against a blank prompt): 1 and 4 draw differently."""
    from PIL import Image

    base = ["sample", "--pretrained-model", str(tiny_qwen_image_dir), "--prompt", PROMPT, "-n", "1"]
    base += ["--sample-steps", "2", "--width", "64", "--height", "64"]
    for g in ("1", "4"):
        assert main([*base, "--guidance", g, "--output-dir", str(tmp_path / g)]) == 0
    one, four = (Image.open(tmp_path / g / "p00-s0.png").tobytes() for g in ("1", "4"))
    assert one != four


def test_every_adapted_layer_of_the_real_model_is_named_as_comfyui_maps_it():
    """Comfy-Org/ComfyUI comfy/lora.py @ ec93dcac, `model_lora_keys_unet` for `model_base.QwenImage`: ComfyUI's
    Qwen-Image model has diffusers' module names, and every `diffusion_model.<name>` weight is accepted as `<name>`,
    `transformer.<name>`, `lycoris_<name, . -> _>` and `diffusion_model.<name>`, whole (no slices). krona's LoKr and
    LoRA names of each layer `--targets attn-ff` adapts on the real list are among them, for a weight of that shape."""
    from krona_cli.formats.flux_names import DiffusersNaming

    layers = QWEN.linear_layers()["transformer"]
    weights = {f"diffusion_model.{name}.weight": (d_out, d_in) for name, d_out, d_in in layers}
    accepted = {}
    for weight in weights:
        name = weight.removeprefix("diffusion_model.").removesuffix(".weight")
        for spelled in (name, f"transformer.{name}", "lycoris_" + name.replace(".", "_"), f"diffusion_model.{name}"):
            accepted[spelled] = weight
    pattern = re.compile(QWEN.target_presets["attn-ff"])
    unused = set(QWEN.unused_denoiser_layers(n for n, _, _ in layers))
    adapted = [layer for layer in layers if pattern.search(layer[0]) and layer[0] not in unused]
    assert len(adapted) == 60 * 12 - 4  # 8 attention projections and 4 feed-forward layers per block, less the last
    # block's text query, output and feed-forward
    naming = DiffusersNaming({})
    for module, d_out, d_in in adapted:
        for name in (naming.lokr_name("transformer", module), f"transformer.{module}"):
            assert weights[accepted[name]] == (d_out, d_in), name
