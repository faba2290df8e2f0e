"""Tiny GPT-2-style models built offline from a config, saved in Hugging Face format, loaded through the
same public path as any model (`load_model(directory)`)."""

from __future__ import annotations

from pathlib import Path

import torch


def build_gpt2(directory: Path, tokenizer, *, n_layer=3, n_head=4, n_embd=64, qk_scale=6.0, seed=0) -> Path:
    """A random GPT-2 whose query/key weights are scaled by `qk_scale` so heads fire on single tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=64, vocab_size=len(tokenizer))
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight[:, : 2 * n_embd] *= qk_scale
            block.attn.c_attn.bias[: 2 * n_embd].normal_(0, 0.5)
            block.ln_1.weight.uniform_(0.5, 1.5)
            block.ln_1.bias.normal_(0, 0.2)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


def build_handbuilt(directory: Path, tokenizer, a_token: int, b_token: int, *, n_layer: int = 2) -> Path:
    """A GPT-2 whose circuit is known by construction (d = 64, 4 heads of 16, no MLPs, no positions).

    Token embeddings live in dims 0..47; two marker directions m1 = e60 - e61 and m2 = e62 - e63 are
    orthogonal to them and to the all-ones vector that LayerNorm's centring adds. Layer 0: head 0 attends
    to itself and writes m1 where the token is A; head 1 does the same with m2 where the token is B;
    heads 2 and 3 write nothing. Layer 1 (if n_layer == 2): head 0 has Omega = 8 m2 m1^T, so it fires from
    B (dest) to A (src); heads 1-3 have zero queries and keys. The trace of 1.0 B->A must be exactly the
    edges 0.0 -> (1.0, A) through the source and 0.1 -> (1.0, B) through the destination.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    d, dh = 64, 16
    config = GPT2Config(n_layer=n_layer, n_head=4, n_embd=d, n_positions=32, vocab_size=len(tokenizer))
    model = GPT2LMHeadModel(config)
    m1 = torch.zeros(d); m1[60], m1[61] = 1, -1
    m2 = torch.zeros(d); m2[62], m2[63] = 1, -1
    m1, m2 = m1 / m1.norm(), m2 / m2.norm()
    with torch.no_grad():
        wte = model.transformer.wte.weight
        wte.zero_()
        wte[:, :48] = torch.randn(wte.shape[0], 48)
        model.transformer.wpe.weight.zero_()
        for block in model.transformer.h:
            for param in (*block.attn.parameters(), *block.mlp.parameters()):
                param.zero_()
        attn0 = model.transformer.h[0].attn
        for head, token, marker in ((0, a_token, m1), (1, b_token, m2)):
            q, k, v = head * dh, d + head * dh, 2 * d + head * dh
            dims = torch.arange(head * dh, (head + 1) * dh)
            attn0.c_attn.weight[dims, q + torch.arange(dh)] = 2.0  # self-attention through 16 embedding dims
            attn0.c_attn.weight[dims, k + torch.arange(dh)] = 2.0
            attn0.c_attn.weight[:, v] = wte[token] / wte[token].norm()  # value: "is this token A (B)?"
            attn0.c_proj.weight[head * dh] = 10.0 * marker  # output: write the marker
        if n_layer == 2:
            attn1 = model.transformer.h[1].attn
            attn1.c_attn.weight[:, 0] = 8.0**0.5 * m2  # query reads m2 at the destination
            attn1.c_attn.weight[:, d] = 8.0**0.5 * m1  # key reads m1 at the source
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)
