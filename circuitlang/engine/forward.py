"""One cached forward pass: the activations a trace reads, stacked over layers, nothing more.

Prompts are right-padded; causal attention keeps every position inside a prompt independent of the
padding after it, and `lengths` masks the padding out of every later step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from circuitlang.data.prompts import PromptSet
from circuitlang.engine.model import LoadedModel

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Activations:
    """Cached activations for P prompts of at most n tokens, L layers, H query heads.

    tokens [P, n], lengths [P]; x [L, P, n, d]: each layer's attention input after its norm
    (`ln1.hook_normalized`, gains folded); scale [L, P, n]: that norm's per-token scale; pattern and
    scores [L, P, H, n, n]: A and A' over the attention scale (`hook_pattern`, `hook_attn_scores`);
    z [P, n, L, H, r]: each head's mix of values (`hook_z`), whose output is z @ W_O; final_scale [P, n]:
    the final norm's scale (direct logit attribution); logit_diff [P]: F(X), the target-minus-distractor
    logit at each prompt's last token (section 5.4), when the prompts name both.
    Rotary family only: q_scale, k_scale [L, P, H, n] (q/k norm scales, per query head), post_scale
    [L, P, n] (the post-attention norm's scale), cos and sin [L, n, rotary_dim].
    writers=True only: embed [P, n, d] (the residual before layer 0) and mlp_out [L, P, n, d] (each MLP
    block's write to the residual), for the completeness check.
    """

    tokens: Tensor
    lengths: Tensor
    x: Tensor
    scale: Tensor
    pattern: Tensor
    scores: Tensor
    z: Tensor
    final_scale: Tensor
    logit_diff: Tensor | None = None
    q_scale: Tensor | None = None
    k_scale: Tensor | None = None
    post_scale: Tensor | None = None
    cos: Tensor | None = None
    sin: Tensor | None = None
    embed: Tensor | None = None
    mlp_out: Tensor | None = None


_PER_LAYER = {  # field: hook under blocks.{l}, kept when the model has it
    "x": "ln1.hook_normalized",
    "scale": "ln1.hook_scale",
    "pattern": "attn.hook_pattern",
    "scores": "attn.hook_attn_scores",
    "z": "attn.hook_z",
    "q_scale": "attn.q_norm.hook_scale",
    "k_scale": "attn.k_norm.hook_scale",
    "post_scale": "ln1_post.hook_scale",
    "cos": "attn.hook_cos",
    "sin": "attn.hook_sin",
}
_MLP_WRITE = ("ln2_post.hook_out", "hook_mlp_out")  # after the post-MLP norm where there is one


def batch_tokens(prompts: PromptSet, pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded token ids [P, n] and lengths [P]."""
    lengths = torch.tensor([len(p.token_ids) for p in prompts], dtype=torch.long)
    tokens = torch.full((len(prompts), int(lengths.max())), pad_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt.token_ids)] = torch.tensor(prompt.token_ids)
    return tokens, lengths


@torch.inference_mode()
def capture(
    model: LoadedModel,
    prompts: PromptSet,
    *,
    batch_size: int = 64,
    writers: bool = False,
    progress: Progress | None = None,
) -> Activations:
    """Run the model once over `prompts` in batches and keep what the trace needs."""
    pad = model.tokenizer.pad_token_id
    tokens, lengths = batch_tokens(prompts, 0 if pad is None else pad)
    available = set(model.bridge.hook_dict)
    L = model.n_layers
    fields = {f: hook for f, hook in _PER_LAYER.items() if f"blocks.0.{hook}" in available}
    if writers:
        fields["mlp_out"] = next(h for h in _MLP_WRITE if f"blocks.0.{h}" in available)
    names = {f"blocks.{l}.{hook}" for hook in fields.values() for l in range(L)} | {"ln_final.hook_scale"}
    if writers:
        names.add("blocks.0.hook_resid_pre")
    answers = [(p.target, p.distractor) for p in prompts]
    has_answers = all(t is not None and d is not None for t, d in answers)
    parts: dict[str, list[Tensor]] = {name: [] for name in names}
    diffs = []
    total = tokens.shape[0]
    for start in range(0, total, batch_size):
        chunk = tokens[start : start + batch_size].to(model.device)
        logits, cache = model.bridge.run_with_cache(chunk, names_filter=lambda name: name in names)
        for name in names:
            parts[name].append(cache[name].detach().to("cpu", torch.float32))
        if has_answers:
            rows = torch.arange(chunk.shape[0])
            last = logits[rows, lengths[start : start + batch_size] - 1].float().cpu()
            pair = torch.tensor(answers[start : start + batch_size])
            diffs.append(last[rows, pair[:, 0]] - last[rows, pair[:, 1]])
        del cache, logits
        if progress is not None:
            progress(min(start + batch_size, total), total)

    def layers(field: str) -> Tensor:
        stacked = torch.stack([torch.cat(parts[f"blocks.{l}.{fields[field]}"]) for l in range(L)])
        if field in ("cos", "sin"):  # positions 0..n-1, the same in every prompt
            return stacked[:, 0]
        if field in ("scale", "post_scale"):
            return stacked.squeeze(-1)
        if field in ("q_scale", "k_scale"):  # [L, P, heads, n, 1] -> per query head
            return stacked.squeeze(-1).repeat_interleave(model.n_heads // stacked.shape[2], dim=2)
        if field == "z":
            return stacked.permute(1, 2, 0, 3, 4)  # [P, n, L, H, r]
        return stacked

    return Activations(
        tokens=tokens,
        lengths=lengths,
        final_scale=torch.cat(parts["ln_final.hook_scale"]).squeeze(-1),
        logit_diff=torch.cat(diffs) if has_answers else None,
        embed=torch.cat(parts["blocks.0.hook_resid_pre"]) if writers else None,
        **{field: layers(field) for field in fields},
    )
