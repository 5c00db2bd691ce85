"""The optimizers `krona train --optimizer` names, and the weights each one's run is judged by.

* `adamw` (torch) and `adamw8bit` (bitsandbytes, 8-bit state): --lr is the step size.
* `prodigy` (the `prodigyopt` package): estimates the step size itself as it goes (its `d`); --lr multiplies that
  estimate and defaults to 1.0. Bias correction and the warm-up safeguard on, as diffusers' DreamBooth scripts
  default to.
* `adamw-schedulefree` (the `schedulefree` package): AdamW without a decay schedule. It trains one sequence of
  weights and evaluates another, an average it keeps implicitly (`evaluation_weights`): samples, validation and the
  saved adapter use those. Its warm-up is its own (--lr-warmup-steps), so the lr schedule stays constant, and it
  averages already, so it takes no --ema.

Their state (tensors and the numbers in their parameter groups) is saved in checkpoints like AdamW's and restored
exactly, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..errors import KronaError

if TYPE_CHECKING:
    import torch

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adamw-schedulefree")
#: Bytes of optimizer state per trained weight (the memory estimate): Adam's two moments in fp32 (8-bit: 1 byte
#: each); Prodigy's two moments, its starting point and its sum s; schedule-free's z and second moment.
STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "prodigy": 16, "adamw-schedulefree": 8}
SCHEDULE_FREE = "adamw-schedulefree"


def default_lr(optimizer: str, adapter_type: str) -> float:
    """The learning rate when --lr is not given: Prodigy's multiplier 1.0; else 1e-4 for LoRA and 5e-4 for
    Kronecker adapters (the DiffuseKronA paper's)."""
    if optimizer == "prodigy":
        return 1.0
    return 1e-4 if adapter_type == "lora" else 5e-4


def check(optimizer: str, lr_scheduler: str, ema: bool, lr: float, text_encoder_lr: float | None) -> None:
    """KronaError for settings the optimizer cannot take: Prodigy with a text-encoder lr of its own (it estimates one
    step size for all), schedule-free with a decaying schedule or with --ema."""
    if optimizer == "prodigy" and text_encoder_lr not in (None, lr):
        raise KronaError(
            "--optimizer prodigy estimates one step size for every adapter (--lr multiplies it); "
            "leave out --text-encoder-lr"
        )
    if optimizer != SCHEDULE_FREE:
        return
    if lr_scheduler != "constant":
        raise KronaError(
            f"--optimizer {SCHEDULE_FREE} needs no learning-rate schedule (it warms up by --lr-warmup-steps itself); "
            f"use --lr-scheduler constant instead of {lr_scheduler}"
        )
    if ema:
        raise KronaError(f"--optimizer {SCHEDULE_FREE} averages the weights itself; leave out --ema")


def build(name: str, groups: list[dict], weight_decay: float, warmup_steps: int):
    """The optimizer over parameter groups (each with its own "lr"), in training mode."""
    if name == "adamw8bit":
        from ..pipeline.quantize import import_bitsandbytes

        return import_bitsandbytes("--optimizer adamw8bit").optim.AdamW8bit(groups, weight_decay=weight_decay)
    if name == "prodigy":
        from prodigyopt import Prodigy

        with contextlib.redirect_stdout(io.StringIO()):  # it prints a line about its weight decay
            return Prodigy(groups, weight_decay=weight_decay, use_bias_correction=True, safeguard_warmup=True)
    if name == SCHEDULE_FREE:
        from schedulefree import AdamWScheduleFree

        optimizer = AdamWScheduleFree(groups, weight_decay=weight_decay, warmup_steps=warmup_steps)
        optimizer.train()
        return optimizer
    import torch

    return torch.optim.AdamW(groups, weight_decay=weight_decay)


def evaluation_weights(optimizer, params: Mapping[str, torch.nn.Parameter]) -> dict[str, torch.Tensor] | None:
    """Schedule-free AdamW's evaluation weights by name (what its `eval()` would put in the params, computed beside
    them: x = y + (1 − 1/β₁)(z − y), so the training weights are never touched); None for the other optimizers,
    whose training weights are their evaluation weights. Weights it has not stepped yet are their own."""
    import torch
    from schedulefree import AdamWScheduleFree

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    if not isinstance(inner, AdamWScheduleFree):
        return None
    names = {id(p): name for name, p in params.items()}
    weights = {name: p.detach() for name, p in params.items()}
    for group in inner.param_groups:
        beta1 = group["betas"][0]
        for p in group["params"]:
            z = inner.state.get(p, {}).get("z")
            if z is not None:
                weights[names[id(p)]] = torch.lerp(p.detach(), z.to(p.device), 1 - 1 / beta1)
    return weights
