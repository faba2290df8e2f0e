"""Sparse attention decomposition (sections 4.1-4.2): pure functions on tensors batched over events.

An event e is one firing (prompt p, head a of layer l, dest i, src j). Shapes name E events, r slices,
d the model width, P prompts, H heads, n positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from circuitlang.lang.plan import SliceRule


def firing_mask(pattern: Tensor, scores: Tensor, lengths: Tensor, threshold: float) -> Tensor:
    """Bool [..., P, H, n, n]: the head fires from dest i to src j (section 4.3).

    Attention weight above `threshold`, src != 0 (the first token is the "no-op" sink), raw score > 0
    (Algorithm 1 skips firings whose scores are all negative), both positions inside the prompt.
    """
    n = pattern.shape[-1]
    inside = torch.arange(n) < lengths[:, None]  # [P, n]
    pair_inside = inside[:, None, :, None] & inside[:, None, None, :]  # [P, 1, n, n]
    fires = (pattern > threshold) & (scores > 0) & pair_inside
    fires[..., 0] = False
    return fires


@dataclass(frozen=True)
class Firings:
    """Every firing event of one capture, kept sparse (section 4.3): one row per (layer, prompt, head, dest,
    src), ordered by those five, with its attention A_ij and its captured score (A' over the attention scale).

    The dense [L, P, H, n, n] pattern and scores are what a long prompt cannot hold (2.4 GB at 2,048 tokens
    on Gemma 3 270M); firing events are a few per head and token.
    """

    layer: Tensor
    prompt: Tensor
    head: Tensor
    dest: Tensor
    src: Tensor
    attention: Tensor
    score: Tensor
    threshold: float

    def __len__(self) -> int:
        return len(self.layer)

    def of_layer(self, layer: int) -> Tensor:
        """The rows of `layer` (a contiguous range: rows are ordered by layer first)."""
        lo, hi = torch.searchsorted(self.layer, torch.tensor([layer, layer + 1])).tolist()
        return torch.arange(lo, hi)

    def rows_of(self, layer: Tensor, prompt: Tensor, head: Tensor, dest: Tensor, src: Tensor) -> Tensor:
        """The row of each given event (-1 where it does not fire)."""
        keys, want = self._keys(), _event_keys(layer, prompt, head, dest, src)
        at = torch.searchsorted(keys, want).clamp(max=max(len(keys) - 1, 0))
        found = keys[at] == want if len(keys) else torch.zeros_like(want, dtype=torch.bool)
        return torch.where(found, at, -1)

    def dest_keys(self) -> Tensor:
        """[F]: each row's `dest_key` (ascending, as the rows)."""
        return dest_key(self.layer, self.prompt, self.head, self.dest)

    def _keys(self) -> Tensor:
        return _event_keys(self.layer, self.prompt, self.head, self.dest, self.src)


def dest_key(layer: Tensor, prompt: Tensor, head: Tensor, dest: Tensor) -> Tensor:
    """One int64 per (layer, prompt, head, dest): the firings of a head from one token share it."""
    return _event_keys(layer, prompt, head, dest, torch.zeros_like(dest)) >> 13


def _event_keys(layer: Tensor, prompt: Tensor, head: Tensor, dest: Tensor, src: Tensor) -> Tensor:
    """One int64 per event, ordered as (layer, prompt, head, dest, src): up to 2^8 layers and heads, 2^20
    prompts (of a chunk) and 2^13 positions (62 bits)."""
    if len(layer) and not (int(layer.max()) < 1 << 8 and int(prompt.max()) < 1 << 20 and int(head.max()) < 1 << 8
                           and max(int(dest.max()), int(src.max())) < 1 << 13):
        raise ValueError("firing events are indexed for at most 256 layers and heads, 2^20 prompts and 8,192 tokens")
    return (((layer << 20 | prompt) << 8 | head) << 13 | dest) << 13 | src


def layer_firings(pattern: Tensor, scores: Tensor, lengths: Tensor, threshold: float, layer: int, first: int = 0) -> Firings:
    """The firing events of one layer's pattern and scores [P, H, n, n] (prompts numbered from `first`)."""
    fires = firing_mask(pattern, scores, lengths, threshold)
    p, a, i, j = fires.nonzero(as_tuple=True)
    return Firings(torch.full_like(p, layer), p + first, a, i, j, pattern[p, a, i, j].float(), scores[p, a, i, j].float(), threshold)


def join_firings(parts: list[Firings], threshold: float) -> Firings:
    """Firings of disjoint parts (layers, batches of prompts) as one, in the rows' order."""
    cols = {f: torch.cat([getattr(q, f) for q in parts]) if parts else torch.zeros(0, dtype=torch.float32 if f in ("attention", "score") else torch.long)
            for f in ("layer", "prompt", "head", "dest", "src", "attention", "score")}
    order = _event_keys(cols["layer"], cols["prompt"], cols["head"], cols["dest"], cols["src"]).argsort()
    return Firings(**{f: t[order] for f, t in cols.items()}, threshold=threshold)


def dense_firings(pattern: Tensor, scores: Tensor, lengths: Tensor, threshold: float) -> Firings:
    """The firings of dense [L, P, H, n, n] pattern and scores, layer by layer."""
    return join_firings([layer_firings(pattern[l], scores[l], lengths, threshold, l) for l in range(pattern.shape[0])], threshold)


ROW_BLOCK = 16


def row_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a [..., M, k] @ b [..., k, m] with every row's bits independent of the other rows of the call.

    BLAS (MKL here) computes a call of a few rows, or the last rows of a thread's share, with other kernels
    that sum over k in another order: a prompt's events would round differently in a chunk of 1 prompt than
    in one of 256, on a worker of 1 thread than in a process of 2. Rows padded with zeros to a multiple of
    ROW_BLOCK stay on the main kernel (measured with 1, 2 and 4 threads, float32 and float64).
    """
    M = a.shape[-2]
    padded = max(ROW_BLOCK, -(-M // ROW_BLOCK) * ROW_BLOCK)
    if padded != M:
        a = torch.cat([a, a.new_zeros(*a.shape[:-2], padded - M, a.shape[-1])], dim=-2)
    return (a @ b)[..., :M, :]


def project_tokens(x: Tensor, basis: Tensor) -> Tensor:
    """[P, n, d] inputs and [H, d+1, r] bases -> [P, H, n, r]: x~ @ Q for every head (x~ = [x; 1], eq. 2).

    The same GEMM that computes the queries; the per-offset cores then finish the projection.
    """
    P, n, d = x.shape
    H, _, r = basis.shape
    flat = row_matmul(x.reshape(P * n, d), basis[:, :-1, :].permute(1, 0, 2).reshape(d, H * r))
    return flat.view(P, n, H, r).permute(0, 2, 1, 3) + basis[:, -1, :][None, :, None, :]


def through_cores(y: Tensor, cores: Tensor, heads: Tensor, offsets: Tensor, *, transpose: bool = False) -> Tensor:
    """[E, r] rows times each event's core [H, M, r, r][head, offset] (or its transpose) -> [E, r].

    y @ U'[h, m] turns x~ @ Q_a into the coordinates x~ . u_k; with transpose, U'[h, m] @ w lifts slice
    weights back to the basis Q_a. One GEMM per (head, offset) that occurs, never a per-event copy of a core.
    """
    H, M, r, _ = cores.shape
    out = y.new_empty(y.shape[0], r)
    key = heads * M + offsets
    order = key.argsort(stable=True)
    keys, counts = key[order].unique_consecutive(return_counts=True)
    for k, rows in zip(keys.tolist(), order.split(counts.tolist())):
        core = cores[k // M, k % M]
        out[rows] = row_matmul(y[rows], core.T if transpose else core)
    return out


def slice_terms(xu_dest: Tensor, sigma: Tensor, xv_src: Tensor, factor: Tensor | None = None) -> Tensor:
    """[E, r]: t_k = (x~_i . u_k) sigma_k (v_k . x~_j); they sum to A'_ij (eqs. 3 and 5).

    factor [E]: positive per-event scalars (1 / (q norm scale x k norm scale) in models with q/k norms);
    they scale every term alike, so S_ij does not depend on them.
    """
    terms = xu_dest * sigma * xv_src
    return terms if factor is None else terms * factor[:, None]


def sparse_set(terms: Tensor, rule: SliceRule) -> tuple[Tensor, Tensor]:
    """S_ij for every event: (mask [E, r], order [E, r]) with `order` the slices by decreasing term.

    `paper`: drop the largest set of terms whose sum is <= 0 (section 4.1). Those are the smallest terms,
    so S_ij is the shortest prefix of the sorted terms whose remainder sums to <= 0. `top k`: the k
    largest terms. `all`: every slice (the paper's no-SVD baseline, Fig. 16).
    """
    E, r = terms.shape
    order = terms.argsort(dim=-1, descending=True)
    if rule.kind == "all":
        return torch.ones_like(terms, dtype=torch.bool), order
    if rule.kind == "top":
        size = torch.full((E,), min(rule.k or r, r), dtype=torch.long)
    else:
        ranked = terms.gather(-1, order)
        remainder = ranked.flip(-1).cumsum(-1).flip(-1)  # remainder[m] = sum of ranked[m:]
        remainder = torch.cat([remainder, remainder.new_zeros(E, 1)], dim=-1)
        size = (remainder <= 0).to(torch.int8).argmax(dim=-1)
    keep_ranked = torch.arange(r) < size[:, None]
    mask = torch.zeros_like(keep_ranked).scatter(-1, order, keep_ranked)
    return mask, order


def slice_weights(mask: Tensor, xu_dest: Tensor, sigma: Tensor) -> Tensor:
    """[E, r]: sign_k sqrt(sigma_k) for k in S_ij, else 0 (eq. 8).

    Appendix, "Sign Ambiguity": u_k is oriented to a positive inner product with x~_i, and v_k with it.
    """
    sign = torch.where(xu_dest < 0, -1.0, 1.0).to(sigma.dtype)
    return mask.to(sigma.dtype) * sign * sigma.sqrt()


def signal_directions(weights: Tensor, heads: Tensor, basis: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """Where eq. (8) reads a residual writer: c = dir . o + homog for a writer o of the token.

    weights [E, r]: slice weights in the basis's coordinates (lifted through the cores, and divided by
    any q/k norm scale of the token); heads [E] index basis [H, d+1, r]; scale [E]: the downstream
    norm's scale of the token (appendix, "Layer Norm"). Returns dir [E, d] and homog [E], the part of
    the signal carried by the homogeneous coordinate (the downstream head's own bias). One GEMM over all
    events: the weights are spread into a [E, H*r] block-one-hot matrix.
    """
    E, r = weights.shape
    H = basis.shape[0]
    spread = weights.new_zeros(E, H, r)
    spread[torch.arange(E), heads] = weights
    directions = row_matmul(spread.reshape(E, H * r), basis[:, :-1, :].permute(0, 2, 1).reshape(H * r, -1))
    homog = (weights * basis[heads, -1, :]).sum(-1)
    return directions / scale[:, None], homog


def head_contributions(directions: Tensor, W_O: Tensor, z: Tensor, post_scale: Tensor | None = None) -> Tensor:
    """[E, l, H]: c of eq. (8) for every upstream head (l', b) with l' < l.

    directions [E, d]; W_O [l, H, r, d] of the upstream layers (times any post-attention norm gain);
    z [E, l, H, r], each event token's upstream value mixes; post_scale [E, l]: the post-attention norm
    scale of the token in each upstream layer, where the model has that norm. o^{l'b} = z W_O^{l'b} is
    taken without a homogeneous 1: that coordinate belongs to the downstream head (appendix).
    """
    E = directions.shape[0]
    l, H, r, d = W_O.shape
    read = row_matmul(directions, W_O.reshape(l * H * r, d).T).view(E, l, H, r)
    contributions = (read * z).sum(-1)
    return contributions if post_scale is None else contributions / post_scale[:, :, None]


def bias_contributions(directions: Tensor, bias: Tensor, post_scale: Tensor | None = None) -> Tensor:
    """[E, l, ...]: eq. (8) for constant writes bias [l, ..., d] (each layer's b_O [l, d], or each head's
    value bias through W_O [l, H, d]), read by directions [E, d] over any post-attention norm scale [E, l]."""
    d = bias.shape[-1]
    read = row_matmul(directions, bias.reshape(-1, d).T).view(directions.shape[0], *bias.shape[:-1])
    return read if post_scale is None else read / post_scale.view(*post_scale.shape, *(1,) * (bias.dim() - 2))


def select_upstream(contributions: Tensor, mass: float, negative: str = "top") -> Tensor:
    """Bool like contributions [E, m]: the smallest set holding `mass` of the total per event (section 5.3).

    Sorted decreasing, keep up to and including the first position where the running sum exceeds
    mass * total (ties with that contribution are kept too, as in the paper's trace). A total <= 0
    keeps the top writer (negative="top", the authors' code) or nothing ("none": the text's smallest
    set reaching mass * total is then the empty one).
    """
    ranked, _ = contributions.sort(dim=-1, descending=True)
    total = contributions.sum(-1, keepdim=True)
    past = ranked.cumsum(-1) > mass * total
    first = torch.where(past.any(-1), past.to(torch.int8).argmax(-1), ranked.shape[-1] - 1)
    cutoff = ranked.gather(-1, first[:, None])
    keep = contributions >= cutoff
    return keep & (total > 0) if negative == "none" else keep
