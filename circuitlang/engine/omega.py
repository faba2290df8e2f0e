"""The augmented QK form Omega of every head (eq. 2) and its orthogonal slices (eq. 5).

Omega = A B^T with A = [W_Q; b_Q^T] and B = [W_K; b_K^T], both (d+1) x r, so rank(Omega) <= r. Its SVD comes
from thin QR factors A = Q_a R_a, B = Q_b R_b and the SVD of the r x r core R_a R_b^T = U' S V'^T:
Omega = (Q_a U') S (Q_b V')^T. This costs O(d r^2) per head instead of O(d^3), for all heads at once.

Rotary models (beyond the paper, which covers GPT-2): the score of head a on (i, j) is
x~_i^T A G_q R(i - j)^T G_k B^T x~_j divided by per-token q/k norm scales, with G the q/k norm gains and
R(m) the rotation by m positions. Omega then depends on the offset m = i - j: only the core changes,
R_a R(m)^T R_b^T, so each head keeps one pair of bases Q_a, Q_b and one small core SVD per offset.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

from circuitlang.models.geometry import AttentionGeometry


@dataclass(frozen=True)
class OmegaSlices:
    """SVD of Omega for the heads of one layer (or of all layers, in the leading dims), per offset.

    Omega[h, m] = (Q_a[h] U[h, m]) diag(S[h, m]) (Q_b[h] V[h, m])^T.
    Q_a, Q_b: [..., H, d+1, r], orthonormal columns, the last row the homogeneous coordinate (appendix,
    "Handling Homogeneous Coordinates"); U, V: [..., H, M, r, r] orthogonal cores; S: [..., H, M, r],
    descending. M = 1 (offset-free) for models without rotary positions.
    pairs [K]: set for the cores of chosen (head, offset) pairs only (`pair_key`, ascending); U, V are then
    [1, K, r, r] and S [1, K, r], one core per pair (a long prompt's firings use few of its H x n cores).
    """

    Q_a: Tensor
    Q_b: Tensor
    U: Tensor
    S: Tensor
    V: Tensor
    pairs: Tensor | None = None

    def index(self, heads: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
        """Where the cores of (heads, offsets) [E] sit in U, S, V's head and offset dims."""
        if self.pairs is None:
            return heads, offsets if self.offsets > 1 else torch.zeros_like(offsets)
        want = pair_key(heads, offsets)
        at = torch.searchsorted(self.pairs, want).clamp(max=len(self.pairs) - 1)
        if not torch.equal(self.pairs[at], want):
            raise ValueError("these slices hold no core for some of the (head, offset) pairs asked for")
        return torch.zeros_like(at), at

    @property
    def rank(self) -> int:
        return self.S.shape[-1]

    @property
    def offsets(self) -> int:
        return self.S.shape[-2]

    def left(self) -> Tensor:
        """The singular vectors u_k in model coordinates: [..., H, M, d+1, r]."""
        return self.Q_a.unsqueeze(-3) @ self.U

    def right(self) -> Tensor:
        """The singular vectors v_k in model coordinates: [..., H, M, d+1, r]."""
        return self.Q_b.unsqueeze(-3) @ self.V


def pair_key(heads: Tensor, offsets: Tensor) -> Tensor:
    """One int64 per (head, offset), ordered by head then offset."""
    return heads.long() << 32 | offsets.long()


def augment(W: Tensor, b: Tensor) -> Tensor:
    """[..., d, r] weights and [..., r] bias -> [..., d+1, r], the bias as the last row (eq. 2)."""
    return torch.cat([W, b.unsqueeze(-2)], dim=-2)


def omega_matrix(W_Q: Tensor, b_Q: Tensor, W_K: Tensor, b_K: Tensor) -> Tensor:
    """The dense (d+1) x (d+1) Omega of eq. (2) for every head; for tests and small models only."""
    return augment(W_Q, b_Q) @ augment(W_K, b_K).transpose(-1, -2)


@contextlib.contextmanager
def _one_thread():
    """LAPACK on one thread: batches of small QRs and SVDs gain little from more, and on a busy machine
    (a shared node, a CI runner) a second OpenMP thread made them 80x slower here (90 s vs 1.1 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def omega_slices(W_Q: Tensor, b_Q: Tensor, W_K: Tensor, b_K: Tensor, rotations: Tensor | None = None) -> OmegaSlices:
    """Orthogonal slices of Omega for heads batched in the leading dims of W_Q [..., d, r], b_Q [..., r].

    W_K, b_K are the key weights each query head reads (its group's, for grouped KV heads), with any
    q/k norm gain already multiplied in. `rotations` [M, r, r], R(m)^T for offsets m = 0..M-1 (rotary
    models), applied between the query and key sides. Computed in float64 so that the slice terms sum
    to the model's score to well below 1e-4.
    """
    Q_a, R_a, Q_b, R_b = omega_bases(W_Q, b_Q, W_K, b_K)
    with _one_thread():
        R_a, R_b = R_a.unsqueeze(-3), R_b.unsqueeze(-3)  # [..., 1, r, r]: broadcast over offsets
        core = R_a @ R_b.transpose(-1, -2) if rotations is None else R_a @ rotations.double() @ R_b.transpose(-1, -2)
        U, S, Vh = torch.linalg.svd(core)
    return OmegaSlices(Q_a=Q_a, Q_b=Q_b, U=U, S=S, V=Vh.transpose(-1, -2))


def omega_bases(W_Q: Tensor, b_Q: Tensor, W_K: Tensor, b_K: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Thin QR factors Q_a, R_a, Q_b, R_b of A = [W_Q; b_Q^T] and B = [W_K; b_K^T] (float64), heads batched."""
    with _one_thread():
        Q_a, R_a = torch.linalg.qr(augment(W_Q, b_Q).double())
        Q_b, R_b = torch.linalg.qr(augment(W_K, b_K).double())
    return Q_a, R_a, Q_b, R_b


def pair_cores(R_a: Tensor, R_b: Tensor, rotations: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """U [K, r, r], S [K, r], V [K, r, r]: the SVDs of the cores R_a R(m)^T R_b^T of K (head, offset) pairs,
    given each pair's head factors R_a, R_b [K, r, r] and rotation R(m)^T [K, r, r] (the same products
    and SVDs as `omega_slices`, for the pairs alone)."""
    with _one_thread():
        U, S, Vh = torch.linalg.svd(R_a.double() @ rotations.double() @ R_b.double().transpose(-1, -2))
    return U, S, Vh.transpose(-1, -2)


def rotation_matrices(cos: Tensor, sin: Tensor, d_head: int, interleaved: bool = False) -> Tensor:
    """[M, r, r]: R(m)^T for m = 0..M-1 from the model's own rotary tables cos, sin [M, rotary_dim].

    R(m) v = v * cos_m + rot(v) * sin_m on the first rotary_dim dims (the rest pass through, partial
    rotary), with rot = rotate_half (dims t and t + rotary_dim/2 form a pair) or, for
    interleaved tables, rotate-every-two (dims 2t and 2t+1). Since R(i)^T R(j) = R(i - j)^T, the
    score depends on m = i - j only.
    """
    M, rd = cos.shape
    eye = torch.eye(d_head, dtype=cos.dtype)
    half = rd // 2
    if interleaved:  # rotate-every-two of each basis row: (v0, v1, ...) -> (-v1, v0, -v3, v2, ...)
        rotated = torch.stack([-eye[:, 1:rd:2], eye[:, 0:rd:2]], dim=-1).flatten(-2)
    else:
        rotated = torch.cat([-eye[:, half:rd], eye[:, :half]], dim=-1)  # rotate_half of each basis row
    R = eye.expand(M, d_head, d_head).clone()  # R[m] maps row vectors: v R[m] = R(m) v
    R[:, :, :rd] = eye[:, :rd] * cos[:, None, :] + rotated * sin[:, None, :]
    return R


def layer_slices(geometry: AttentionGeometry, layer: int, cos: Tensor | None = None, sin: Tensor | None = None) -> OmegaSlices:
    """Omega's slices for every head of `layer`; for rotary models one core per offset 0..len(cos)-1."""
    W_Q, b_Q, W_K, b_K = layer_qk(geometry, layer)
    rotations = rotation_matrices(cos, sin, W_Q.shape[-1], geometry.interleaved) if geometry.rotary else None
    return omega_slices(W_Q, b_Q, W_K, b_K, rotations)


def layer_qk(geometry: AttentionGeometry, layer: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """W_Q, b_Q, W_K, b_K of every head of `layer` with the q/k norm gains multiplied in."""
    g = geometry
    W_Q = g.W_Q[layer] * g.q_gain[layer, :, None]
    b_Q = g.b_Q[layer] * g.q_gain[layer]
    W_K = g.W_K[layer] * g.k_gain[layer, :, None]
    b_K = g.b_K[layer] * g.k_gain[layer]
    return W_Q, b_Q, W_K, b_K
