"""The augmented QK form Omega of every head (eq. 2) and its orthogonal slices (eq. 5).

Omega = A B^T with A = [W_Q; b_Q^T] and B = [W_K; b_K^T], both (d+1) x r, so rank(Omega) <= r. Its SVD comes
from thin QR factors A = Q_a R_a, B = Q_b R_b and the SVD of the r x r core R_a R_b^T = U' S V'^T:
Omega = (Q_a U') S (Q_b V')^T. This costs O(d r^2) per head instead of O(d^3), for all heads at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class OmegaSlices:
    """Rank-r SVD of Omega for every head: Omega[l, h] = U[l, h] diag(S[l, h]) V[l, h]^T.

    U, V: [layers, heads, d+1, r], orthonormal columns; S: [layers, heads, r], descending. The last row of
    U and V is the homogeneous coordinate (paper, appendix "Handling Homogeneous Coordinates").
    """

    U: Tensor
    S: Tensor
    V: Tensor

    @property
    def rank(self) -> int:
        return self.S.shape[-1]

    def to(self, dtype: torch.dtype) -> "OmegaSlices":
        return OmegaSlices(self.U.to(dtype), self.S.to(dtype), self.V.to(dtype))


def augment(W: Tensor, b: Tensor) -> Tensor:
    """[..., d, r] weights and [..., r] bias -> [..., d+1, r], the bias as the last row (eq. 2)."""
    return torch.cat([W, b.unsqueeze(-2)], dim=-2)


def omega_matrix(W_Q: Tensor, b_Q: Tensor, W_K: Tensor, b_K: Tensor) -> Tensor:
    """The dense (d+1) x (d+1) Omega of eq. (2) for every head; for tests and small models only."""
    return augment(W_Q, b_Q) @ augment(W_K, b_K).transpose(-1, -2)


def omega_slices(W_Q: Tensor, b_Q: Tensor, W_K: Tensor, b_K: Tensor) -> OmegaSlices:
    """Orthogonal slices of Omega for heads batched in the leading dims of W_Q [..., d, r], b_Q [..., r].

    Computed in float64 so that the slice terms sum to the model's score to well below 1e-4.
    """
    A = augment(W_Q, b_Q).double()
    B = augment(W_K, b_K).double()
    Q_a, R_a = torch.linalg.qr(A)
    Q_b, R_b = torch.linalg.qr(B)
    U_core, S, Vh_core = torch.linalg.svd(R_a @ R_b.transpose(-1, -2))
    return OmegaSlices(U=Q_a @ U_core, S=S, V=Q_b @ Vh_core.transpose(-1, -2))
