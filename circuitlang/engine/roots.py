"""`trace from auto k`: roots chosen without prior knowledge of the circuit.

A head's direct effect on the task is its direct logit attribution at the last token: its write to the
residual, divided by the final norm's scale of that token, read by the unembedding difference
W_U[:, target] - W_U[:, distractor] (the IO-minus-S logit difference of section 5.4).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor

from circuitlang.data.prompts import PromptSet
from circuitlang.engine import decompose as dc
from circuitlang.engine.forward import Activations
from circuitlang.lang.plan import Root


class RootError(ValueError):
    """Auto roots cannot be chosen for these prompts."""


@dataclass(frozen=True)
class RootChoice:
    """An automatically chosen root: its mean direct effect and in how many prompts its pair fires."""

    root: Root
    direct_effect: float
    fired: int


def direct_effects(acts: Activations, head_writes: Tensor, W_U: Tensor, targets: Tensor, distractors: Tensor) -> Tensor:
    """[P, L, H]: each head's direct logit attribution to target - distractor at each prompt's last token.

    head_writes [P, L, H, d]: what each head adds to the residual at the last token.
    """
    last = acts.lengths - 1
    direction = (W_U[:, targets] - W_U[:, distractors]).T  # [P, d]
    scale = acts.final_scale[torch.arange(len(last)), last]  # [P]
    return torch.einsum("plhd,pd->plh", head_writes, direction) / scale[:, None, None]


def last_token_writes(acts: Activations, W_O: Tensor) -> Tensor:
    """[P, L, H, d]: what every head writes to the residual at each prompt's last token.

    W_O carries any post-attention norm gain (geometry.py); that norm's scale divides the write.
    """
    prompts, last = torch.arange(acts.z.shape[0]), acts.lengths - 1
    writes = torch.einsum("plhr,lhrd->plhd", acts.z[prompts, last], W_O)
    if acts.post_scale is not None:
        writes = writes / acts.post_scale[:, prompts, last].T[:, :, None, None]
    return writes


def auto_roots(acts: Activations, effects: Tensor, prompts: PromptSet, k: int, threshold: float) -> tuple[RootChoice, ...]:
    """The k heads of largest mean direct effect, strongest first, each on the role pair it fires on most.

    The pair is counted over firings whose destination is the last token (where the effect is read),
    falling back to all of the head's firings between named roles.
    """
    mean = effects.mean(0)  # [L, H]
    L, H = mean.shape
    fires = dc.firing_mask(acts.pattern, acts.scores, acts.lengths, threshold)
    chosen = []
    for flat in mean.flatten().argsort(descending=True).tolist():
        layer, head = divmod(flat, H)
        pair = _most_common_pair(fires[layer, :, head], acts.lengths, prompts)
        if pair is None:
            continue
        (dest, src), fired = pair
        chosen.append(RootChoice(Root(layer, head, dest, src), float(mean[layer, head]), fired))
        if len(chosen) == k:
            break
    if not chosen:
        raise RootError("no head with a direct effect fires between named roles; name the roots with `trace from`")
    return tuple(chosen)


def _most_common_pair(fires: Tensor, lengths: Tensor, prompts: PromptSet) -> tuple[tuple[str, str], int] | None:
    """fires [P, n, n] of one head -> ((dest role, src role), count), preferring dest = the last token."""
    named = set(prompts.role_names)
    at_end: Counter = Counter()
    anywhere: Counter = Counter()
    for p, i, j in fires.nonzero().tolist():
        dest, src = prompts[p].labels[i], prompts[p].labels[j]
        if dest in named and src in named:
            anywhere[dest, src] += 1
            if i == int(lengths[p]) - 1:
                at_end[dest, src] += 1
    best = at_end or anywhere
    if not best:
        return None
    return max(best.items(), key=lambda item: (item[1], item[0]))
