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
