"""The adapter's layers in memory, whatever file they came from, each computing its own update ΔW (peft-style): every
format is read into an `Adapter` (outline.py) of these layers and written from one; merging bakes
`Adapter.deltas()`.

Layers: `KronLayer(a, b)` (ΔW = s·(A ⊗ B), the `standard` layout), `DiffuseKronALayer(a, b)` (the official
DiffuseKronA layer's row permutation of it, layout `diffusekrona`) and `LoraLayer(down, up, multiplier)`
(ΔW = s·multiplier·up @ down, layout `lora`). One adapter holds layers of one layout. Module names are spelled as
krona's files spell them (text-encoder modules with `text_model.`, see native_outline.canonical_name). What their
shapes tell (factors, rank, parameters) is outline.py's `KronShape` and `LoraShape`.

The readers fill layers with float32 numpy arrays and hand them to torch (`torch_tensor`) unless asked for numpy, which
is all writing krona's own and LoKr files needs (`krona export` runs without torch); computing an update needs torch
tensors. This module imports torch only when an update is computed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from .outline import LAYOUT_DIFFUSEKRONA, LAYOUT_LORA, LAYOUT_STANDARD, KronShape, LoraShape

if TYPE_CHECKING:
    import torch


def torch_tensor(array: np.ndarray) -> torch.Tensor:
    """A numpy array as a torch tensor sharing its memory (the readers' arrays are fresh, writable copies)."""
    import torch

    return torch.from_numpy(array)


# What a reader hands each float32 array of a layer to: `torch_tensor`, or keep it (`numpy_array`).
Make = Callable[[np.ndarray], Any]


def numpy_array(array: np.ndarray) -> np.ndarray:
    """The array itself: a reader's layers stay numpy (for writing files without torch)."""
    return array


def row_ranges(array: np.ndarray, rows: tuple[tuple[int, int], ...] | None, block: int = 1) -> np.ndarray:
    """The rows of `array` that make a part of a fused layer (an outline's `rows`, ranges of the fused update's rows,
    each `block` of them one row of `array`: w2's rows for a LoKr's w1, 1 for a LoRA's up), stacked; `array` itself
    for a whole layer (None)."""
    if rows is None:
        return array
    return np.concatenate([array[start // block : stop // block] for start, stop in rows], axis=0)


@dataclass(eq=False)
class KronLayer(KronShape):
    """A Kronecker layer: A (a_out × a_in) and B (b_out × b_in), ΔW = s · (A ⊗ B) of shape (a_out·b_out, a_in·b_in)."""

    a: torch.Tensor | np.ndarray
    b: torch.Tensor | np.ndarray
    layout: ClassVar[str] = LAYOUT_STANDARD

    def delta(self, scale: float = 1.0) -> torch.Tensor:
        """ΔW in float32, `scale` included."""
        from ..kron import kron_delta

        return kron_delta(self.a.float(), self.b.float(), scale)

    def low_rank(self, scale: float, rank: int, dtype: str) -> tuple[np.ndarray, np.ndarray, float, float]:
        """up (d_out × k) and down (k × d_in) with up @ down the best rank-k approximation of ΔW (k: see
        kron.kron_svd), as float32 numpy arrays holding the numbers a file in `dtype` (fp32, fp16 or bf16) stores, and
        (‖ΔW − up@down‖_F², ‖ΔW‖_F²) of those factors. numpy only: a LoRA is exported without torch."""
        from ..kron.low_rank import kron_svd, kron_svd_error
        from .safetensors_file import float32, rounded

        a, b = float32(self.a), float32(self.b)
        up, down = (rounded(m, dtype) for m in kron_svd(a, b, scale, rank))
        err2, norm2 = kron_svd_error(a, b, scale, up, down)
        return up, down, err2, norm2


@dataclass(eq=False)
class DiffuseKronALayer(KronLayer):
    """An official DiffuseKronA layer's factors (A = down.weightᵀ, B = up.weight): its ΔW is s·(A ⊗ B) with the rows
    regrouped (kron.diffusekrona_delta), which is not a plain Kronecker product."""

    layout: ClassVar[str] = LAYOUT_DIFFUSEKRONA

    def delta(self, scale: float = 1.0) -> torch.Tensor:
        from ..kron import diffusekrona_delta

        return diffusekrona_delta(self.a.float(), self.b.float(), scale)

    def low_rank(self, scale: float, rank: int, dtype: str) -> tuple[np.ndarray, np.ndarray, float, float]:
        # the standard delta's SVD with up's rows regrouped: a row permutation changes neither error nor norm
        from ..kron.low_rank import diffusekrona_rows

        up, down, err2, norm2 = super().low_rank(scale, rank, dtype)
        return diffusekrona_rows(up, self.a.shape[0], self.b.shape[0]), down, err2, norm2


@dataclass(eq=False)
class LoraLayer(LoraShape):
    """A LoRA layer: down (r × d_in), up (d_out × r) and its multiplier alpha / r already resolved (1.0 without
    alpha), ΔW = s · multiplier · up @ down."""

    down: torch.Tensor | np.ndarray
    up: torch.Tensor | np.ndarray
    multiplier: float = 1.0
    layout: ClassVar[str] = LAYOUT_LORA

    def delta(self, scale: float = 1.0) -> torch.Tensor:
        """ΔW in float32, `scale` and the multiplier included."""
        return (self.up.float() @ self.down.float()) * (float(scale) * float(self.multiplier))


Layer = KronLayer | DiffuseKronALayer | LoraLayer
# The Kronecker layer of each layout a native file may record.
KRON_LAYOUTS: dict[str, type[KronLayer]] = {LAYOUT_STANDARD: KronLayer, LAYOUT_DIFFUSEKRONA: DiffuseKronALayer}
