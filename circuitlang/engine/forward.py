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
    """Cached activations for P prompts of at most n tokens, L layers, H heads.

    tokens [P, n], lengths [P]; x [L, P, n, d]: each layer's attention input after its LayerNorm
    (`ln1.hook_normalized`, folded); scale [L, P, n]: that LayerNorm's per-token scale; pattern and
    scores [L, P, H, n, n]: A and A'/sqrt(r) (`hook_pattern`, `hook_attn_scores`); z [P, n, L, H, r]:
    each head's mix of values (`hook_z`), whose output is z @ W_O; final_scale [P, n]: the final
    LayerNorm's scale (for direct logit attribution); logit_diff [P]: F(X), the target-minus-distractor
    logit at each prompt's last token (section 5.4), when the prompts name both. embed and mlp_out
    [L, P, n, d] are the residual writers other than heads, kept only for the completeness check.
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
    embed: Tensor | None = None
    mlp_out: Tensor | None = None


def batch_tokens(prompts: PromptSet, pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded token ids [P, n] and lengths [P]."""
    lengths = torch.tensor([len(p.token_ids) for p in prompts], dtype=torch.long)
    tokens = torch.full((len(prompts), int(lengths.max())), pad_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt.token_ids)] = torch.tensor(prompt.token_ids)
    return tokens, lengths


def _hook_names(n_layers: int, writers: bool) -> list[str]:
    names = []
    for l in range(n_layers):
        names += [f"blocks.{l}.ln1.hook_normalized", f"blocks.{l}.ln1.hook_scale"]
        names += [f"blocks.{l}.attn.{h}" for h in ("hook_pattern", "hook_attn_scores", "hook_z")]
        if writers:
            names.append(f"blocks.{l}.hook_mlp_out")
    names.append("ln_final.hook_scale")
    if writers:
        names += ["hook_embed", "hook_pos_embed"]
    return names


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
    names = _hook_names(model.n_layers, writers)
    L = model.n_layers
    parts: dict[str, list[Tensor]] = {}
    total = tokens.shape[0]
    answers = [(p.target, p.distractor) for p in prompts]
    has_answers = all(t is not None and d is not None for t, d in answers)
    diffs = []
    for start in range(0, total, batch_size):
        chunk = tokens[start : start + batch_size].to(model.device)
        logits, cache = model.bridge.run_with_cache(chunk, names_filter=lambda name: name in names)
        for key in names:
            if key in cache:
                parts.setdefault(key, []).append(cache[key].detach().to("cpu", torch.float32))
        if has_answers:
            rows = torch.arange(chunk.shape[0])
            last = logits[rows, lengths[start : start + batch_size] - 1].float().cpu()
            pair = torch.tensor(answers[start : start + batch_size])
            diffs.append(last[rows, pair[:, 0]] - last[rows, pair[:, 1]])
        del cache, logits
        if progress is not None:
            progress(min(start + batch_size, total), total)

    def stack(fmt: str, dim: int = 0) -> Tensor:
        return torch.stack([torch.cat(parts[fmt.format(l)]) for l in range(L)], dim=dim)

    embed = mlp_out = None
    if writers:
        embed = torch.cat(parts["hook_embed"])
        if "hook_pos_embed" in parts:
            embed = embed + torch.cat(parts["hook_pos_embed"])
        mlp_out = stack("blocks.{}.hook_mlp_out")
    return Activations(
        tokens=tokens,
        lengths=lengths,
        x=stack("blocks.{}.ln1.hook_normalized"),
        scale=stack("blocks.{}.ln1.hook_scale").squeeze(-1),
        pattern=stack("blocks.{}.attn.hook_pattern"),
        scores=stack("blocks.{}.attn.hook_attn_scores"),
        z=stack("blocks.{}.attn.hook_z", dim=2),
        final_scale=torch.cat(parts["ln_final.hook_scale"]).squeeze(-1),
        logit_diff=torch.cat(diffs) if has_answers else None,
        embed=embed,
        mlp_out=mlp_out,
    )
