"""`trace from auto k`: roots chosen without prior knowledge of the circuit.

A head's direct effect on the task is its direct logit attribution at the last token: its write to the
residual, divided by the final norm's scale of that token, read by the unembedding difference
W_U[:, target] - W_U[:, distractor] (the IO-minus-S logit difference of section 5.4); with answer sets, the
mean target column minus the mean distractor column. A task whose metric is the probability difference ranks
heads by this logit direction too: a probability is not linear in one head's write, the logits are.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from circuitlang.data.prompts import PromptSet
from circuitlang.engine.decompose import row_matmul
from circuitlang.engine.forward import Activations
from circuitlang.lang.plan import Root


class RootError(ValueError):
    """Auto roots cannot be chosen for these prompts."""


@dataclass(frozen=True)
class RootChoice:
    """An automatically chosen root: its mean direct effect and in how many prompts its pair fires.

    from_end: False when the head never fires from the last token (where its effect is read), so its pair
    is the one it fires on most anywhere."""

    root: Root
    direct_effect: float
    fired: int
    from_end: bool = True


def direct_effects(head_writes: Tensor, W_U: Tensor, answers: Tensor, final_scale: Tensor) -> Tensor:
    """[P, L, H]: each head's direct logit attribution to target - distractor at each prompt's last token.

    head_writes [P, L, H, d]: what each head adds to the residual at the last token; answers [P, 2] or [P, 2, K]
    (target and distractor sets, -1 pads; circuitlang.engine.forward.answer_ids); final_scale [P]: the final
    norm's scale there.
    """
    if answers.dim() == 2:
        answers = answers[:, :, None]
    valid = (answers >= 0).to(W_U.dtype)
    columns = W_U[:, answers.clamp(min=0)] * valid  # [d, P, 2, K]
    means = columns.sum(-1) / valid.sum(-1)  # [d, P, 2]
    direction = (means[..., 0] - means[..., 1]).T  # [P, d]
    # A product and a sum per prompt, not a batched GEMM: each prompt's bits whatever prompts share the call.
    return (head_writes * direction[:, None, None, :]).sum(-1) / final_scale[:, None, None]


def last_token_writes(z_last: Tensor, W_O: Tensor, post_scale: Tensor | None = None) -> Tensor:
    """[P, L, H, d]: what every head writes to the residual at each prompt's last token, from z_last [P, L, H, r].

    W_O carries any post-attention norm gain (geometry.py); that norm's scale post_scale [P, L] divides the write.
    """
    P, L, H, r = z_last.shape
    writes = row_matmul(z_last.reshape(P, L * H, r).transpose(0, 1), W_O.reshape(L * H, r, -1)).transpose(0, 1).reshape(P, L, H, -1)
    return writes if post_scale is None else writes / post_scale[:, :, None, None]


@dataclass(frozen=True)
class RootSkip:
    """A head passed over by `trace from auto` although its direct effect ranked above a chosen root."""

    layer: int
    head: int
    direct_effect: float
    reason: str


@dataclass(frozen=True)
class RootEvidence:
    """What `trace from auto` reads from a set of prompts; evidence of disjoint prompt sets adds up (`merge`).

    effects [P, L, H]: each prompt's direct effects, kept per prompt (`merge` follows the prompts' order) so that
    their mean sums them in prompt order however the prompts were chunked; at_end / anywhere: per head
    (layer, head), how often it fires between each pair of named roles (dest, src), with dest the last
    token / anywhere.
    """

    effects: np.ndarray
    at_end: dict[tuple[int, int], Counter]
    anywhere: dict[tuple[int, int], Counter]

    @property
    def n_prompts(self) -> int:
        return len(self.effects)

    def merge(self, other: RootEvidence) -> RootEvidence:
        """The evidence of these prompts followed by `other`'s."""
        add = lambda a, b: {k: a.get(k, Counter()) + b.get(k, Counter()) for k in sorted(set(a) | set(b))}  # noqa: E731
        return RootEvidence(np.concatenate([self.effects, other.effects]), add(self.at_end, other.at_end),
                            add(self.anywhere, other.anywhere))


def root_evidence(acts: Activations, effects: Tensor, prompts: PromptSet, threshold: float) -> RootEvidence:
    """The evidence of these prompts: effects [P, L, H], and each head's firings between named roles."""
    fires = acts.firings_at(threshold)
    named = set(prompts.role_names)
    at_end: dict[tuple[int, int], Counter] = {}
    anywhere: dict[tuple[int, int], Counter] = {}
    last = (acts.lengths - 1).tolist()
    for l, p, h, i, j in torch.stack([fires.layer, fires.prompt, fires.head, fires.dest, fires.src], 1).tolist():
        dest, src = prompts[p].labels[i], prompts[p].labels[j]
        if dest in named and src in named:
            anywhere.setdefault((l, h), Counter())[dest, src] += 1
            if i == last[p]:
                at_end.setdefault((l, h), Counter())[dest, src] += 1
    return RootEvidence(effects.double().numpy(), at_end, anywhere)


def auto_roots(evidence: RootEvidence, k: int) -> tuple[tuple[RootChoice, ...], tuple[RootSkip, ...]]:
    """The k heads of largest mean direct effect, strongest first, each on the role pair it fires on most,
    and the heads passed over on the way (they never fire between named roles).

    The pair is counted over firings whose destination is the last token (where the effect is read),
    falling back to all of the head's firings between named roles.
    """
    mean = evidence.effects.sum(0) / max(evidence.n_prompts, 1)  # [L, H]: one array, one order of the sum
    L, H = mean.shape
    chosen: list[RootChoice] = []
    skipped: list[RootSkip] = []
    for flat in np.argsort(-mean.flatten(), kind="stable").tolist():
        layer, head = divmod(flat, H)
        at_end = evidence.at_end.get((layer, head))
        best = at_end or evidence.anywhere.get((layer, head))
        if not best:
            skipped.append(RootSkip(layer, head, float(mean[layer, head]), "never fires between named roles"))
            continue
        (dest, src), fired = max(best.items(), key=lambda item: (item[1], item[0]))
        chosen.append(RootChoice(Root(layer, head, dest, src), float(mean[layer, head]), fired, from_end=bool(at_end)))
        if len(chosen) == k:
            break
    if not chosen:
        raise RootError("no head with a direct effect fires between named roles; name the roots with `trace from`")
    return tuple(chosen), tuple(s for s in skipped if s.direct_effect >= chosen[-1].direct_effect)
