"""The Kronecker SVD that turns a Kronecker update into a LoRA, in numpy (`krona export --to lora` runs without
torch): the best rank-k factors of s·(A ⊗ B) from the SVDs of A and B, and the error of factors as written. Also the
row order of the official DiffuseKronA layer, which works on numpy arrays and torch tensors alike.

A is (a_out × a_in) and B (b_out × b_in); the update is (a_out·b_out × a_in·b_in).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import KronaError


def diffusekrona_rows(m: Any, a_out: int, b_out: int) -> Any:
    """The rows of `m` (a numpy array or torch tensor, in A ⊗ B's row order) in the official DiffuseKronA order: row
    q·b_out + p goes to p·a_out + q, B's row index outermost."""
    return m.reshape(a_out, b_out, -1).swapaxes(0, 1).reshape(a_out * b_out, -1)


def _check_matrices(a: np.ndarray, b: np.ndarray) -> None:
    if a.ndim != 2 or b.ndim != 2:
        raise KronaError(f"Kronecker factors must be matrices; got A of shape {tuple(a.shape)}, B {tuple(b.shape)}")


def kron_svd(a: np.ndarray, b: np.ndarray, scale: float, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """up (d_out × k), down (k × d_in), float64, with up @ down the best rank-k approximation of s·(A ⊗ B),
    k = min(rank, min(a_out, a_in)·min(b_out, b_in)).

    From A = Ua Sa Vaᵀ and B = Ub Sb Vbᵀ: A ⊗ B = (Ua ⊗ Ub)(Sa ⊗ Sb)(Va ⊗ Vb)ᵀ is an SVD (Kronecker products of
    orthonormal columns are orthonormal), so its singular values are the products σ_i(A)·σ_j(B) and the k largest,
    with their vectors kron(u_i, u_j) and kron(v_i, v_j), give the optimal truncation (Eckart–Young); equal products
    are taken in the order of (i, j). The singular values are split evenly: up = U_k·√S_k, down = √S_k·V_kᵀ (the sign
    of s goes to down).
    """
    _check_matrices(a, b)
    ua, sa, vha = np.linalg.svd(a.astype(np.float64), full_matrices=False)
    ub, sb, vhb = np.linalg.svd(b.astype(np.float64), full_matrices=False)
    products = (sa[:, None] * sb[None, :]).reshape(-1)
    k = min(rank, products.size)
    order = np.argsort(-products, kind="stable")[:k]
    i, j = order // sb.size, order % sb.size
    root = np.sqrt(products[order] * abs(scale))
    up = (ua[:, None, i] * ub[None, :, j]).reshape(a.shape[0] * b.shape[0], k) * root
    down = (vha[i, :, None] * vhb[j, None, :]).reshape(k, a.shape[1] * b.shape[1]) * root[:, None]
    return up, (-down if scale < 0 else down)


def kron_svd_error(a: np.ndarray, b: np.ndarray, scale: float, up: np.ndarray, down: np.ndarray) -> tuple[float, float]:
    """(‖s·A⊗B − up@down‖_F², ‖s·A⊗B‖_F²) in float64 without building A ⊗ B: ‖s·A⊗B‖² = s²‖A‖²‖B‖²,
    ⟨s·A⊗B, up@down⟩ = s·Σ_k up_kᵀ (A⊗B) down_k (by the reshape trick) and ‖up@down‖² = Σ (upᵀup) ∘ (down downᵀ).
    up/down are the factors as written (dtype rounding included), in A ⊗ B's row order."""
    a, b, up, down = (x.astype(np.float64) for x in (a, b, up, down))
    (a_out, a_in), (b_out, b_in) = a.shape, b.shape
    norm2 = scale**2 * float(np.square(a).sum()) * float(np.square(b).sum())
    k = down.shape[0]
    # Y[p, k, q] = ((A⊗B) down_k)[p·b_out + q] = (A X_k Bᵀ)[p, q] with X_k = down_k as a_in × b_in, in 2-D products
    t = (down.reshape(k * a_in, b_in) @ b.T).reshape(k, a_in, b_out).swapaxes(0, 1).reshape(a_in, k * b_out)
    y = (a @ t).reshape(a_out, k, b_out)
    inner = scale * float((y * up.reshape(a_out, b_out, k).swapaxes(1, 2)).sum())
    approx2 = float(((up.T @ up) * (down @ down.T)).sum())
    return max(norm2 - 2.0 * inner + approx2, 0.0), norm2
