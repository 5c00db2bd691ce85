"""Exponential moving average of the trainable (adapter) weights, for sampling and saving smoother weights."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import KronaError

COUNT_KEY = "__count__"


class EMA:
    """fp32 shadow copies of `params` (on their devices) that follow them: shadow = d·shadow + (1 − d)·param.

    With `warmup`, d = min(decay, (1 + n) / (10 + n)) at the n-th update, so early shadows are not stuck at the init.
    """

    def __init__(self, params: Mapping[str, torch.nn.Parameter], decay: float = 0.999, warmup: bool = True):
        if not 0 < decay < 1:
            raise KronaError(f"EMA decay {decay} is outside (0, 1); use a value such as 0.999")
        self.params = dict(params)
        self.decay = decay
        self.warmup = warmup
        self.count = 0
        self._shadow = {name: p.detach().to(torch.float32, copy=True) for name, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        """Move the shadows one step towards the current weights (call after each optimizer step)."""
        self.count += 1
        d = min(self.decay, (1 + self.count) / (10 + self.count)) if self.warmup else self.decay
        if self._shadow:  # the fused op refuses empty lists
            torch._foreach_lerp_(list(self._shadow.values()), [p.float() for p in self.params.values()], 1 - d)

    def shadow(self) -> dict[str, torch.Tensor]:
        """The EMA weights by name (the live fp32 tensors)."""
        return dict(self._shadow)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadows plus the update count as a 0-dim int64 tensor under `__count__` (safetensors-friendly)."""
        return {**self._shadow, COUNT_KEY: torch.tensor(self.count, dtype=torch.int64)}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Take over a `state_dict()` of an EMA over the same names and shapes."""
        state = dict(state)
        count = state.pop(COUNT_KEY, None)
        wrong = sorted(set(state) ^ set(self._shadow))
        wrong += [n for n in self._shadow if n in state and state[n].shape != self._shadow[n].shape]
        if count is None or wrong:
            problem = f"{len(wrong)} names or shapes differ, e.g. '{wrong[0]}'" if wrong else f"no '{COUNT_KEY}'"
            raise KronaError(
                f"the saved EMA weights do not match this adapter ({problem}); resume with the adapter settings the "
                "checkpoint was made with, or start a new run"
            )
        with torch.no_grad():
            for name, tensor in state.items():
                self._shadow[name].copy_(tensor)
        self.count = int(count)
