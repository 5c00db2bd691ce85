"""FLUX.2 [klein] through krona on the tiny FLUX.2 pipeline: the latent normalisation is the pipeline's batch-norm one,
the loss of a training batch is the one diffusers' DreamBooth FLUX.2 [klein] script computes, a resumed run is
bit-identical, the merged single file is BFL's layout that diffusers reads back, and every adapted layer of the real
FLUX.2 [klein] 4B is named as ComfyUI maps it."""

import re

import pytest
import torch
from helpers import record_losses
from safetensors.torch import load_file
from test_train import CLASS_PROMPT, config

from krona_cli import families
from krona_cli.cli import main
from krona_cli.errors import KronaError
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


def test_a_resumed_flux2_run_is_bit_identical_to_a_straight_one(tiny_flux2_dir, tmp_path):
    common = dict(targets="attn-ff", checkpoint_every=2, lr=1e-2, ema=True, class_prompt=CLASS_PROMPT)
    common |= dict(class_dir=str(tmp_path / "classes"), num_class_images=2)
    straight = train(config(tiny_flux2_dir, tmp_path / "straight", steps=4, **common))
    train(config(tiny_flux2_dir, tmp_path / "resumed", steps=2, **common))
    resumed = train(config(tiny_flux2_dir, tmp_path / "resumed", steps=4, resume="latest", **common))
    a, b = load_file(straight.adapter), load_file(resumed.adapter)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    modules = {k.rsplit(".", 1)[0] for k in a}
    for part in ("single_transformer_blocks.1.attn.to_qkv_mlp_proj", "transformer_blocks.0.ff_context.linear_out"):
        assert f"transformer.{part}" in modules
    assert all(a[k].abs().sum() > 0 for k in a if k.endswith("kron_b"))
    assert len(list((tmp_path / "classes").glob("*.png"))) == 2  # drawn by the tiny FLUX.2


def test_the_merged_single_file_is_bfls_layout_and_diffusers_reads_it_back(tiny_flux2_dir, tmp_path):
    from diffusers import Flux2Transformer2DModel
    from safetensors import safe_open

    run = train(config(tiny_flux2_dir, tmp_path / "run", steps=2, targets="attn-ff", lr=1e-2))
    merge = ["merge", "--adapter", str(run.adapter)]
    assert main([*merge, "--output", str(tmp_path / "m.safetensors"), "--dtype", "fp32"]) == 0
    assert main([*merge, "--output-dir", str(tmp_path / "folder")]) == 0
    with safe_open(tmp_path / "m.safetensors", "pt") as f:
        keys = set(f.keys())
    assert {"double_blocks.0.img_attn.qkv.weight", "single_blocks.1.linear1.weight", "img_in.weight"} <= keys
    assert "double_blocks.0.img_attn.norm.query_norm.scale" in keys and not any(".to_q." in k for k in keys)
    read = Flux2Transformer2DModel.from_single_file(
        str(tmp_path / "m.safetensors"), config=str(tiny_flux2_dir), subfolder="transformer"
    ).state_dict()
    want = Flux2Transformer2DModel.from_pretrained(tmp_path / "folder", subfolder="transformer").state_dict()
    assert read.keys() == want.keys() and all(torch.equal(read[k], want[k]) for k in want)


@pytest.mark.parametrize("flag", [{"guidance": 2.0}, {"max_sequence_length": 64}, {"train_text_encoder": True}])
def test_settings_flux2_has_no_use_for_are_refused(tiny_flux2_dir, tmp_path, flag):
    with pytest.raises(KronaError):
        train(config(tiny_flux2_dir, tmp_path / "r", steps=1, **flag))


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
