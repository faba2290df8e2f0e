"""Tiny GPT-2-style models built offline from a config, saved in Hugging Face format, loaded through the
same public path as any model (`load_model(directory)`)."""

from __future__ import annotations

from pathlib import Path

import torch


def build_gpt2(directory: Path, tokenizer, *, n_layer=3, n_head=4, n_embd=64, qk_scale=6.0, seed=0, value_bias=0.0) -> Path:
    """A random GPT-2 whose query/key weights are scaled by `qk_scale` so heads fire on single tokens, with
    random query/key biases, and value biases of spread `value_bias` (zero, as initialised, by default)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=64, vocab_size=len(tokenizer))
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight[:, : 2 * n_embd] *= qk_scale
            block.attn.c_attn.bias[: 2 * n_embd].normal_(0, 0.5)
            block.attn.c_attn.bias[2 * n_embd :].normal_(0, value_bias) if value_bias else None
            block.ln_1.weight.uniform_(0.5, 1.5)
            block.ln_1.bias.normal_(0, 0.2)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


def build_handbuilt(directory: Path, tokenizer, a_token: int, b_token: int, *, n_layer: int = 2, marker: float = 10.0,
                    qk: float = 8.0, copy: float = 0.0, second_reader: bool = False) -> Path:
    """A GPT-2 whose circuit is known by construction (d = 64, 4 heads of 16, no MLPs, no positions).

    Token embeddings live in dims 0..47; two marker directions m1 = e60 - e61 and m2 = e62 - e63 are
    orthogonal to them and to the all-ones vector that LayerNorm's centring adds. Layer 0: head 0 attends
    to itself and writes `marker` m1 where the token is A; head 1 does the same with m2 where the token
    is B; heads 2 and 3 write nothing. Layer 1 (if n_layer == 2): head 0 has Omega = qk m2 m1^T, so it
    fires from B (dest) to A (src); heads 1-3 have zero queries and keys. The trace of 1.0 B->A must be
    exactly the edges 0.0 -> (1.0, A) through the source and 0.1 -> (1.0, B) through the destination.
    With `copy`, head 1.0 also copies "how much of A is here" from its source back as A's embedding
    direction: the only head with a direct effect on logit(A) - logit(B) at B. With `second_reader`,
    head 1.1 reads m1 at its source too (same Omega, no output): off the traced path, but a global
    intervention on the signal reaches it and a local one does not.
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
        for head, token, direction in ((0, a_token, m1), (1, b_token, m2)):
            q, k, v = head * dh, d + head * dh, 2 * d + head * dh
            dims = torch.arange(head * dh, (head + 1) * dh)
            attn0.c_attn.weight[dims, q + torch.arange(dh)] = 2.0  # self-attention through 16 embedding dims
            attn0.c_attn.weight[dims, k + torch.arange(dh)] = 2.0
            attn0.c_attn.weight[:, v] = wte[token] / wte[token].norm()  # value: "is this token A (B)?"
            attn0.c_proj.weight[head * dh] = marker * direction  # output: write the marker
        if n_layer == 2:
            attn1 = model.transformer.h[1].attn
            for head in (0, 1) if second_reader else (0,):
                attn1.c_attn.weight[:, head * dh] = qk**0.5 * m2  # query reads m2 at the destination
                attn1.c_attn.weight[:, d + head * dh] = qk**0.5 * m1  # key reads m1 at the source
            a_dir = wte[a_token] / wte[a_token].norm()
            attn1.c_attn.weight[:, 2 * d] = a_dir
            attn1.c_proj.weight[0] = copy * a_dir
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


def _randomise_norms(model, spread: float = 0.4) -> None:
    """Give every norm a non-trivial gain (and bias) so that folding mistakes cannot hide."""
    for name, param in model.named_parameters():
        if "norm" in name or "ln" in name.split(".")[-2:][0]:
            if name.endswith("bias"):
                param.data.normal_(0, 0.1)
            else:
                param.data.add_(torch.empty_like(param).uniform_(-spread, spread))


def _scale_qk(model, names: tuple[str, ...], factor: float) -> None:
    for name, param in model.named_parameters():
        if any(n in name for n in names) and name.endswith("weight"):
            param.data.mul_(factor)


def build_rotary(directory: Path, tokenizer, family: str, *, seed: int = 0) -> Path:
    """Tiny random rotary models: "llama" (GQA 4 query / 2 key heads, RMSNorm), "neox" (partial rotary
    0.5, LayerNorm with biases, parallel residual), "gemma3" (GQA 4/1, q/k norms, post-attention and
    post-MLP norms, sliding and global layers with different rotary bases)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=len(tokenizer), max_position_embeddings=64, intermediate_size=128)
    if family == "llama":
        config = tf.LlamaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, **common)
        model = tf.LlamaForCausalLM(config)
        qk = ("q_proj", "k_proj")
    elif family == "neox":
        config = tf.GPTNeoXConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, rotary_pct=0.5, **common)
        model = tf.GPTNeoXForCausalLM(config)
        qk = ("query_key_value",)
    elif family == "gemma3":
        config = tf.Gemma3TextConfig(
            hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
            sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=16, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, **common)
        model = tf.Gemma3ForCausalLM(config)
        qk = ("q_proj", "k_proj")
    else:
        raise ValueError(family)
    with torch.no_grad():
        _randomise_norms(model)
        _scale_qk(model, qk, 3.0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)


# The hand-built circuit tuned so that interventions and patching act on F: small markers (the norm barely
# rescales when they change) and head 1.0 copying A into B's residual.
READER = dict(marker=0.25, qk=2.5, copy=6.0)


def word_ids(tokenizer, words) -> dict[str, int]:
    """Each word's single token id."""
    return {w: tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words}


def reader_prompts(ids: dict[str, int], layouts, description: str, counterfactual: str | None = None):
    """Prompts with A (Mary) somewhere and B (John) last; F = logit(Mary) - logit(John) at B. With
    `counterfactual`, each prompt's counterfactual puts that word where Mary was."""
    from circuitlang.data.prompts import Prompt, PromptSet

    out = []
    for layout in layouts:
        a, b = layout.index(" Mary"), layout.index(" John")
        tokens = tuple(ids[w] for w in layout)
        labels = tuple("A" if k == a else "B" if k == b else f"'{w.strip()}'" for k, w in enumerate(layout))
        extra = {"counterfactual": tuple(ids[counterfactual] if k == a else t for k, t in enumerate(tokens))} if counterfactual else {}
        out.append(Prompt(text="".join(layout), token_ids=tokens, roles=(("A", a), ("B", b)), labels=labels,
                          target=ids[" Mary"], distractor=ids[" John"], **extra))
    return PromptSet(tuple(out), ("A", "B"), description)
