"""Every Kronecker delta, in pure torch: the standard update s·(A ⊗ B), the row-permuted update of the official
DiffuseKronA layer, and the Kronecker SVD that turns either into a LoRA.

A is (a_out × a_in) and B (b_out × b_in); the update is (a_out·b_out × a_in·b_in). KronLinear, merging, the file
formats and the LoRA export all build their updates here.
"""

from __future__ import annotations

import torch

from ..errors import KronaError


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


def diffusekrona_rows(m: torch.Tensor, a_out: int, b_out: int) -> torch.Tensor:
    """The rows of `m` (in A ⊗ B's row order) in the official DiffuseKronA order: row q·b_out + p goes to p·a_out + q,
    B's row index outermost."""
    return m.reshape(a_out, b_out, -1).transpose(0, 1).reshape(a_out * b_out, -1)


def diffusekrona_delta(a: torch.Tensor, b: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The (d_out, d_in) update the official DiffuseKronA layer applies, from A (a_out × a_in, = its down.weightᵀ)
    and B (b_out × b_in, = its up.weight): ΔW[p·a_out + q, i·b_in + j] = scale · B[p, j] · A[q, i].

    The rows of s·(A ⊗ B) regrouped with B's row index outermost (`diffusekrona_rows`); every element is the same
    single product, so this equals the official layer's own arithmetic exactly.
    """
    return diffusekrona_rows(kron_delta(a, b, scale), a.shape[0], b.shape[0])


def kron_svd(a: torch.Tensor, b: torch.Tensor, scale: float, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """up (d_out × k), down (k × d_in), float64, with up @ down the best rank-k approximation of s·(A ⊗ B),
    k = min(rank, min(a_out, a_in)·min(b_out, b_in)).

    From A = Ua Sa Vaᵀ and B = Ub Sb Vbᵀ: A ⊗ B = (Ua ⊗ Ub)(Sa ⊗ Sb)(Va ⊗ Vb)ᵀ is an SVD (Kronecker products of
    orthonormal columns are orthonormal), so its singular values are the products σ_i(A)·σ_j(B) and the k largest,
    with their vectors kron(u_i, u_j) and kron(v_i, v_j), give the optimal truncation (Eckart–Young). The singular
    values are split evenly: up = U_k·√S_k, down = √S_k·V_kᵀ (the sign of s goes to down).
    """
    _check_matrices(a, b)
    ua, sa, vha = torch.linalg.svd(a.double(), full_matrices=False)
    ub, sb, vhb = torch.linalg.svd(b.double(), full_matrices=False)
    products = (sa[:, None] * sb[None, :]).reshape(-1)
    k = min(rank, products.numel())
    order = torch.sort(products, descending=True, stable=True).indices[:k]
    i, j = order // sb.numel(), order % sb.numel()
    root = torch.sqrt(products[order] * abs(scale))
    up = (ua[:, None, i] * ub[None, :, j]).reshape(a.shape[0] * b.shape[0], k) * root
    down = (vha[i, :, None] * vhb[j, None, :]).reshape(k, a.shape[1] * b.shape[1]) * root[:, None]
    if scale < 0:
        down = -down
    return up, down


def kron_svd_error(
    a: torch.Tensor, b: torch.Tensor, scale: float, up: torch.Tensor, down: torch.Tensor
) -> tuple[float, float]:
    """(‖s·A⊗B − up@down‖_F², ‖s·A⊗B‖_F²) in float64 without building A ⊗ B: ‖s·A⊗B‖² = s²‖A‖²‖B‖²,
    ⟨s·A⊗B, up@down⟩ = s·Σ_k up_kᵀ (A⊗B) down_k (by the reshape trick) and ‖up@down‖² = Σ (upᵀup) ∘ (down downᵀ).
    up/down are the factors as written (dtype rounding included), in A ⊗ B's row order."""
    a, b, up, down = a.double(), b.double(), up.double(), down.double()
    (a_out, a_in), (b_out, b_in) = a.shape, b.shape
    norm2 = scale**2 * float(a.pow(2).sum()) * float(b.pow(2).sum())
    k = down.shape[0]
    # Y[p, k, q] = ((A⊗B) down_k)[p·b_out + q] = (A X_k Bᵀ)[p, q] with X_k = down_k as a_in × b_in, in two 2-D
    # products (no batched ones: those run in parallel regions that stall on a busy CPU)
    t = (down.reshape(k * a_in, b_in) @ b.t()).reshape(k, a_in, b_out).transpose(0, 1).reshape(a_in, k * b_out)
    y = (a @ t).reshape(a_out, k, b_out)
    inner = scale * float((y * up.reshape(a_out, b_out, k).transpose(1, 2)).sum())
    approx2 = float(((up.t() @ up) * (down @ down.t())).sum())
    return max(norm2 - 2.0 * inner + approx2, 0.0), norm2
