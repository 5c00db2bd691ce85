"""The rectified-flow training objective of FLUX.1 and the other flow-matching families: how a sample's noise level is
drawn, how the noisy input, the target and the loss are built, and FLUX's 2x2 latent packing.

It follows diffusers' training helpers and its DreamBooth FLUX script: x_σ = (1 − σ)·x0 + σ·ε, target ε − x0, σ taken
from the FlowMatchEulerDiscreteScheduler's discrete table at index ⌊u·N⌋ with u drawn by the weighting scheme's
density, and the loss weighted by the same scheme (Esser et al. 2024, https://arxiv.org/abs/2403.03206). As with
`DDPM.draw` (ddpm.py), every per-sample random number comes from that sample's own generator, so a draw does
not depend on the batch, the process or a resume.

The time shift. The scheduler bakes its static `shift` into its table at construction, but only when
`use_dynamic_shifting` is off (e.g. shift 3, or FLUX.1-schnell's shift 1, a no-op); krona's table is the same one, so
the static shift is never applied twice. With `use_dynamic_shifting` on (FLUX.1-dev) the table is left unshifted and the
pipeline shifts at sampling time by mu = calculate_shift(image_seq_len), exponentially. diffusers' DreamBooth script
indexes that table and nothing more, so for dev it trains on UNSHIFTED sigmas (uniform in t for "none"). krona, by
default (`shift_by_resolution=True`), applies the resolution-dependent shift the sampler uses, image_seq_len being
(H/2)·(W/2) of the latent, as SimpleTuner's flux_schedule_auto_shift does; `shift_by_resolution=False` reproduces the
script exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import torch

from ..errors import KronaError
from ..rng import generator

WEIGHTINGS = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")
TIME_SHIFTS = ("exponential", "linear")
# FLUX's transformer multiplies the timestep it is given by 1000; the script passes timesteps / 1000.
_TRANSFORMER_TIME_SCALE = 1000

_CONFIG_DEFAULTS = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "time_shift_type": "exponential",
}


@dataclass(frozen=True)
class FlowMatch:
    """A flow-matching objective: the scheduler's sigma table and time shift, plus a timestep weighting scheme.

    Weighting schemes (diffusers' names): `none` (uniform u, unit loss weight), `logit_normal` (u = sigmoid(N(m, s))),
    `mode` (u warped by `mode_scale`), `sigma_sqrt` (uniform u, weight σ⁻²), `cosmap` (uniform u, weight
    2 / (π(1 − 2σ + 2σ²))).
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"
    weighting: str = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift_by_resolution: bool = True
    time_divisor: int = _TRANSFORMER_TIME_SCALE  # the transformer gets the scheduler's timestep σ·N over this
    precondition: bool = False  # x0 preconditioning: the output −σ·v̂ + x_σ against the target x0

    def __post_init__(self):
        if self.weighting not in WEIGHTINGS:
            raise KronaError(f"unknown weighting scheme '{self.weighting}'; use one of {', '.join(WEIGHTINGS)}")
        if self.time_shift_type not in TIME_SHIFTS:
            raise KronaError(f"unknown time_shift_type '{self.time_shift_type}'; use one of {', '.join(TIME_SHIFTS)}")

    @property
    def name(self) -> str:
        """What the model predicts, in the run's summary and card."""
        return "flow_matching"

    @classmethod
    def from_scheduler_config(
        cls,
        config: Mapping,
        weighting: str = "none",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        shift_by_resolution: bool = True,
        time_divisor: int = _TRANSFORMER_TIME_SCALE,
        precondition: bool = False,
    ) -> FlowMatch:
        """The objective of a FlowMatchEulerDiscreteScheduler config (a scheduler_config.json dict; missing or null
        keys take the scheduler's defaults) with the given weighting scheme."""
        values = {key: config.get(key) for key in _CONFIG_DEFAULTS}
        values = {key: _CONFIG_DEFAULTS[key] if value is None else value for key, value in values.items()}
        return cls(
            **values,
            weighting=weighting,
            logit_mean=logit_mean,
            logit_std=logit_std,
            mode_scale=mode_scale,
            shift_by_resolution=shift_by_resolution,
            time_divisor=time_divisor,
            precondition=precondition,
        )

    @cached_property
    def sigma_table(self) -> torch.Tensor:
        """The scheduler's training sigmas (float32, N of them, from 1 down to 1/N), with its static shift applied
        exactly when the scheduler applies it: only if dynamic shifting is off."""
        n = self.num_train_timesteps
        sigmas = torch.arange(n, 0, -1, dtype=torch.float32) / n
        if not self.use_dynamic_shifting:
            sigmas = self.shift * sigmas / (1 + (self.shift - 1) * sigmas)
        return sigmas

    def mu(self, shape: tuple[int, ...]) -> float:
        """The resolution-dependent shift for a latent of `shape` (…, H, W): linear in the packed sequence length
        (H/2)·(W/2), from `base_shift` at `base_image_seq_len` to `max_shift` at `max_image_seq_len`."""
        seq_len = (shape[-2] // 2) * (shape[-1] // 2)
        slope = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        intercept = self.base_shift - slope * self.base_image_seq_len
        return seq_len * slope + intercept

    def shifted(self, sigmas: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """`sigmas` after the resolution-dependent shift for a latent of `shape`, or unchanged when the scheduler
        does not shift dynamically or `shift_by_resolution` is off."""
        if not (self.use_dynamic_shifting and self.shift_by_resolution):
            return sigmas
        mu = self.mu(shape)
        scale = math.exp(mu) if self.time_shift_type == "exponential" else mu
        return scale / (scale + (1 / sigmas - 1))

    def sigmas_for(self, u: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """The float32 sigmas of draws `u` in [0, 1): table entry ⌊u·N⌋ (clamped into the table, which only u = 1
        from `mode` or a saturated sigmoid can leave), then the shift for a latent of `shape`."""
        indices = (u * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        return self.shifted(self.sigma_table[indices], shape)

    def _density(self, g: torch.Generator) -> torch.Tensor:
        """One u ∈ [0, 1) by the weighting scheme's density, drawn from `g`."""
        if self.weighting == "logit_normal":
            return torch.sigmoid(torch.normal(mean=self.logit_mean, std=self.logit_std, size=(1,), generator=g))
        u = torch.rand((1,), generator=g)
        if self.weighting == "mode":
            u = 1 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        return u

    def draw(
        self, shape: tuple[int, ...], noise_offset: float, *seed_parts: int | str
    ) -> tuple[torch.Tensor, float, torch.Tensor]:
        """(noise, sigma, latent draw) for one sample of latent `shape` (C, H, W) from its own generator: the same
        parts give the same draws in any process, batch or resumed run. The order of draws is noise, the noise
        offset's per-channel normal (when set), u, then the standard normal that samples the VAE posterior."""
        g = generator(*seed_parts)
        noise = torch.randn(shape, generator=g)
        if noise_offset:
            noise = noise + noise_offset * torch.randn((shape[0], 1, 1), generator=g)
        sigma = float(self.sigmas_for(self._density(g), shape)[0])
        eps = torch.randn(shape, generator=g)
        return noise, sigma, eps

    def fixed_timesteps(self, count: int, shape: tuple[int, ...]) -> torch.Tensor:
        """Validation's `count` fixed noise levels for a latent of `shape`: u at the middles of `count` equal slices of
        [0, 1), through the same table lookup and shift as `draw` (so from high noise to low)."""
        u = (torch.arange(count, dtype=torch.float64) + 0.5) / count
        return self.sigmas_for(u, shape)

    @staticmethod
    def noisy(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """The model input (1 − σ)·x0 + σ·ε, with `sigmas` of shape (B,) cast to the latents' dtype."""
        s = torch.as_tensor(sigmas, dtype=latents.dtype, device=latents.device).reshape(-1, *[1] * (latents.ndim - 1))
        return (1.0 - s) * latents + s * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """What the loss compares the output with: the velocity ε − x0 (the same at every σ), or x0 itself when the
        output is preconditioned."""
        return latents if self.precondition else noise - latents

    def output(self, prediction: torch.Tensor, noisy: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """The model's prediction as the loss reads it: the velocity itself, or preconditioned (diffusers' scripts'
        `--precondition_outputs`) the x0 it implies, −σ·v̂ + x_σ; the loss is then σ² times the velocity's."""
        if not self.precondition:
            return prediction
        s = torch.as_tensor(sigmas, dtype=noisy.dtype, device=noisy.device).reshape(-1, *[1] * (noisy.ndim - 1))
        return prediction * (-s) + noisy

    def model_timesteps(self, sigmas: torch.Tensor) -> torch.Tensor:
        """The float32 timesteps the transformer receives: the scheduler's timestep σ·N divided by `time_divisor`:
        1000 for FLUX.1, as the DreamBooth script passes them (its transformer multiplies by 1000 again), 1 for the
        families whose transformers take the scheduler's own (or a function of it, in their `denoise`)."""
        timesteps = torch.as_tensor(sigmas, dtype=torch.float32) * self.num_train_timesteps
        return timesteps / self.time_divisor

    def loss_weights(self, sigmas: torch.Tensor) -> torch.Tensor:
        """The float32 per-sample loss weights of the weighting scheme (1 for the schemes that shape the density)."""
        s = torch.as_tensor(sigmas, dtype=torch.float32)
        if self.weighting == "sigma_sqrt":
            return s**-2.0
        if self.weighting == "cosmap":
            return 2 / (math.pi * (1 - 2 * s + 2 * s**2))
        return torch.ones_like(s)

    def per_sample_loss(
        self, prediction: torch.Tensor, target: torch.Tensor, sigmas: torch.Tensor, snr_gamma: float | None = None
    ) -> torch.Tensor:
        """Per-sample float32 mean of weight·(prediction − target)²; its mean over the batch is the script's loss."""
        if snr_gamma is not None:
            raise KronaError(
                "--snr-gamma (min-SNR weighting) is for DDPM models; flow-matching models weight by --weighting-scheme"
            )
        weights = self.loss_weights(sigmas).to(prediction.device).reshape(-1, *[1] * (prediction.ndim - 1))
        squared = weights * (prediction.float() - target.float()) ** 2
        return squared.reshape(squared.shape[0], -1).mean(dim=1)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """FLUX's tokens of latents (B, C, H, W): each 2x2 patch becomes one token of C·4 features, in row-major patch
    order, giving (B, H/2·W/2, C·4)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise KronaError(f"FLUX latents need an even height and width, not {h}x{w}")
    patches = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack_latents`: tokens (B, H/2·W/2, C·4) back to latents (B, C, height, width), where height and
    width are the latent's (not the image's) size."""
    b, _, d = tokens.shape
    patches = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, d // 4, height, width)


def image_ids(height: int, width: int) -> torch.Tensor:
    """FLUX's float32 position ids of the tokens of a latent `height` x `width`: (H/2·W/2, 3) rows (0, row, column)
    of each 2x2 patch, in `pack_latents` order."""
    rows, cols = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
