"""FLUX.2 [klein] through krona on the tiny FLUX.2 pipeline: the latent normalisation is the pipeline's batch-norm one,
the loss of a training batch is the one diffusers' DreamBooth FLUX.2 [klein] script computes, and every adapted layer
of the real FLUX.2 [klein] 4B is named as ComfyUI maps it (resume, the single file and the refused settings:
test_transformer_families.py)."""

import re

import pytest
import torch
from helpers import record_losses
from test_train import config

from krona_cli import families
from krona_cli.training.train import train

FLUX2 = families.get("flux2")


def test_latents_are_normalised_as_the_pipeline_normalises_them(tiny_flux2_dir):
    """Flux2KleinPipeline patchifies the VAE's latents and normalises them by the batch-norm statistics; krona does the
    same per element on the unpatchified latents (the tiny VAE's statistics are far from 0 and 1)."""
    from diffusers import Flux2KleinPipeline

    pipe = Flux2KleinPipeline.from_pretrained(tiny_flux2_dir)
    z = torch.randn(2, 32, 8, 6, generator=torch.Generator().manual_seed(0))
    patched = Flux2KleinPipeline._patchify_latents(z)
    mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    expected = Flux2KleinPipeline._unpatchify_latents((patched - mean) / std)
    assert torch.equal(FLUX2.normalise_latents(pipe.vae, z), expected)
    assert not torch.allclose(expected, z, atol=0.1)


def diffusers_loss(pipe, transformer, latents, noise, sigmas, captions, scheme="none"):
    """examples/dreambooth/train_dreambooth_lora_flux2_klein.py's loss for these (normalised) latents, noise and
    sigmas: patchified, packed with their ids, the prompts encoded by the pipeline, σ given as timestep / 1000."""
    from diffusers import Flux2KleinPipeline as P
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    embeds, text_ids = pipe.encode_prompt(prompt=list(captions), max_sequence_length=512)
    x0, eps = P._patchify_latents(latents), P._patchify_latents(noise)
    s = sigmas.reshape(-1, 1, 1, 1)
    noisy = (1.0 - s) * x0 + s * eps
    ids = P._prepare_latent_ids(noisy)
    timesteps = sigmas * pipe.scheduler.config.num_train_timesteps
    prediction = transformer(
        hidden_states=P._pack_latents(noisy),
        timestep=timesteps / 1000,
        guidance=None,
        encoder_hidden_states=embeds,
        txt_ids=text_ids,
        img_ids=ids,
        return_dict=False,
    )[0]
    prediction = P._unpack_latents_with_ids(prediction, ids)
    weighting = compute_loss_weighting_for_sd3(scheme, sigmas=s)
    b = latents.shape[0]
    target = eps - x0
    return torch.mean((weighting.float() * (prediction.float() - target.float()) ** 2).reshape(b, -1), 1).mean()


@pytest.mark.parametrize("scheme", [None, "cosmap"])
def test_the_loss_of_a_training_batch_is_the_one_diffusers_helpers_compute(
    tiny_flux2_dir, tmp_path, monkeypatch, scheme
):
    seen = record_losses(monkeypatch, diffusers_loss, scheme=scheme or "none")
    train(config(tiny_flux2_dir, tmp_path / "run", steps=2, batch_size=2, weighting_scheme=scheme))
    assert len(seen) == 2
    for sigmas, loss, expected in seen:
        assert len(set(sigmas.tolist())) == 2
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)


def test_every_adapted_layer_of_the_real_model_is_named_as_comfyui_maps_it():
    """FLUX.2 [klein] 4B's real layer list: each layer `--targets attn-ff` adapts is named by krona's LoKr and LoRA
    files as ComfyUI's FLUX rules (which carry FLUX.2's names, tests/comfyui_flux.py) map it, onto a weight of BFL's
    FLUX.2 layout with the rows the layer is."""
    from comfyui_flux import comfyui_flux_key_map

    from krona_cli.formats.flux2_layout import diffusers_to_flux2
    from krona_cli.formats.flux_names import DiffusersNaming
    from krona_cli.pipeline.models import build_component

    pattern = re.compile(FLUX2.target_presets["attn-ff"])
    adapted = [layer for layer in FLUX2.linear_layers()["transformer"] if pattern.search(layer[0])]
    assert len(adapted) == 5 * 12 + 20 * 2  # double: q k v out ×2 streams, ff ×2 streams; single: qkv+mlp in, out
    meta = build_component("flux2", "transformer").state_dict()
    shapes = {f"diffusion_model.{k}": tuple(v.shape) for k, v in diffusers_to_flux2(meta).items()}
    key_map = comfyui_flux_key_map(depth=5, depth_single=20, hidden_size=3072, guidance=False)
    naming = DiffusersNaming({})
    for module, d_out, d_in in adapted:
        weight, offset = key_map[naming.lokr_name("transformer", module)]
        assert key_map[f"transformer.{module}"] == (weight, offset) and shapes[weight][1] == d_in, module
        rows = shapes[weight][0]
        assert (offset is None and rows == d_out) or (offset[2] == d_out and offset[1] + d_out <= rows), module
