"""Z-Image through krona on the tiny Z-Image pipeline: the loss of a training batch is the one diffusers' DreamBooth
Z-Image script computes, a resumed run is bit-identical, the merged single file is the original layout diffusers
reads back, and the settings Z-Image has no use for are refused."""

import pytest
import torch
from helpers import record_losses
from safetensors.torch import load_file
from test_train import CLASS_PROMPT, PROMPT, config

from krona_cli.cli import main
from krona_cli.errors import KronaError
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


def test_a_resumed_z_image_run_is_bit_identical_to_a_straight_one(tiny_z_image_dir, tmp_path):
    common = dict(targets="attn-ff", checkpoint_every=2, lr=1e-2, ema=True, class_prompt=CLASS_PROMPT)
    common |= dict(class_dir=str(tmp_path / "classes"), num_class_images=2)
    straight = train(config(tiny_z_image_dir, tmp_path / "straight", steps=4, **common))
    train(config(tiny_z_image_dir, tmp_path / "resumed", steps=2, **common))
    resumed = train(config(tiny_z_image_dir, tmp_path / "resumed", steps=4, resume="latest", **common))
    a, b = load_file(straight.adapter), load_file(resumed.adapter)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    modules = {k.rsplit(".", 1)[0] for k in a}
    for part in ("layers.1.feed_forward.w2", "noise_refiner.0.attention.to_q", "context_refiner.0.attention.to_out.0"):
        assert f"transformer.{part}" in modules  # both refiners and the feed-forward layers learn
    assert all(a[k].abs().sum() > 0 for k in a if k.endswith("kron_b"))
    assert len(list((tmp_path / "classes").glob("*.png"))) == 2  # drawn by the tiny Z-Image


def test_the_merged_single_file_is_the_original_layout_diffusers_reads_back(tiny_z_image_dir, tmp_path):
    from diffusers import ZImageTransformer2DModel
    from safetensors import safe_open

    run = train(config(tiny_z_image_dir, tmp_path / "run", steps=2, targets="attn-ff", lr=1e-2))
    merge = ["merge", "--adapter", str(run.adapter)]
    assert main([*merge, "--output", str(tmp_path / "m.safetensors"), "--dtype", "fp32"]) == 0
    assert main([*merge, "--output-dir", str(tmp_path / "folder")]) == 0
    with safe_open(tmp_path / "m.safetensors", "pt") as f:
        keys = set(f.keys())
    assert {"layers.0.attention.qkv.weight", "x_embedder.weight", "final_layer.linear.weight"} <= keys
    assert not any(".to_q." in k or k.startswith("all_") for k in keys)
    read = ZImageTransformer2DModel.from_single_file(
        str(tmp_path / "m.safetensors"), config=str(tiny_z_image_dir), subfolder="transformer"
    ).state_dict()
    want = ZImageTransformer2DModel.from_pretrained(tmp_path / "folder", subfolder="transformer").state_dict()
    assert read.keys() == want.keys() and all(torch.equal(read[k], want[k]) for k in want)


@pytest.mark.parametrize("flag", [{"guidance": 2.0}, {"max_sequence_length": 64}, {"train_text_encoder": True}])
def test_settings_z_image_has_no_use_for_are_refused(tiny_z_image_dir, tmp_path, flag):
    with pytest.raises(KronaError):
        train(config(tiny_z_image_dir, tmp_path / "r", steps=1, **flag))
    assert not (tmp_path / "r" / "adapter.safetensors").exists()


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
