"""Tiny random models of every decoder-only family the conformance suite covers, built offline from
transformers' own config classes and saved in Hugging Face format beside GPT-2's tokenizer, so they load
through the same path as a user's `model "local/dir"`.

Widths are small (d = 64, 4 query heads of 16) but every feature that could break an exact decomposition is
switched on: norm gains and biases randomised, query/key weights scaled up so heads fire on single tokens,
grouped or shared key heads, partial and interleaved rotary, sliding windows, soft caps, parallel blocks.
"""

from __future__ import annotations

from pathlib import Path

import torch

D, HEADS, D_HEAD, LAYERS, FFN = 64, 4, 16, 3, 128


def _configs(vocab: int) -> dict:
    """family -> (config class name, model class name, config kwargs, names of the query/key weights)."""
    common = dict(vocab_size=vocab, max_position_embeddings=64)
    llama_like = dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN, **common)
    return {
        "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_layer=LAYERS, n_head=HEADS, n_embd=D, n_positions=64, vocab_size=vocab), ("c_attn",)),
        "gpt_neo": ("GPTNeoConfig", "GPTNeoForCausalLM", dict(
            num_layers=LAYERS, num_heads=HEADS, hidden_size=D, intermediate_size=FFN, window_size=4,
            attention_types=[[["global", "local"], 1], [["global"], 1]], **common), ("q_proj", "k_proj")),
        "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(n_layer=LAYERS, n_head=HEADS, n_embd=D, n_inner=FFN, rotary_dim=8,
                                                       n_positions=64, vocab_size=vocab), ("q_proj", "k_proj")),
        "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(rotary_pct=0.5, **llama_like), ("query_key_value",)),
        "opt": ("OPTConfig", "OPTForCausalLM", dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS, ffn_dim=FFN,
                                                   word_embed_proj_dim=D, **common), ("q_proj", "k_proj")),
        "bloom": ("BloomConfig", "BloomForCausalLM", dict(hidden_size=D, n_layer=LAYERS, n_head=HEADS, vocab_size=vocab), ("query_key_value",)),
        "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
            num_key_value_heads=2, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16}, **llama_like),
            ("q_proj", "k_proj")),
        "llama2": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=HEADS, **llama_like), ("q_proj", "k_proj")),
        "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=6, **llama_like), ("q_proj", "k_proj")),
        "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1,
                                                               **llama_like), ("q_proj", "k_proj")),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, **llama_like), ("q_proj", "k_proj")),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=D_HEAD, **llama_like), ("q_proj", "k_proj")),
        "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(num_key_value_heads=1, head_dim=D_HEAD, **llama_like), ("q_proj", "k_proj")),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
            num_key_value_heads=2, head_dim=D_HEAD, query_pre_attn_scalar=D_HEAD, sliding_window=6, attn_logit_softcapping=20.0,
            final_logit_softcapping=30.0, layer_types=["sliding_attention", "full_attention", "sliding_attention"], **llama_like),
            ("q_proj", "k_proj")),
        "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
            num_key_value_heads=1, head_dim=D_HEAD, sliding_window=8, query_pre_attn_scalar=D_HEAD, rope_theta=1_000_000.0,
            rope_local_base_freq=10_000.0, layer_types=["sliding_attention", "full_attention", "sliding_attention"], **llama_like),
            ("q_proj", "k_proj")),
        "phi": ("PhiConfig", "PhiForCausalLM", dict(partial_rotary_factor=0.5, **llama_like), ("q_proj", "k_proj")),
        "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(num_key_value_heads=2, pad_token_id=0, **llama_like), ("qkv_proj",)),
        "olmo": ("OlmoConfig", "OlmoForCausalLM", dict(pad_token_id=0, **llama_like), ("q_proj", "k_proj")),
        "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(num_key_value_heads=2, pad_token_id=0, **llama_like), ("q_proj", "k_proj")),
        "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(num_key_value_heads=2, partial_rotary_factor=0.25, use_qkv_bias=True,
                                                                  **llama_like), ("q_proj", "k_proj")),
        "falcon": ("FalconConfig", "FalconForCausalLM", dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                                            multi_query=True, parallel_attn=True, bias=True, new_decoder_architecture=False,
                                                            vocab_size=vocab), ("query_key_value",)),
    }


FAMILIES = tuple(_configs(1))


def build_family(directory: Path, tokenizer, family: str, *, seed: int = 0) -> Path:
    """A tiny random model of `family` (see FAMILIES) saved in `directory`, with its norms' gains and biases and
    every attention bias randomised and its query/key weights scaled up (heads fire on single tokens)."""
    import transformers as tf

    config_name, model_name, kwargs, qk = _configs(len(tokenizer))[family]
    torch.manual_seed(seed)
    config = getattr(tf, config_name)(**kwargs)
    model = getattr(tf, model_name)(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.split(".")
            if any(k in name for k in ("norm", "ln", "layer_norm")) and "proj" not in leaf[-2]:
                if name.endswith("bias"):
                    param.normal_(0, 0.1)
                else:
                    param.add_(torch.empty_like(param).uniform_(-0.4, 0.4))
            elif name.endswith("bias") and "attn" in name or "attention" in name and name.endswith("bias"):
                param.normal_(0, 0.3)
            if any(k in name for k in qk) and name.endswith("weight"):
                param.mul_(3.0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)
