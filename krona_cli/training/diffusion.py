"""The denoising objective: noise, timesteps, targets and the (min-SNR weighted) loss of one batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..rng import generator


def draw_noise(
    shape: tuple[int, ...], num_timesteps: int, noise_offset: float, *seed_parts: int | str
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """(noise, timestep, latent draw) for one sample from its own generator: the same parts give the same draws
    in any process, batch or resumed run. `latent draw` is the standard normal that samples the VAE posterior."""
    g = generator(*seed_parts)
    noise = torch.randn(shape, generator=g)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((shape[0], 1, 1), generator=g)
    timestep = int(torch.randint(0, num_timesteps, (1,), generator=g))
    eps = torch.randn(shape, generator=g)
    return noise, timestep, eps


def target_for(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon models) or the velocity (v-prediction models)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {kind!r}")


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_t² / sigma_t² of the given timesteps."""
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1.0 - alphas_cumprod)


def per_sample_loss(
    scheduler, prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, snr_gamma: float | None
) -> torch.Tensor:
    """Mean squared error per sample (float32), weighted by min(SNR, γ)/SNR (epsilon) or /(SNR + 1) (v) when
    `snr_gamma` is set (Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy")."""
    mse = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=tuple(range(1, prediction.ndim)))
    if snr_gamma is None:
        return mse
    ratio = snr(scheduler, timesteps)
    weight = torch.minimum(ratio, torch.full_like(ratio, snr_gamma))
    if scheduler.config.prediction_type == "v_prediction":
        return mse * weight / (ratio + 1)
    return mse * weight / ratio
