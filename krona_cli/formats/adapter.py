"""The adapter's layers in memory, whatever file they came from, each computing its own update ΔW (peft-style): every
format is read into an `Adapter` (outline.py) of these layers and written from one; merging bakes
`Adapter.deltas()`.

Layers: `KronLayer(a, b)` (ΔW = s·(A ⊗ B), the `standard` layout), `DiffuseKronALayer(a, b)` (the official
DiffuseKronA layer's row permutation of it, layout `diffusekrona`) and `LoraLayer(down, up, multiplier)`
(ΔW = s·multiplier·up @ down, layout `lora`). One adapter holds layers of one layout. Module names are spelled as
krona's files spell them (text-encoder modules with `text_model.`, see native_outline.canonical_name). What their
shapes tell (factors, rank, parameters) is outline.py's `KronShape` and `LoraShape`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..kron import diffusekrona_delta, diffusekrona_rows, kron_delta, kron_svd, kron_svd_error
from .outline import LAYOUT_DIFFUSEKRONA, LAYOUT_LORA, LAYOUT_STANDARD, KronShape, LoraShape


@dataclass(eq=False)
class KronLayer(KronShape):
    """A Kronecker layer: A (a_out × a_in) and B (b_out × b_in), ΔW = s · (A ⊗ B) of shape (a_out·b_out, a_in·b_in)."""

    a: torch.Tensor
    b: torch.Tensor
    layout: ClassVar[str] = LAYOUT_STANDARD

    def delta(self, scale: float = 1.0) -> torch.Tensor:
        """ΔW in float32, `scale` included."""
        return kron_delta(self.a.float(), self.b.float(), scale)

    def low_rank(self, scale: float, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """up (d_out × k) and down (k × d_in) in `dtype` with up @ down the best rank-k approximation of ΔW (k: see
        kron.kron_svd), and (‖ΔW − up@down‖_F², ‖ΔW‖_F²) of the factors as rounded to `dtype`."""
        up, down = kron_svd(self.a, self.b, scale, rank)
        up, down = up.to(dtype), down.to(dtype)
        err2, norm2 = kron_svd_error(self.a, self.b, scale, up, down)
        return up, down, err2, norm2


@dataclass(eq=False)
class DiffuseKronALayer(KronLayer):
    """An official DiffuseKronA layer's factors (A = down.weightᵀ, B = up.weight): its ΔW is s·(A ⊗ B) with the rows
    regrouped (kron.diffusekrona_delta), which is not a plain Kronecker product."""

    layout: ClassVar[str] = LAYOUT_DIFFUSEKRONA

    def delta(self, scale: float = 1.0) -> torch.Tensor:
        return diffusekrona_delta(self.a.float(), self.b.float(), scale)

    def low_rank(self, scale: float, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        # the standard delta's SVD with up's rows regrouped: a row permutation changes neither error nor norm
        up, down, err2, norm2 = super().low_rank(scale, rank, dtype)
        return diffusekrona_rows(up, self.a.shape[0], self.b.shape[0]), down, err2, norm2


@dataclass(eq=False)
class LoraLayer(LoraShape):
    """A LoRA layer: down (r × d_in), up (d_out × r) and its multiplier alpha / r already resolved (1.0 without
    alpha), ΔW = s · multiplier · up @ down."""

    down: torch.Tensor
    up: torch.Tensor
    multiplier: float = 1.0
    layout: ClassVar[str] = LAYOUT_LORA

    def delta(self, scale: float = 1.0) -> torch.Tensor:
        """ΔW in float32, `scale` and the multiplier included."""
        return (self.up.float() @ self.down.float()) * (float(scale) * float(self.multiplier))


Layer = KronLayer | DiffuseKronALayer | LoraLayer
# The Kronecker layer of each layout a native file may record.
KRON_LAYOUTS: dict[str, type[KronLayer]] = {LAYOUT_STANDARD: KronLayer, LAYOUT_DIFFUSEKRONA: DiffuseKronALayer}
