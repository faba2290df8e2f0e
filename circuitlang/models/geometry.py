"""What the trace needs of a model's attention, read once from the bridge in the paper's coordinates.

GPT-2 (the paper's model) has biases, LayerNorm and learned positions. The same description covers every
decoder family of docs/models.md: grouped or shared KV heads (a query head reads its group's W_K), RMSNorm,
q/k norms per head or across all heads (OLMo-2), whose gains multiply into Omega and whose per-token scales
are positive factors of every slice term, rotary positions (Omega per offset, rotate-half or interleaved
pairs), a norm after the attention block (Gemma 2 and 3, OLMo-2), whose gain multiplies W_O and whose
per-token scale divides each head's write to the residual, and ALiBi's position term, which lies outside
the bilinear form and is carried beside it (`position_slope`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from circuitlang.models.families import alibi_slopes
from circuitlang.models.model import LoadedModel


@dataclass(frozen=True)
class AttentionGeometry:
    """Per layer L, query head H, d_model d, d_head r (float32, on the CPU).

    W_Q [L, H, d, r], b_Q [L, H, r]; W_K, b_K: the key weights each query head reads; q_gain, k_gain
    [L, H, r]: q/k norm gains per query head (ones without q/k norms); W_O [L, H, r, d] with the
    post-attention norm's gain multiplied in, b_O [L, d]; rotary: whether Omega depends on the offset i - j,
    interleaved: its pairs are (2t, 2t+1) rather than (t, t + rotary_dim/2); value_out [L, H, d]: each
    head's value bias times its W_O, the part of b_O that eq. (4) gives the head (None where zero);
    score_scale: A'_ij = score_scale * the captured score; position_slope [H]: ALiBi's term slope_h * j
    in A' units, added to the bilinear score and not attributed (None without one).
    """

    W_Q: Tensor
    b_Q: Tensor
    W_K: Tensor
    b_K: Tensor
    q_gain: Tensor
    k_gain: Tensor
    W_O: Tensor
    b_O: Tensor
    rotary: bool
    has_qk_norm: bool
    has_post_norm: bool
    value_out: Tensor | None = None
    interleaved: bool = False
    score_scale: float = 1.0
    position_slope: Tensor | None = None


def _norm_gain(module, width: int) -> Tensor:
    """The elementwise gain of an RMS-style norm, read off by normalising a vector of ones (RMS 1)."""
    original = getattr(module, "original_component", module)
    eps = float(getattr(original, "eps", getattr(original, "variance_epsilon", 0.0)))
    with torch.no_grad():
        out = original(torch.ones(1, width, dtype=next(original.parameters()).dtype))
    return (out.float() * (1.0 + eps) ** 0.5).reshape(width)


def _head_gains(module, heads: int, r: int) -> Tensor:
    """[heads, r]: a q/k norm's gain per head, whether it normalises each head (width r, one gain shared by
    every head) or all heads at once (width heads * r, OLMo-2; its per-token scale is then one for all)."""
    original = getattr(module, "original_component", module)
    width = next(original.parameters()).numel()
    return _norm_gain(module, width).reshape(-1, r).expand(heads, r)


def _param(bridge, name: str, like: Tensor) -> Tensor:
    try:
        value = getattr(bridge, name)
    except AttributeError:  # bias-free checkpoints expose no stacked bias
        return torch.zeros_like(like)
    return torch.zeros_like(like) if value is None else value.detach()


def attention_geometry(model: LoadedModel) -> AttentionGeometry:
    b = model.bridge
    W_Q = b.W_Q.detach().float().cpu()
    W_K = b.W_K.detach().float().cpu()
    L, H, d, r = W_Q.shape
    group = H // W_K.shape[1]
    b_Q = _param(b, "b_Q", W_Q[..., 0, :]).float().cpu()
    b_K = _param(b, "b_K", W_K[..., 0, :]).float().cpu()
    W_O = b.W_O.detach().float().cpu()
    b_O = _param(b, "b_O", W_O[:, 0, 0, :]).float().cpu()
    attn = [block.attn for block in b.blocks]
    has_qk_norm = hasattr(attn[0], "q_norm")
    ones = torch.ones(L, H, r)
    q_gain = torch.stack([_head_gains(a.q_norm, H, r) for a in attn]) if has_qk_norm else ones
    k_gain = torch.stack([_head_gains(a.k_norm, W_K.shape[1], r).repeat_interleave(group, 0) for a in attn]) if has_qk_norm else ones
    has_post_norm = hasattr(b.blocks[0], "ln1_post")
    if has_post_norm:
        post = torch.stack([_norm_gain(block.ln1_post, d) for block in b.blocks])  # [L, d]
        W_O = W_O * post[:, None, None, :]
        b_O = b_O * post
    value_out = None
    if model.value_bias is not None:  # attention rows sum to 1, so the bias reaches the output whole
        value_out = torch.einsum("lhr,lhrd->lhd", model.value_bias.repeat_interleave(group, dim=1), W_O)
    return AttentionGeometry(
        W_Q=W_Q, b_Q=b_Q,
        W_K=W_K.repeat_interleave(group, dim=1), b_K=b_K.repeat_interleave(group, dim=1),
        q_gain=q_gain, k_gain=k_gain, W_O=W_O, b_O=b_O,
        rotary=b.cfg.positional_embedding_type == "rotary",
        has_qk_norm=has_qk_norm, has_post_norm=has_post_norm, value_out=value_out,
        interleaved=model.family.interleaved, score_scale=model.attn_scale,
        position_slope=torch.tensor(alibi_slopes(H)) * model.attn_scale if model.family.alibi else None,
    )


def bilinear_scores(model: LoadedModel, scores: Tensor) -> Tensor:
    """[B, H, n, n] scores as the bridge hooks them (A' / attn_scale, after any soft cap and position term)
    -> the bilinear part x~_i^T Omega x~_j / attn_scale that the slices decompose (eq. 3).

    Gemma 2's soft cap s -> cap tanh(s / cap) is undone exactly (atanh); BLOOM's ALiBi term slope_h * j is
    taken out (`AttentionGeometry.position_slope` carries it). Masked pairs (-inf) stay masked."""
    if model.soft_cap:
        cap = float(model.soft_cap)
        scores = torch.where(scores.isfinite(), cap * torch.atanh((scores / cap).clamp(-1, 1)), scores)
    if model.family.alibi:
        H, n = scores.shape[1], scores.shape[-1]
        slopes = torch.tensor(alibi_slopes(H), dtype=scores.dtype, device=scores.device)
        scores = scores - slopes[:, None, None] * torch.arange(n, dtype=scores.dtype, device=scores.device)
    return scores


def rotary_tables(model: LoadedModel, n: int) -> tuple[Tensor, Tensor] | None:
    """cos, sin [L, n, rotary_dim] from the Hugging Face model's own rotary module, for families whose bridge
    hooks no tables (`Family.tables == "rotary_emb"`); interleaved tables repeat each frequency twice, as
    the model applies them. None for the others (their tables are captured from `hook_cos`/`hook_sin`)."""
    if model.family.tables != "rotary_emb":
        return None
    hf = model.bridge.original_model
    rotary = next(m for name, m in hf.named_modules() if name.endswith("rotary_emb"))
    positions = torch.arange(n)[None]
    with torch.no_grad():
        sin, cos = rotary(torch.zeros(1, n, 1, dtype=torch.float32), positions)
    if model.family.interleaved:
        cos, sin = cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
    return tuple(t[0].float().cpu().expand(model.n_layers, -1, -1).contiguous() for t in (cos, sin))
