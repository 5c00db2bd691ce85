"""SD3.5 through `krona train` on the tiny SD3 pipeline: the loss of a training batch is the one diffusers' own helpers
compute (the DreamBooth SD3 script's), a resumed run is bit-identical, and the class images, both CLIPs and the
samples work."""

import pytest
import torch
from helpers import record_losses
from safetensors.torch import load_file
from test_train import CLASS_PROMPT, PROMPT, config

from krona_cli.training.train import train


def diffusers_loss(pipe, transformer, latents, noise, sigmas, captions, scheme, precondition=True, tokens=77):
    """diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py's loss for these latents, noise and sigmas, with
    StableDiffusion3Pipeline's own prompt encoding: the scheduler's timesteps, given raw, and by default the output
    preconditioned to x0 and compared with the latents."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=captions, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False, max_sequence_length=tokens
    )
    s = sigmas.reshape(-1, 1, 1, 1)
    noisy = (1.0 - s) * latents + s * noise
    timesteps = sigmas * pipe.scheduler.config.num_train_timesteps  # the scheduler's timestep of each sigma
    prediction = transformer(
        hidden_states=noisy, timestep=timesteps, encoder_hidden_states=embeds, pooled_projections=pooled
    )[0]
    target = noise - latents
    if precondition:
        prediction, target = prediction * (-s) + noisy, latents
    weighting = compute_loss_weighting_for_sd3(scheme, sigmas=s)
    b = latents.shape[0]
    return torch.mean((weighting.float() * (prediction.float() - target.float()) ** 2).reshape(b, -1), 1).mean()


def test_the_scheduler_timesteps_are_the_ones_krona_draws_from(tiny_sd3_dir):
    """The script indexes `scheduler.timesteps` (σ·1000 of the shift-3 table); krona's table gives the same."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from krona_cli import families

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_sd3_dir, subfolder="scheduler")
    objective = families.get("sd3").objective(scheduler.config)
    assert objective.shift == 3.0 and not objective.use_dynamic_shifting
    torch.testing.assert_close(objective.model_timesteps(objective.sigma_table), scheduler.timesteps, rtol=0, atol=0)


@pytest.mark.parametrize(
    "settings", [{}, {"weighting_scheme": "cosmap", "max_sequence_length": 40}, {"drop_t5": True}], ids=str
)
def test_the_loss_of_a_training_batch_is_the_one_diffusers_helpers_compute(
    tiny_sd3_dir, tmp_path, monkeypatch, captured_pipes, settings
):
    """Also without T5 (--drop-t5): the pipeline loaded without it, whose encode_prompt gives zeros for its part."""
    tokens = settings.get("max_sequence_length", 77)
    seen = record_losses(
        monkeypatch, diffusers_loss, scheme=settings.get("weighting_scheme", "logit_normal"), tokens=tokens
    )
    train(config(tiny_sd3_dir, tmp_path / "run", steps=3, batch_size=2, lr=1e-2, **settings))
    assert (captured_pipes[0].text_encoder_3 is None) == settings.get("drop_t5", False)
    assert len(seen) == 3
    for sigmas, loss, expected in seen:
        assert sigmas.dtype == torch.float32 and ((sigmas > 0) & (sigmas < 1)).all() and len(set(sigmas.tolist())) == 2
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)


def test_without_t5_the_loss_is_not_the_one_with_it(tiny_sd3_dir):
    """The check above can tell: on one batch, the prompt states without T5 (zeros for its part) give another loss.
    (It told krona's first try, which left out T5's zero tokens where the tiny CLIPs are as wide as T5, by 2e-5.)"""
    from krona_cli.pipeline.tiny_sd3 import build_tiny

    pipe = build_tiny("sd3")
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    args = (latents, noise, torch.tensor([0.3, 0.8]), [PROMPT, CLASS_PROMPT], "logit_normal")
    with torch.no_grad():
        with_t5 = diffusers_loss(pipe, pipe.transformer, *args)
        pipe.text_encoder_3 = pipe.tokenizer_3 = None
        # far outside the 1e-6 the check above allows
        assert not torch.isclose(with_t5, diffusers_loss(pipe, pipe.transformer, *args), rtol=1e-4)


def test_sampling_without_t5_as_trained_and_a_family_that_needs_its_t5_refuses(
    tiny_sd3_dir, tiny_flux_dir, tmp_path, capsys
):
    """`--drop-t5` through the CLI: training without T5 says to sample without it, sampling so draws, and a FLUX.1
    base refuses the flag in one line, writing nothing."""
    from helpers import tiny_train_args

    from krona_cli.cli import main

    out = tmp_path / "run"
    steps = ["--steps", "1", "--sample-every", "0", "--sample-steps", "1"]
    assert main(tiny_train_args(tiny_sd3_dir, out, *steps, "--drop-t5")) == 0
    assert "-n 4 --drop-t5" in capsys.readouterr().out and "-n 4 --drop-t5" in (out / "README.md").read_text()
    common = ["--prompt", PROMPT, "-n", "1", "--sample-steps", "1", "--width", "64", "--height", "64", "--drop-t5"]
    adapter = str(out / "adapter.safetensors")
    assert main(["sample", "--adapter", adapter, *common, "--output-dir", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "grid.png").is_file()
    capsys.readouterr()
    flux = ["sample", "--pretrained-model", str(tiny_flux_dir), *common, "--output-dir", str(tmp_path / "f")]
    assert main(flux) == 2 and not (tmp_path / "f").exists()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--drop-t5 does not apply to FLUX.1 models" in err


def test_the_loss_is_not_the_unpreconditioned_one(tiny_sd3_dir):
    """The check above can tell: on one batch, the preconditioned loss and the plain velocity loss differ."""
    from krona_cli.pipeline.tiny_sd3 import build_tiny

    pipe = build_tiny("sd3")
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    sigmas = torch.tensor([0.3, 0.8])
    args = (pipe, pipe.transformer, latents, noise, sigmas, [PROMPT, CLASS_PROMPT], "logit_normal")
    with torch.no_grad():
        assert not torch.isclose(diffusers_loss(*args), diffusers_loss(*args, precondition=False), rtol=1e-3)


def test_a_resumed_sd3_run_is_bit_identical_to_a_straight_one(tiny_sd3_dir, tmp_path):
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
    straight = train(config(tiny_sd3_dir, tmp_path / "straight", steps=4, **common))
    train(config(tiny_sd3_dir, tmp_path / "resumed", steps=2, **common))
    resumed = train(config(tiny_sd3_dir, tmp_path / "resumed", steps=4, resume="latest", **common))
    a, b = load_file(straight.adapter), load_file(resumed.adapter)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    components = {k.split(".")[0] for k in a}
    assert components == {"transformer", "text_encoder", "text_encoder_2"}  # both CLIPs learn; T5 is never adapted
    assert any(".attn2.to_q." in k for k in a) and any(".ff_context.net.2." in k for k in a)  # attn-ff's layers
    assert all(a[k].abs().sum() > 0 for k in a if k.endswith("kron_b"))
    assert len(list((tmp_path / "classes").glob("*.png"))) == 2  # drawn by the tiny SD3


def test_sd3_refuses_flux_only_settings(tiny_sd3_dir, tmp_path):
    from krona_cli.errors import KronaError

    with pytest.raises(KronaError, match="--guidance is the distilled guidance input of FLUX.1"):
        train(config(tiny_sd3_dir, tmp_path / "r", guidance=2.0))


@pytest.mark.parametrize("precision", ["int8", "nf4"])
def test_sd3_trains_on_a_quantized_base(tiny_sd3_dir, tmp_path, captured_pipes, precision):
    from torch import nn

    from krona_cli.kron.layer import is_quantized

    run = train(config(tiny_sd3_dir, tmp_path / "run", steps=2, base_precision=precision, train_text_encoder=True))
    transformer = captured_pipes[0].transformer
    quantized = [n for n, m in transformer.named_modules() if isinstance(m, nn.Linear) and is_quantized(m)]
    # nf4 quantizes only sides that are multiples of 64 (bitsandbytes' CPU kernels): the tiny SD3 has none
    assert bool(quantized) == (precision == "int8") and all(torch.isfinite(torch.tensor(run.losses)))
    assert {k.split(".")[0] for k in load_file(run.adapter)} == {"transformer", "text_encoder", "text_encoder_2"}
