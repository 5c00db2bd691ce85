"""FLUX.1 through `krona train` on the tiny FLUX pipeline: the loss of a training batch is the one diffusers' own
helpers compute, a resumed run is bit-identical, and the class images, the text encoder and the samples work."""

import shutil

import pytest
import torch
from helpers import record_losses
from safetensors.torch import load_file
from test_train import CLASS_PROMPT, PROMPT, config

from krona_cli.training.config import load_config
from krona_cli.training.train import train


def diffusers_loss(pipe, transformer, latents, noise, sigmas, captions, scheme="none", guidance=3.5, tokens=512):
    """The DreamBooth FLUX script's loss (diffusers' examples/dreambooth/train_dreambooth_lora_flux.py) for these
    latents, noise and sigmas, with FluxPipeline's own prompt encoding, packing and ids."""
    from diffusers import FluxPipeline
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    b, c, h, w = latents.shape
    embeds, pooled, text_ids = pipe.encode_prompt(prompt=captions, prompt_2=None, max_sequence_length=tokens)
    s = sigmas.reshape(-1, 1, 1, 1)
    noisy = (1.0 - s) * latents + s * noise
    timesteps = sigmas * pipe.scheduler.config.num_train_timesteps  # the scheduler's timestep of each sigma
    guidance = torch.tensor([guidance]).expand(b) if transformer.config.guidance_embeds else None
    prediction = transformer(
        hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w),
        timestep=timesteps / 1000,
        guidance=guidance,
        pooled_projections=pooled,
        encoder_hidden_states=embeds,
        txt_ids=text_ids,
        img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype),
        return_dict=False,
    )[0]
    factor = pipe.vae_scale_factor
    prediction = FluxPipeline._unpack_latents(prediction, h * factor, w * factor, factor)
    weighting = compute_loss_weighting_for_sd3(scheme, sigmas=s)
    target = noise - latents
    return torch.mean((weighting.float() * (prediction.float() - target.float()) ** 2).reshape(b, -1), 1).mean()


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"weighting_scheme": "sigma_sqrt", "guidance": 1.0, "max_sequence_length": 64},
        {"weighting_scheme": "cosmap"},
    ],
)
def test_the_loss_of_a_training_batch_is_the_one_diffusers_helpers_compute(
    tiny_flux_dir, tmp_path, monkeypatch, settings
):
    script = {
        "scheme": settings.get("weighting_scheme", "none"),
        "guidance": settings.get("guidance", 3.5),
        "tokens": settings.get("max_sequence_length", 512),
    }
    seen = record_losses(monkeypatch, diffusers_loss, **script)
    train(config(tiny_flux_dir, tmp_path / "run", steps=3, batch_size=2, lr=1e-2, **settings))
    assert len(seen) == 3
    for sigmas, loss, expected in seen:
        assert sigmas.dtype == torch.float32 and ((sigmas > 0) & (sigmas < 1)).all() and len(set(sigmas.tolist())) == 2
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)


def test_a_resumed_flux_run_is_bit_identical_to_a_straight_one(tiny_flux_dir, tmp_path):
    common = dict(
        class_prompt=CLASS_PROMPT,
        class_dir=str(tmp_path / "classes"),
        num_class_images=2,
        train_text_encoder=True,
        text_encoder_factors="4x4",
        targets="attn-ff",
        checkpoint_every=2,
        lr=1e-2,
        ema=True,
    )
    straight = train(config(tiny_flux_dir, tmp_path / "straight", steps=4, **common))
    train(config(tiny_flux_dir, tmp_path / "resumed", steps=2, **common))
    resumed = train(config(tiny_flux_dir, tmp_path / "resumed", steps=4, resume="latest", **common))
    a, b = load_file(straight.adapter), load_file(resumed.adapter)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    components = {k.split(".")[0] for k in a}
    assert components == {"transformer", "text_encoder"}  # CLIP-L learns; T5 is never adapted
    assert any(".single_transformer_blocks." in f".{k}" and ".proj_mlp." in k for k in a)  # attn-ff's layers
    assert any(".add_q_proj." in k for k in a) and any(".to_add_out." in k for k in a)
    assert all(a[k].abs().sum() > 0 for k in a if k.endswith("kron_b"))
    assert len(list((tmp_path / "classes").glob("*.png"))) == 2  # drawn by the tiny FLUX


def test_flux_samples_with_its_own_scheduler_and_refuses_others(tiny_flux_dir, tmp_path, capsys):
    from krona_cli.cli import main

    run = train(config(tiny_flux_dir, tmp_path / "run", steps=1))
    base = ["sample", "--adapter", str(run.adapter), "--prompt", PROMPT, "-n", "1", "--sample-steps", "2"]
    assert main([*base, "--output-dir", str(tmp_path / "s"), "--width", "64", "--height", "64"]) == 0
    assert (tmp_path / "s" / "p00-s0.png").is_file()
    assert main([*base, "--output-dir", str(tmp_path / "t"), "--scheduler", "dpm++"]) == 2
    assert "scheduler 'dpm++' does not sample FLUX.1 models; use euler" in capsys.readouterr().err
    assert main([*base, "--output-dir", str(tmp_path / "u"), "--width", "72", "--height", "64"]) == 2
    assert "--width 72 is not a multiple of 16" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "run")


@pytest.mark.slow
@pytest.mark.subprocess
def test_two_processes_give_the_adapter_of_one_with_the_same_global_batch(tiny_flux_dir, tmp_path):
    from test_multiprocess import launch, relative_difference, settings

    classes = tmp_path / "classes"
    two = launch(tiny_flux_dir, tmp_path / "two", classes, steps=4, batch_size=1, grad_accum=2, sample_every=0)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "all 2 processes hold bit-identical adapter weights" in two.stdout
    one = train(load_config("tiny", settings(tiny_flux_dir, tmp_path / "one", classes, steps=4, batch_size=4)))
    adapter = load_file(tmp_path / "two" / "adapter.safetensors")
    assert relative_difference(adapter, load_file(one.adapter)) < 1e-5
    assert {k.split(".")[0] for k in adapter} == {"transformer", "text_encoder"}


@pytest.mark.parametrize(
    "options",
    [
        {"gradient_checkpointing": True},
        {"base_precision": "int8"},
        {"base_precision": "nf4"},
        {"mixed_precision": "bf16"},
        {"adapter_type": "lora"},
        {"adapter_type": "lokr", "factors": "4x4"},
    ],
    ids=["checkpointing", "int8", "nf4", "bf16", "lora", "lokr"],
)
def test_flux_trains_with_each_memory_option_and_baseline_adapter(tiny_flux_dir, tmp_path, options):
    result = train(config(tiny_flux_dir, tmp_path / "run", steps=2, lr=1e-2, **options))
    saved = load_file(result.adapter)
    assert saved and all(k.split(".")[0] == "transformer" for k in saved)
    assert all(torch.isfinite(t).all() for t in saved.values())
    assert any(t.abs().sum() > 0 for k, t in saved.items() if "kron_b" in k or "up" in k or "w2" in k)


@pytest.mark.parametrize(("arch", "expected"), [("flux", (28, 3.5, 20)), ("flux-schnell", (4, 0.0, 4))])
def test_flux_samples_with_its_own_defaults(arch, expected):
    from krona_cli.inference.sampling import SampleConfig
    from krona_cli.pipeline.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(arch)
    config = SampleConfig().for_model(pipe)
    assert (config.steps, config.guidance, SampleConfig().for_model(pipe, preview=True).steps) == expected
    assert SampleConfig(steps=3, guidance=1.5).for_model(pipe) == SampleConfig(steps=3, guidance=1.5)


def test_a_merged_transformer_file_samples_and_trains_in_the_bases_place(tiny_flux_dir, tmp_path):
    """`merge --output` writes the FLUX transformer alone; `sample` and `train` take it with --transformer, and the
    base with it draws exactly what the base with the adapter draws."""
    from PIL import Image

    from krona_cli.cli import main

    run = train(config(tiny_flux_dir, tmp_path / "run", steps=2, lr=1e-2))
    merged = tmp_path / "merged.safetensors"
    assert main(["merge", "--adapter", str(run.adapter), "--output", str(merged), "--dtype", "fp32"]) == 0
    common = ["--prompt", PROMPT, "-n", "1", "--sample-steps", "2", "--width", "64", "--height", "64"]
    assert main(["sample", "--adapter", str(run.adapter), *common, "--output-dir", str(tmp_path / "a")]) == 0
    base = ["--pretrained-model", str(tiny_flux_dir), "--transformer", str(merged)]
    assert main(["sample", *base, *common, "--output-dir", str(tmp_path / "b")]) == 0
    assert main(["sample", *base[:2], *common, "--output-dir", str(tmp_path / "c")]) == 0  # the base alone
    a, b, c = (Image.open(tmp_path / d / "p00-s0.png") for d in ("a", "b", "c"))
    assert a.tobytes() == b.tobytes() != c.tobytes()
    again = train(config(tiny_flux_dir, tmp_path / "again", steps=1, transformer=str(merged)))
    assert load_file(again.adapter)


@pytest.mark.parametrize("flag", ["resolution", "sample_width"])
def test_sizes_flux_cannot_take_stop_the_run_before_it_trains(tiny_flux_dir, tmp_path, flag):
    from krona_cli.errors import KronaError

    expected = f"^--{flag.replace('_', '-')} 72 is not a multiple of 16 \\(FLUX\\.1 images\\); choose one$"
    with pytest.raises(KronaError, match=expected):
        train(config(tiny_flux_dir, tmp_path / "run", steps=1, **{flag: 72}))
    assert not (tmp_path / "run" / "adapter.safetensors").exists()


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_a_transformer_file_quantized_as_it_loads_trains_the_adapter_of_the_base_quantized_whole(
    tiny_flux_dir, tmp_path, precision
):
    """Under int8/nf4 a --transformer file is quantized layer by layer as it is read (FLUX.1's does not fit in memory
    whole in fp32); the run is the one on the same weights loaded whole and then quantized. Under nf4 the tiny layers
    stay fp32 (below), and fp32 matmuls on the two loads' tensors may round differently: on an AVX512-BF16 CPU the
    two adapters were 1.9e-6 apart (values up to 0.52), so those are compared within float32 rounding."""
    from diffusers import FluxTransformer2DModel

    from krona_cli.pipeline.flux_file import save_transformer_file

    own = FluxTransformer2DModel.from_pretrained(tiny_flux_dir / "transformer")
    file = save_transformer_file(own, tmp_path / "transformer.safetensors", torch.float32)
    settings = dict(steps=2, lr=1e-2, base_precision=precision)
    whole = train(config(tiny_flux_dir, tmp_path / "whole", **settings))
    streamed = train(config(tiny_flux_dir, tmp_path / "streamed", transformer=str(file), **settings))
    a, b = load_file(whole.adapter), load_file(streamed.adapter)
    assert a.keys() == b.keys()
    for key in a:
        if precision == "int8":
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    # the file's layers arrive quantized (every tiny layer under int8; none is a multiple of 64 for nf4's kernels)
    from krona_cli.pipeline import models
    from krona_cli.pipeline.quantize import quantizable

    pipe, _ = models.load_pipeline(str(tiny_flux_dir), transformer=str(file), quantized=(precision, torch.float32))
    kinds = {type(m).__name__ for m in pipe.transformer.modules()}
    assert not any(quantizable(m, precision) for m in pipe.transformer.modules())
    assert ("Linear8bitLt" in kinds) == (precision == "int8")
