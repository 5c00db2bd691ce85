"""Every Kronecker delta, in pure torch: the standard update s·(A ⊗ B) and the row-permuted update of the official
DiffuseKronA layer (its row order: low_rank.py, which also holds the Kronecker SVD that turns either into a LoRA).

A is (a_out × a_in) and B (b_out × b_in); the update is (a_out·b_out × a_in·b_in). KronLinear, merging and the file
formats build their updates here.
"""

from __future__ import annotations

import torch

from ..errors import KronaError
from .low_rank import diffusekrona_rows


def _check_matrices(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2:
        raise KronaError(f"Kronecker factors must be matrices; got A of shape {tuple(a.shape)}, B {tuple(b.shape)}")


def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A ⊗ B (torch.kron): element [q·b_out + p, i·b_in + j] is A[q, i] · B[p, j]. Differentiable.

    The factors go in contiguous (a no-op for contiguous ones): torch 2.13's kron raises a view error for a transposed
    one, such as an official file's A = down.weightᵀ."""
    return torch.kron(a.contiguous(), b.contiguous())


def kron_delta(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The standard update s · (A ⊗ B), in the factors' dtype."""
    _check_matrices(a, b)
    return scale * kron(a, b)


def diffusekrona_delta(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The (d_out, d_in) update the official DiffuseKronA layer applies, from A (a_out × a_in, = its down.weightᵀ)
    and B (b_out × b_in, = its up.weight): ΔW[p·a_out + q, i·b_in + j] = scale · B[p, j] · A[q, i].

    The rows of s·(A ⊗ B) regrouped with B's row index outermost (`diffusekrona_rows`); every element is the same
    single product, so this equals the official layer's own arithmetic exactly.
    """
    return diffusekrona_rows(kron_delta(a, b, scale), a.shape[0], b.shape[0])
