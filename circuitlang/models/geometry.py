"""What the trace needs of a model's attention, read once from the bridge in the paper's coordinates.

GPT-2 (the paper's model) has biases, LayerNorm and learned positions. The same description covers the
rotary family: grouped KV heads (a query head reads its group's W_K), RMSNorm, per-head q/k norms whose
gains multiply into Omega and whose per-token scales are positive factors of every slice term, and a
norm after the attention block (Gemma), whose gain multiplies W_O and whose per-token scale divides each
head's write to the residual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from circuitlang.models.model import LoadedModel


@dataclass(frozen=True)
class AttentionGeometry:
    """Per layer L, query head H, d_model d, d_head r (float32, on the CPU).

    W_Q [L, H, d, r], b_Q [L, H, r]; W_K, b_K: the key weights each query head reads; q_gain, k_gain
    [L, r]: q/k norm gains (ones without q/k norms); W_O [L, H, r, d] with the post-attention norm's gain
    multiplied in, b_O [L, d]; rotary: whether Omega depends on the offset i - j; value_out [L, H, d]:
    each head's value bias times its W_O, the part of b_O that eq. (4) gives the head (None where zero).
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


def _norm_gain(module, width: int) -> Tensor:
    """The elementwise gain of an RMS-style norm, read off by normalising a vector of ones (RMS 1)."""
    original = getattr(module, "original_component", module)
    eps = float(getattr(original, "eps", getattr(original, "variance_epsilon", 0.0)))
    with torch.no_grad():
        out = original(torch.ones(1, width, dtype=next(original.parameters()).dtype))
    return (out.float() * (1.0 + eps) ** 0.5).reshape(width)


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
    ones = torch.ones(L, r)
    q_gain = torch.stack([_norm_gain(a.q_norm, r) for a in attn]) if has_qk_norm else ones
    k_gain = torch.stack([_norm_gain(a.k_norm, r) for a in attn]) if has_qk_norm else ones
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
    )
