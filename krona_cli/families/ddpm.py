"""The DDPM objective of the Stable Diffusion families: noise and timestep draws, the noisy input, the target (the
noise for epsilon models, the velocity for v-prediction ones) and the (min-SNR weighted) loss, on the base model's own
beta schedule (diffusers' DDPMScheduler built from its scheduler config)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import KronaError
from ..rng import generator

PREDICTIONS = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class DDPM:
    """Training on a DDPM schedule. `name` is the prediction type (`epsilon` or `v_prediction`)."""

    scheduler: Any  # diffusers.DDPMScheduler

    @classmethod
    def from_scheduler_config(cls, config: Mapping) -> DDPM:
        """The objective of a base model's scheduler config; one line for a prediction type krona does not train."""
        from diffusers import DDPMScheduler

        prediction = config.get("prediction_type", "epsilon")
        if prediction not in PREDICTIONS:
            raise KronaError(f"the base model predicts '{prediction}'; krona trains epsilon and v-prediction models")
        return cls(DDPMScheduler.from_config(config))

    @property
    def name(self) -> str:
        return self.scheduler.config.prediction_type

    def draw(
        self, shape: tuple[int, ...], noise_offset: float, *seed_parts: int | str
    ) -> tuple[torch.Tensor, int, torch.Tensor]:
        """(noise, timestep, latent draw) for one sample from its own generator: the same parts give the same draws
        in any process, batch or resumed run. `latent draw` is the standard normal that samples the VAE posterior."""
        g = generator(*seed_parts)
        noise = torch.randn(shape, generator=g)
        if noise_offset:
            noise = noise + noise_offset * torch.randn((shape[0], 1, 1), generator=g)
        timestep = int(torch.randint(0, self.scheduler.config.num_train_timesteps, (1,), generator=g))
        eps = torch.randn(shape, generator=g)
        return noise, timestep, eps

    def fixed_timesteps(self, count: int, shape: tuple[int, ...]) -> torch.Tensor:
        """Validation's `count` fixed timesteps: the middles of `count` equal slices of the schedule."""
        n = self.scheduler.config.num_train_timesteps
        return torch.tensor([int((k + 0.5) * n / count) for k in range(count)])

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, timesteps)

    def model_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """What the UNet is given: the timesteps themselves."""
        return timesteps

    @staticmethod
    def output(prediction: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction as the loss reads it: itself."""
        return prediction

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the UNet must predict: the noise (epsilon models) or the velocity (v-prediction models)."""
        if self.name == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps)
        return noise

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio alpha_t² / sigma_t² of the given timesteps."""
        alphas_cumprod = self.scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
        return alphas_cumprod / (1.0 - alphas_cumprod)

    def per_sample_loss(
        self, prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, snr_gamma: float | None
    ) -> torch.Tensor:
        """Mean squared error per sample (float32), weighted by min(SNR, γ)/SNR (epsilon) or /(SNR + 1) (v) when
        `snr_gamma` is set (Hang et al., "Efficient Diffusion Training via Min-SNR Weighting Strategy")."""
        mse = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(
            dim=tuple(range(1, prediction.ndim))
        )
        if snr_gamma is None:
            return mse
        ratio = self.snr(timesteps)
        weight = torch.minimum(ratio, torch.full_like(ratio, snr_gamma))
        if self.name == "v_prediction":
            return mse * weight / (ratio + 1)
        return mse * weight / ratio
