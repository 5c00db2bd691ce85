"""Z-Image through krona on the tiny Z-Image pipeline: the loss of a training batch is the one diffusers' DreamBooth
Z-Image script computes, sampling works, and every adapted layer of the real model is named as ComfyUI maps it
(resume, the single file and the refused settings: test_transformer_families.py)."""

import pytest
import torch
from helpers import record_losses
from test_train import PROMPT, config

from krona_cli.cli import main
from krona_cli.training.train import train


def diffusers_loss(pipe, transformer, latents, noise, sigmas, captions, scheme="none", negate=True):
    """examples/dreambooth/train_dreambooth_lora_z_image.py's loss for these latents, noise and sigmas, with
    ZImagePipeline's own prompt encoding: the transformer given (1000 − timesteps) / 1000 and a list of latents, its
    output negated."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    embeds, _ = pipe.encode_prompt(prompt=list(captions), do_classifier_free_guidance=False, max_sequence_length=512)
    s = sigmas.reshape(-1, 1, 1, 1)
    noisy = (1.0 - s) * latents + s * noise
    timesteps = sigmas * pipe.scheduler.config.num_train_timesteps
    out = transformer(list(noisy.unsqueeze(2).unbind(0)), (1000 - timesteps) / 1000, embeds, return_dict=False)[0]
    prediction = torch.stack(out).squeeze(2)
    prediction = -prediction if negate else prediction
    weighting = compute_loss_weighting_for_sd3(scheme, sigmas=s)
    b = latents.shape[0]
    target = noise - latents
    return torch.mean((weighting.float() * (prediction.float() - target.float()) ** 2).reshape(b, -1), 1).mean()


@pytest.mark.parametrize("scheme", [None, "logit_normal"])
def test_the_loss_of_a_training_batch_is_the_one_diffusers_helpers_compute(
    tiny_z_image_dir, tmp_path, monkeypatch, scheme
):
    seen = record_losses(monkeypatch, diffusers_loss, scheme=scheme or "none")
    unnegated = record_losses(monkeypatch, diffusers_loss, scheme=scheme or "none", negate=False)
    train(config(tiny_z_image_dir, tmp_path / "run", steps=2, batch_size=2, weighting_scheme=scheme))
    assert len(seen) == len(unnegated) == 2
    for (_, loss, expected), (_, _, other) in zip(seen, unnegated):
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
        assert not torch.isclose(loss, other, rtol=1e-5)  # the check (1e-6) can tell the output's sign


def test_z_image_samples_with_its_adapter(tiny_z_image_dir, tmp_path):
    run = train(config(tiny_z_image_dir, tmp_path / "run", steps=1))
    args = ["sample", "--adapter", str(run.adapter), "--prompt", PROMPT, "-n", "1", "--sample-steps", "2"]
    assert main([*args, "--output-dir", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "p00-s0.png").is_file()


def test_every_adapted_layer_of_the_real_model_is_named_as_comfyui_maps_it():
    """On Z-Image's real layer list (configs/models/layers/z-image.json, held to the meta model by test_plan), each
    layer `--targets attn-ff` adapts is named, by krona's LoKr and LoRA files, as ComfyUI maps it onto its weight."""
    import re

    from comfyui_z_image import comfyui_z_image_key_map, lumina_linear_shapes

    from krona_cli import families
    from krona_cli.formats.flux_names import DiffusersNaming

    family = families.get("z-image")
    pattern = re.compile(family.target_presets["attn-ff"])
    adapted = [layer for layer in family.linear_layers()["transformer"] if pattern.search(layer[0])]
    assert len(adapted) == (30 + 2 + 2) * 7  # q k v out, w1 w2 w3 in 30 layers and 2 refiners of each kind
    key_map, shapes = comfyui_z_image_key_map(30, 2, 3840), lumina_linear_shapes(30, 2, 3840, 10240)
    naming = DiffusersNaming(family.kohya_prefixes())
    for module, d_out, d_in in adapted:
        lokr = naming.lokr_name("transformer", module)
        weight, offset = key_map[lokr]
        assert key_map[f"transformer.{module}"] == (weight, offset) and shapes[weight][1] == d_in, module
        rows = shapes[weight][0]
        assert (offset is None and rows == d_out) or (offset[2] == d_out and offset[1] + d_out <= rows), module
