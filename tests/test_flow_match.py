"""krona's flow-matching objective against diffusers' own: FluxPipeline's packing helpers, the scheduler's sigma table
and time shift, the training helpers' density and loss weighting, and the loss expression of diffusers' DreamBooth
FLUX script (examples/dreambooth/train_dreambooth_lora_flux.py)."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from krona_cli.errors import KronaError
from krona_cli.families.flow_match import WEIGHTINGS, FlowMatch, image_ids, pack_latents, unpack_latents
from krona_cli.rng import generator

# black-forest-labs/FLUX.1-dev and FLUX.1-schnell scheduler/scheduler_config.json; SD3's static shift 3 for contrast.
DEV = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
SCHNELL = {**DEV, "shift": 1.0, "use_dynamic_shifting": False}
SD3 = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}
CONFIGS = {"dev": DEV, "schnell": SCHNELL, "sd3": SD3}
SHAPE = (16, 8, 12)  # a latent (C, H, W): 4x6 = 24 tokens


def script_sigmas(scheduler, u):
    """The DreamBooth FLUX script's sigmas for draws u: indices, then `timesteps[indices]`, then its `get_sigmas`."""
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    step_indices = [(scheduler.timesteps == t).nonzero().item() for t in timesteps]
    return timesteps, scheduler.sigmas[step_indices].flatten()


def script_loss(scheme, sigmas, model_pred, target):
    """The script's regular loss, with sigmas shaped (B, 1, 1, 1) as its `get_sigmas` returns them."""
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)
    loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1)
    return loss.mean()


def test_packing_equals_flux_pipeline():
    x = torch.randn(2, 16, 6, 10)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 10))
    tokens = torch.randn_like(packed)
    unpacked = FluxPipeline._unpack_latents(tokens, height=6 * 8, width=10 * 8, vae_scale_factor=8)
    assert torch.equal(unpack_latents(tokens, 6, 10), unpacked)
    assert torch.equal(unpack_latents(packed, 6, 10), x)
    assert torch.equal(image_ids(6, 10), FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32))
    with pytest.raises(KronaError, match="even"):
        pack_latents(torch.randn(1, 16, 5, 6))


@pytest.mark.parametrize("name", CONFIGS)
def test_sigma_table_is_the_schedulers(name):
    scheduler = FlowMatchEulerDiscreteScheduler(**CONFIGS[name])
    assert torch.equal(FlowMatch.from_scheduler_config(CONFIGS[name]).sigma_table, scheduler.sigmas)


@pytest.mark.parametrize("name", ["dev", "schnell"])
@pytest.mark.parametrize("scheme", WEIGHTINGS)
def test_loss_equals_dreambooth_script(scheme, name):
    scheduler = FlowMatchEulerDiscreteScheduler(**CONFIGS[name])
    fm = FlowMatch.from_scheduler_config(CONFIGS[name], weighting=scheme)
    torch.manual_seed(3)
    u = compute_density_for_timestep_sampling(scheme, 6, 0.0, 1.0, 1.29, generator=torch.Generator().manual_seed(5))
    timesteps, sigmas = script_sigmas(scheduler, u)
    latents, noise, model_pred = (torch.randn(6, *SHAPE) for _ in range(3))
    s = sigmas.reshape(-1, 1, 1, 1)
    assert torch.equal(fm.noisy(latents, noise, sigmas), (1.0 - s) * latents + s * noise)
    assert torch.equal(fm.target(latents, noise, sigmas), noise - latents)
    assert torch.equal(fm.model_timesteps(sigmas), timesteps / 1000)
    expected = script_loss(scheme, s, model_pred, noise - latents)
    torch.testing.assert_close(fm.per_sample_loss(model_pred, noise - latents, sigmas, None).mean(), expected)


@pytest.mark.parametrize("scheme", WEIGHTINGS)
def test_unshifted_draw_is_the_scripts_sigma(scheme):
    scheduler = FlowMatchEulerDiscreteScheduler(**DEV)
    options = {"logit_mean": 0.3, "mode_scale": 1.1, "shift_by_resolution": False}
    fm = FlowMatch.from_scheduler_config(DEV, weighting=scheme, **options)
    for i in range(20):
        noise, sigma, eps = fm.draw(SHAPE, 0.05, "noise", 7, i)
        g = generator("noise", 7, i)  # replay the sample's generator through diffusers' density
        ref_noise = torch.randn(SHAPE, generator=g) + 0.05 * torch.randn((SHAPE[0], 1, 1), generator=g)
        u = compute_density_for_timestep_sampling(scheme, 1, 0.3, 1.0, 1.1, generator=g)
        assert sigma == script_sigmas(scheduler, u)[1].item()
        assert sigma in scheduler.sigmas.tolist()
        assert torch.equal(noise, ref_noise)
        assert torch.equal(eps, torch.randn(SHAPE, generator=g))


@pytest.mark.parametrize("shape", [SHAPE, (16, 64, 96), (16, 128, 128)])
def test_shifted_draw_is_the_samplers_time_shift(shape):
    scheduler = FlowMatchEulerDiscreteScheduler(**DEV)
    mu = calculate_shift((shape[1] // 2) * (shape[2] // 2), 256, 4096, 0.5, 1.15)
    plain = FlowMatch.from_scheduler_config(DEV, shift_by_resolution=False)
    shifted = FlowMatch.from_scheduler_config(DEV)
    for i in range(20):
        sigma = shifted.draw(shape, 0.0, "noise", 1, i)[1]
        base = plain.draw(shape, 0.0, "noise", 1, i)[1]
        assert sigma == scheduler.time_shift(mu, 1.0, torch.tensor([base])).item()
        assert sigma >= base
    u = torch.tensor([0.1, 0.5, 0.9])
    expected = scheduler.time_shift(mu, 1.0, script_sigmas(scheduler, u)[1])
    assert torch.equal(shifted.sigmas_for(u, shape), expected)
    fixed = scheduler.time_shift(mu, 1.0, script_sigmas(scheduler, torch.tensor([0.125, 0.375, 0.625, 0.875]))[1])
    assert torch.equal(shifted.fixed_timesteps(4, shape), fixed)


def test_static_shift_is_applied_once():
    scheduler = FlowMatchEulerDiscreteScheduler(**SD3)
    for flag in (True, False):
        fm = FlowMatch.from_scheduler_config(SD3, shift_by_resolution=flag)
        assert [fm.draw(SHAPE, 0.0, "s", i)[1] in scheduler.sigmas.tolist() for i in range(10)] == [True] * 10
        assert torch.equal(fm.fixed_timesteps(2, SHAPE), script_sigmas(scheduler, torch.tensor([0.25, 0.75]))[1])


def test_draws_are_deterministic_per_seed_parts():
    fm = FlowMatch.from_scheduler_config(DEV, weighting="logit_normal")
    a, b = fm.draw(SHAPE, 0.1, "noise", 3, 4), fm.draw(SHAPE, 0.1, "noise", 3, 4)
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and torch.equal(a[2], b[2])
    sigmas = {fm.draw(SHAPE, 0.1, "noise", 3, i)[1] for i in range(20)}
    assert len(sigmas) > 10
    c = fm.draw(SHAPE, 0.1, "noise", 3, 5)
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[2], c[2])


def test_logit_normal_median():
    plain = FlowMatch.from_scheduler_config(DEV, weighting="logit_normal", shift_by_resolution=False)
    sigmas = torch.tensor([plain.draw((1, 2, 2), 0.0, "median", i)[1] for i in range(2000)])
    assert abs(sigmas.median().item() - 0.5) < 0.03
    assert 0.13 < (sigmas - 0.5).abs().median().item() < 0.19  # sigmoid(N(0, 1)): quartiles 0.338, 0.662
    uniform = FlowMatch.from_scheduler_config(DEV, shift_by_resolution=False)
    spread = torch.tensor([uniform.draw((1, 2, 2), 0.0, "median", i)[1] for i in range(2000)])
    assert 0.22 < (spread - 0.5).abs().median().item() < 0.28  # uniform: quartiles 0.25, 0.75


def test_bad_weighting_and_snr_gamma_are_krona_errors():
    with pytest.raises(KronaError, match="none, logit_normal, mode, sigma_sqrt, cosmap"):
        FlowMatch.from_scheduler_config(DEV, weighting="uniform")
    fm = FlowMatch.from_scheduler_config(DEV)
    x = torch.zeros(2, *SHAPE)
    with pytest.raises(KronaError, match="snr-gamma"):
        fm.per_sample_loss(x, x, torch.tensor([0.5, 0.5]), 5.0)
