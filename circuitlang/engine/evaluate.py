"""How much of the task metric a circuit of heads keeps: faithfulness curves, SVT against the usual baselines.

A circuit C is a set of attention heads. m(C) is the mean over the prompts of F = logit(target) -
logit(distractor) at the last token when every head outside C has its output (`blocks.{l}.attn.hook_z`,
the head's mix of values, so its write z W_O and everything downstream of it follow) replaced by the
counterfactual run's at the same position (or by the mean over the counterfactual prompts, per position).
Embeddings and MLPs are never patched. The faithfulness of C is

    f(C) = (m(C) - m(empty)) / (m(M) - m(empty))

(the Mechanistic Interpretability Benchmark's circuit-localisation measure), so f = 1 with every head kept
(the clean model, M) and f = 0 with none. Heads are ranked by each method, the circuits are the top k heads
for k on a grid of sizes, and each curve is summarised by CPR = the area under f over the fraction of heads
kept (higher is better) and CMD = the area between f and 1 (lower is better), by the trapezoid rule on the
grid.

Rankings (each of every head): `influence` (the trace alone: the roots first, then every head by the share of
the roots' traced signal that flows through it, `influence_scores`), `count` (in how many prompts the trace
reached a head, then its total |contribution|), `attribution_clean` and `attribution_cf` (attribution
patching at node granularity, sum over positions of (z_clean - z_cf) . dF/dz, the gradient taken at the clean
run, as MIB's EAP, or at the counterfactual run, as TransformerLens 4's `attribution_patch`; positive: the
head supports F), `dla` (mean direct logit attribution on the clean prompts) and `random` (seeded orders).

MIB-style scores (hannamw/MIB-circuit-track, `evaluation.py`): CPR is the area under f of the circuits built
on the *signed* scores (largest first), CMD the area of |1 - f| of the circuits built on |score|, trapezoids
on a linear axis of the fraction of heads kept, over MIB's grid of fractions rounded to whole heads plus every
size up to 20 heads. Beside them, the mean of min(f, 1) over the circuits of 1 to 20 heads (overshoot earns
nothing there; the largest f is reported beside it).

Every circuit size costs one batched forward pass (all methods' circuits of that size stacked on the batch
axis, in row chunks), which stops at the final norm and reads two unembedding columns. The attribution scores
cost one forward with gradients and one backward per batch of prompts (TransformerLens's own
`attribution_patch`, one prompt a call, only with `check tl`). The engine never prints.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from circuitlang.data.prompts import PromptSet
from circuitlang.engine.forward import FINAL, answer_ids, batch_tokens, keepers, logit_diff, run_to_final_norm, set_metric
from circuitlang.models.model import LoadedModel
from circuitlang.engine.results import EMBED, MLP
from circuitlang.engine.roots import direct_effects, last_token_writes
from circuitlang.engine.trace import root_events
from circuitlang.lang.plan import RANKINGS, parse_root, root_heads

SIGNED = ("attribution_clean", "attribution_cf", "dla")  # scores with a sign: CPR's circuits differ from CMD's
MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)  # MIB's circuit sizes
SMALL = 20  # every circuit size up to this many heads is evaluated: where a researcher reads a circuit
REPORT_SIZES = (5, 10, 20)
ROW_CHUNK = 256  # prompt rows per patched forward pass
Progress = Callable[[str, int, int], None]


class EvaluationError(ValueError):
    """The evaluation cannot run on these prompts (no answers, no counterfactuals)."""


# ---------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class MethodCurve:
    """One method's curves at `FaithfulnessResults.sizes`. ranking: heads "l.h" by |score|, most important
    first (random: the first draw's order); m [S], f [S]: the circuits of that ranking (CMD's); signed,
    m_signed, f_signed: the same for the ranking by signed score (CPR's), None where it is the same order
    (influence, count, random); cpr (on f_signed where there is one), cmd (on f); mean_f: the mean of
    min(f, 1) over the circuits of 1 to 20 heads on the CPR side, f_max the largest f there (overshoot).
    random: means over the draws, with *_std their standard deviations. scores [L, H]: what was ranked."""

    method: str
    ranking: tuple[str, ...]
    m: np.ndarray
    f: np.ndarray
    cpr: float
    cmd: float
    mean_f: float = float("nan")
    f_max: float = float("nan")
    signed: tuple[str, ...] | None = None
    m_signed: np.ndarray | None = None
    f_signed: np.ndarray | None = None
    f_std: np.ndarray | None = None
    cpr_std: float | None = None
    cmd_std: float | None = None
    mean_f_std: float | None = None
    scores: np.ndarray | None = None
    draws: int = 1

    @property
    def f_cpr(self) -> np.ndarray:
        """The curve CPR, the f at k columns and mean_f read: the signed ranking's where there is one."""
        return self.f if self.f_signed is None else self.f_signed

    def f_at(self, k: int, sizes: Sequence[int]) -> float | None:
        return float(self.f_cpr[list(sizes).index(k)]) if k in sizes else None


@dataclass(frozen=True)
class Overlap:
    """A method's top-k heads against a reference set of heads (the traced circuit, a known list)."""

    method: str
    reference: str
    k: int
    precision: float
    recall: float
    f1: float


@dataclass(frozen=True)
class FaithfulnessResults:
    against: str
    ablation: str  # "counterfactual" (each prompt's own) or "mean"
    n_prompts: int
    n_heads: int
    sizes: tuple[int, ...]
    m_full: float
    m_empty: float
    m_counterfactual: float
    methods: tuple[MethodCurve, ...]
    overlap: tuple[Overlap, ...] = ()
    attribution: dict[str, Any] = field(default_factory=dict)  # source, agreement, refusal reason
    edge_level: dict[str, Any] = field(default_factory=dict)  # TL faithfulness on the trace's edges, or why not
    timings: dict[str, float] = field(default_factory=dict)
    edge_circuits: Any = None  # `edges K, ...`: edge_circuits.EdgeCircuits, the trace's edges scored by its interventions

    def method(self, name: str) -> MethodCurve:
        return next(m for m in self.methods if m.method == name)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["methods"] = [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in asdict(m).items()} for m in self.methods]
        out["edge_circuits"] = None if self.edge_circuits is None else self.edge_circuits.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FaithfulnessResults:
        arrays = ("m", "f", "m_signed", "f_signed", "f_std", "scores")
        methods = tuple(MethodCurve(**{k: (np.asarray(v, dtype=float) if k in arrays and v is not None else
                                           tuple(v) if k in ("ranking", "signed") and v is not None else v)
                                       for k, v in m.items()}) for m in data["methods"])
        from circuitlang.engine.edge_circuits import EdgeCircuits

        edges = data.get("edge_circuits")
        return cls(**{**data, "sizes": tuple(data["sizes"]), "methods": methods,
                      "overlap": tuple(Overlap(**o) for o in data.get("overlap", ())),
                      "edge_circuits": None if edges is None else EdgeCircuits.from_dict(edges)})


# ---------------------------------------------------------------------------------------------- the math


def default_sizes(n_heads: int) -> tuple[int, ...]:
    """MIB's grid of fractions of the n_heads heads, rounded to whole heads, plus every size from 0 to 20 and
    all the heads (for Gemma 3 270M's 72 heads: 0-20, 36, 72)."""
    grid = {int(np.floor(f * n_heads + 0.5)) for f in MIB_FRACTIONS} | set(range(SMALL + 1)) | {n_heads}
    return tuple(sorted(k for k in grid if k <= n_heads))


def circuit_masks(rankings: Tensor, sizes: Sequence[int]) -> Tensor:
    """[R, S, N] bool: ranking r's top sizes[s] heads (rankings [R, N]: flat head indices, best first)."""
    R, N = rankings.shape
    rank_of = torch.empty_like(rankings)
    rank_of.scatter_(1, rankings, torch.arange(N).expand(R, N))  # rank_of[r, head] = position in ranking r
    return rank_of[:, None, :] < torch.tensor(list(sizes))[None, :, None]


def faithfulness(m: np.ndarray, m_full: float, m_empty: float) -> np.ndarray:
    """f = (m - m(empty)) / (m(M) - m(empty)); nan where the two ends coincide."""
    gap = m_full - m_empty
    return (np.asarray(m, dtype=float) - m_empty) / gap if gap != 0 else np.full(np.shape(m), np.nan)


def areas(f: np.ndarray, sizes: Sequence[int], n_heads: int) -> tuple[float, float]:
    """(CPR, CMD): the areas under f and between f and 1 over the fraction of heads kept (trapezoids on the
    grid, which must run from 0 to n_heads)."""
    x = np.asarray(sizes, dtype=float) / n_heads
    f = np.asarray(f, dtype=float)
    return float(np.trapezoid(f, x)), float(np.trapezoid(np.abs(1.0 - f), x))


def rank_scores(scores: Tensor, signed: bool = False) -> Tensor:
    """[N]: flat head indices by decreasing |score| (signed: by decreasing score); ties: lower index first."""
    flat = (scores if signed else scores.abs()).flatten().double()
    return torch.from_numpy(np.lexsort((np.arange(flat.numel()), -flat.numpy())).copy())


def count_ranking(trace: Any, n_layers: int, n_heads: int) -> tuple[Tensor, Tensor]:
    """(ranking [N], evidence [L, H]): heads by the number of prompts in which the trace reached them (as a
    traced event or a kept upstream head), then their total |contribution|; the heads it never reached follow
    by their firing counts. evidence = prompts + a fraction that orders ties by contribution."""
    H = n_heads
    ev, ed = trace.events, trace.edges
    heads = ed.up_head >= 0  # writers other than heads (`sources`) are not ranked
    pairs = set(zip(ev.prompt.tolist(), (ev.layer * H + ev.head).tolist()))
    pairs |= set(zip(ed.prompt[heads].tolist(), (ed.up_layer * H + ed.up_head)[heads].tolist()))
    prompts = np.zeros(n_layers * H)
    for _, head in pairs:
        prompts[head] += 1
    contribution = np.zeros(n_layers * H)
    np.add.at(contribution, (ed.up_layer * H + ed.up_head)[heads].astype(int), np.abs(ed.contribution[heads]))
    firing = np.asarray(trace.firing.counts, dtype=float).reshape(-1)
    order = np.lexsort((np.arange(n_layers * H), -firing, -contribution, -prompts))
    evidence = prompts + contribution / (contribution.max(initial=0.0) + 1.0) / 2
    return torch.from_numpy(order.copy()), torch.from_numpy(evidence.reshape(n_layers, H))


def influence_scores(trace: Any, prompts: PromptSet, n_layers: int, n_heads: int) -> np.ndarray:
    """[L, H]: each head's influence on the roots through the traced edges, averaged over prompts and roots
    (`influence_flows`)."""
    return influence_flows(trace, prompts, n_layers, n_heads)[0]


def influence_flows(trace: Any, prompts: PromptSet, n_layers: int, n_heads: int) -> tuple[np.ndarray, np.ndarray]:
    """([L, H] influence, [edge rows] flow): each head's influence on the roots through the traced edges, averaged
    over prompts and roots, and each edge row's flow (the part of the roots' influence that passes through it:
    its downstream event's flow times its weight, divided like the influence; 0 for writers other than heads).

    A node is a head's output at one token of one prompt. The weight of an edge (l', b) -> event (l, h, i, j)
    through side d (token i) or s (token j) is that side's share of the event's signal, c / (2 S_side): its
    contribution (eq. 8; negative ones carry no share) over the side's whole signal (every writer's, eq. 8
    extended: heads, MLPs, embeddings, biases; the traced edges' sum where that is larger), each side
    carrying half of the bilinear score. A node's
    inflow goes to its traced events (the firings with that token as destination, where Algorithm 1 recurses)
    in proportion to their attention. With A these weights, a head's influence in a prompt is the sum over its
    nodes of the roots' rows of (I - A)^-1 (every path to a root, the product of its weights), here summed
    layer by layer from the top (edges only go down), divided by the number of roots (a root set: one per head); the roots' own events
    start with 1. Writers other than heads are leaves. circuit-tracer prunes attribution graphs this way."""
    ev, ed = trace.events, trace.edges
    H, E = n_heads, len(ev)
    n = int(max(ev.dest.max(initial=0), ed.token.max(initial=0), 0)) + 1
    key = lambda p, l, h, t: ((np.asarray(p) * n_layers + l) * H + h) * n + t  # noqa: E731  (prompt, head, token)
    heads = ed.up_head >= 0
    ev_node = key(ev.prompt, ev.layer, ev.head, ev.dest)
    up_node = key(ed.prompt[heads], ed.up_layer[heads], ed.up_head[heads], ed.token[heads])
    nodes, inverse = np.unique(np.concatenate([ev_node, up_node]), return_inverse=True)
    ev_at, up_at = inverse[:E], inverse[E:]
    # each event's share of its node's inflow: its attention over the node's traced events'
    attention = np.asarray(ev.attention, dtype=float)
    node_attention = np.zeros(len(nodes))
    np.add.at(node_attention, ev_at, attention)
    share = attention / np.where(node_attention[ev_at] > 0, node_attention[ev_at], 1.0)
    # each edge's weight: its share of the downstream side's signal, half per side; where negative writers
    # make the signal smaller than the traced edges' sum, that sum (so a side never hands on more than half)
    positive = np.clip(ed.contribution, 0, None).astype(float)
    side_of = 2 * ed.event.astype(int) + (ed.side == "s")
    traced = np.zeros(2 * E)
    np.add.at(traced, side_of, positive)
    signal = np.stack([ev.signal_dest, ev.signal_src], axis=1).reshape(-1).astype(float)
    whole = np.maximum(signal, traced)
    event = ed.event[heads].astype(int)
    weight = positive[heads] / np.where(whole[side_of[heads]] > 0, 2 * whole[side_of[heads]], np.inf)
    roots = [parse_root(t) for t in trace.config.roots]
    seed = np.zeros(E)  # the roots' events start with 1
    np.add.at(seed, [e for rows in root_events(ev, prompts, roots) for e in rows], 1.0)
    flow = seed.copy()  # each event's flow from the roots
    node_flow = np.zeros(len(nodes))  # each node's inflow through edges
    for layer in sorted(set(ev.layer.tolist()), reverse=True):
        here = ev.layer == layer
        flow[here] += node_flow[ev_at[here]] * share[here]
        down = here[event]
        np.add.at(node_flow, up_at[down], flow[event[down]] * weight[down])
    total = node_flow + np.bincount(ev_at, seed, minlength=len(nodes))
    head = (nodes // n) % (n_layers * H)
    out = np.zeros(n_layers * H)
    np.add.at(out, head, total)
    n_roots = sum(len(root_heads(r, H)) for r in roots)  # a root set counts the roots of its explicit list's heads
    norm = max(len(prompts), 1) * max(n_roots, 1)
    edge_flow = np.zeros(len(ed))
    edge_flow[np.nonzero(heads)[0]] = flow[event] * weight / norm
    return (out / norm).reshape(n_layers, H), edge_flow


def influence_ranking(influence: np.ndarray, roots: set[int], count_order: Tensor) -> tuple[Tensor, Tensor]:
    """(ranking [N], scores [L, H]): the roots first (influence 1 by definition), then every head by its
    influence, ties (the heads the trace never reached among them) in the count ranking's order."""
    scores = influence.reshape(-1).copy()
    scores[list(roots)] = 1.0
    place = torch.empty_like(count_order)
    place[count_order] = torch.arange(len(count_order))
    is_root = np.isin(np.arange(len(scores)), list(roots))
    order = np.lexsort((place.numpy(), -scores, ~is_root))
    return torch.from_numpy(order.copy()), torch.from_numpy(scores.reshape(influence.shape))


def curve_summary(f: np.ndarray, sizes: Sequence[int]) -> tuple[float, float]:
    """(mean of min(f, 1), largest f) over the circuits of 1 to SMALL heads on the grid."""
    small = [s for s, k in enumerate(sizes) if 1 <= k <= SMALL]
    if not small:
        return float("nan"), float("nan")
    f = np.asarray(f, dtype=float)[small]
    return float(np.minimum(f, 1.0).mean()), float(f.max())


def random_rankings(n: int, draws: int, seed: int) -> Tensor:
    """[draws, n]: seeded random orders of the heads."""
    gen = torch.Generator().manual_seed(int(seed) % 2**63)
    return torch.stack([torch.randperm(n, generator=gen) for _ in range(draws)]) if draws else torch.empty(0, n, dtype=torch.long)


def top_k_overlap(ranking: Sequence[str], reference: set[str], k: int) -> tuple[float, float, float]:
    """(precision, recall, F1) of a ranking's top k heads against a reference set."""
    top = set(ranking[:k])
    hit = len(top & reference)
    p = hit / len(top) if top else 0.0
    r = hit / len(reference) if reference else 0.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


# ---------------------------------------------------------------------------------------------- passes


@dataclass(frozen=True)
class Batch:
    """The prompts as tensors: clean and counterfactual tokens [P, n], lengths [P], answers [P, 2, K] (target and
    distractor sets, forward.answer_ids), and how F compares them (forward.set_metric)."""

    tokens: Tensor
    cf_tokens: Tensor
    lengths: Tensor
    answers: Tensor
    metric: str = "logit"

    @classmethod
    def of(cls, model: LoadedModel, prompts: PromptSet) -> Batch:
        if any(p.target is None or p.distractor is None for p in prompts):
            raise EvaluationError("the faithfulness evaluation needs a target and a distractor answer in every prompt")
        if any(p.counterfactual is None for p in prompts):
            raise EvaluationError("the faithfulness evaluation needs a counterfactual for every prompt")
        pad = model.tokenizer.pad_token_id
        tokens, lengths = batch_tokens(prompts, 0 if pad is None else pad)
        cf = tokens.clone()
        for row, p in enumerate(prompts):
            if len(p.counterfactual) != len(p.token_ids):
                raise EvaluationError(f"prompt {row}: the counterfactual has {len(p.counterfactual)} tokens, the prompt "
                                      f"{len(p.token_ids)}; they must align")
            cf[row, : len(p.counterfactual)] = torch.tensor(p.counterfactual)
        return cls(tokens, cf, lengths, answer_ids(prompts), prompts.metric)


def _z_hook(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def _last(final: Tensor, lengths: Tensor) -> Tensor:
    rows = torch.arange(final.shape[0], device=final.device)
    return final[rows, (lengths - 1).to(final.device)]


def head_outputs(model: LoadedModel, tokens: Tensor, lengths: Tensor, answers: Tensor, *, batch_size: int = 64,
                 extra: Sequence[str] = (), metric: str = "logit") -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(z [P, n, L, H, r], F [P], extra hooks' tensors): one plain pass in batches. Each layer's head outputs
    are written into z as its hook fires: per-batch copies, stacked and then concatenated, held z twice
    (z is 0.4 GB for 256 Gemma 3 prompts, and this pass was the peak of a first run)."""
    L, P = model.n_layers, tokens.shape[0]
    z = torch.empty(P, tokens.shape[1], L, model.n_heads, model.d_head)
    fs, more = [], {name: [] for name in extra}
    for start in range(0, P, batch_size):
        sl = slice(start, start + batch_size)
        got: dict[str, list[Tensor]] = {}
        final = run_to_final_norm(model, tokens[sl], [(_z_hook(l), _writer(z, sl, l)) for l in range(L)] + keepers(extra, got))
        fs.append(logit_diff(model, _last(final, lengths[sl]), answers[sl], metric).float())
        for name in extra:
            more[name].append(got[name][0])
    return z, torch.cat(fs), {name: torch.cat(parts) for name, parts in more.items()}


def _writer(z: Tensor, rows: slice, layer: int) -> Callable:
    """A hook writing its head outputs [B, n, H, r] into z[rows, :, layer]."""
    def write(tensor, hook=None):
        z[rows, :, layer] = tensor.detach()
    return write


def patched_logit_diff(model: LoadedModel, batch: Batch, z_cf: Tensor, keep: Tensor, *, row_chunk: int = ROW_CHUNK) -> Tensor:
    """[C, P]: F of every prompt with every head outside circuit c replaced, for C circuits at once.

    keep [C, L, H] bool; z_cf [P, n, L, H, r] (each prompt's counterfactual head outputs) or [n, L, H, r] (the
    mean). Rows (circuit, prompt) are stacked on the batch axis; each chunk of rows is one forward pass, in
    which one hook per layer swaps the outputs of the dropped heads: `where(keep, z, z_cf)`.
    """
    C, P = keep.shape[0], batch.tokens.shape[0]
    circuit_of = torch.arange(C).repeat_interleave(P)
    prompt_of = torch.arange(P).repeat(C)
    out = torch.empty(C * P)
    for start in range(0, C * P, row_chunk):
        rows = slice(start, start + row_chunk)
        c, p = circuit_of[rows], prompt_of[rows]
        kept = keep[c]  # [B, L, H]

        def patch(layer: int) -> Callable:
            def hook(tensor, hook=None):
                k = kept[:, layer].to(tensor.device)[:, None, :, None]
                replacement = z_cf[:, :, layer][p] if z_cf.dim() == 5 else z_cf[:, layer].expand(len(p), -1, -1, -1)
                return torch.where(k, tensor, replacement[:, : tensor.shape[1]].to(tensor.device, tensor.dtype))
            return hook

        hooks = [(_z_hook(l), patch(l)) for l in range(model.n_layers) if not bool(kept[:, l].all())]
        final = run_to_final_norm(model, batch.tokens[p], hooks)
        out[rows] = logit_diff(model, _last(final, batch.lengths[p]), batch.answers[p], batch.metric).float()
        del final
    return out.view(C, P)


def gradient_times_difference(model: LoadedModel, batch: Batch, z_clean: Tensor, z_cf: Tensor, *, at: str = "counterfactual",
                              batch_size: int = 64) -> Tensor:
    """[P, L, H]: attribution patching at node granularity, per prompt and head, summed over positions:
    sum_{t, r} (z_clean - z_cf)[t, r] * dF/dz[t, r] (positive: the head's clean output supports F), the
    gradient taken at the counterfactual run (`at="counterfactual"`, the denoising convention of
    TransformerLens 4's `attribution_patch`) or at the clean run (`at="clean"`, MIB's EAP). One forward with
    grad and one backward per batch of prompts (F of each prompt depends on its own row only, so the gradient
    of the sum is each prompt's own)."""
    from transformer_lens.model_bridge.exceptions import StopAtLayerException

    L, out = model.n_layers, []
    for start in range(0, batch.tokens.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        tokens = (batch.cf_tokens if at == "counterfactual" else batch.tokens)[sl]
        deltas: dict[int, Tensor] = {}

        def probe(layer: int) -> Callable:
            def hook(tensor, hook=None):
                deltas[layer] = torch.zeros_like(tensor, requires_grad=True)
                return tensor + deltas[layer]
            return hook

        def stop(tensor, hook):
            raise StopAtLayerException(tensor)

        with torch.inference_mode(False), torch.enable_grad():
            final = model.bridge.run_with_hooks(tokens.to(model.device), fwd_hooks=[(_z_hook(l), probe(l)) for l in range(L)] + [(FINAL, stop)])
            f = logit_diff(model, _last(final, batch.lengths[sl]), batch.answers[sl], batch.metric)
            grads = torch.autograd.grad(f.sum(), [deltas[l] for l in range(L)])
        g = torch.stack([gr.detach().float().cpu() for gr in grads], dim=2)  # [B, n, L, H, r]
        n = g.shape[1]
        diff = (z_clean[sl] - z_cf[sl])[:, :n]
        mask = (torch.arange(n)[None, :] < batch.lengths[sl][:, None]).float()
        out.append(torch.einsum("bnlhr,bn->blh", diff * g, mask))
    return torch.cat(out)


def tl_attribution(model: LoadedModel, batch: Batch) -> Tensor:
    """[P, L, H]: TransformerLens 4's `attribution_patch` (node granularity) per prompt, summed over positions.

    One call per prompt, cut to its own length, with F read at its last token (TL's metric sees one prompt's
    logits; it runs its own full passes)."""
    from transformer_lens.tools.analysis.attribution_patching import EdgeAttributionConfig, attribution_patch

    out = torch.zeros(batch.tokens.shape[0], model.n_layers, model.n_heads)
    for row in range(batch.tokens.shape[0]):
        n = int(batch.lengths[row])
        def metric(logits, answers=batch.answers[row : row + 1]):
            return set_metric(logits[:, -1], answers.to(logits.device), batch.metric)[0]

        result = attribution_patch(model.bridge, batch.tokens[row : row + 1, :n].to(model.device),
                                   batch.cf_tokens[row : row + 1, :n].to(model.device), metric,
                                   EdgeAttributionConfig(granularity="node"))
        for node, score in result.node_scores.items():
            if node.kind == "attn_head_out":
                out[row, node.layer, node.head] += score
    return out


def direct_logit_attribution(model: LoadedModel, batch: Batch, z_clean: Tensor, scales: dict[str, Tensor], W_O: Tensor) -> Tensor:
    """[P, L, H]: each head's direct effect on F at the last token of the clean run: its write z W_O (post-norm
    gain in W_O, divided by the post-attention norm's scale where there is one), over the final norm's scale,
    read by W_U[:, target] - W_U[:, distractor]."""
    P = z_clean.shape[0]
    rows, last = torch.arange(P), batch.lengths - 1
    post = [scales[f"blocks.{l}.ln1_post.hook_scale"] for l in range(model.n_layers) if f"blocks.{l}.ln1_post.hook_scale" in scales]
    writes = last_token_writes(z_clean[rows, last], W_O, torch.stack([s[rows, last].reshape(P) for s in post], dim=1) if post else None)
    W_U = model.bridge.W_U.detach().to("cpu", torch.float32)
    return direct_effects(writes, W_U, batch.answers, scales["ln_final.hook_scale"][rows, last].reshape(P))


def tl_edge_support(model: LoadedModel) -> str | None:
    """None when TransformerLens 4's `faithfulness` accepts the model; else its reason for refusing."""
    from transformer_lens.tools.analysis import attribution_patching as ap

    try:
        ap._check_attention_write_structure(model.bridge)
        ap._check_kv_heads_match_query_heads(model.bridge)
    except ValueError as err:
        return str(err)
    return None


EDGE_PROMPTS = 8  # prompts the edge-level check runs on: TransformerLens's `faithfulness` takes one pair a call,
# enumerates every edge of the model in Python and runs a pass per edge class (about 2 s a prompt on 3 layers)


def trace_edge_circuit(trace: Any, prompt: int, last: int, n_layers: int) -> list[tuple[Any, Any]]:
    """TransformerLens 4's (writer, reader) edges for one prompt's traced edges: an edge from (l', b) into head
    (l, h) through its destination token i is b's output at i read by h's query input at i, through its source
    token j the key input at j (an MLP or the embeddings of `sources`: their write at that token); and each
    traced head's write into the logits at the last token, where the task metric reads it."""
    from transformer_lens.tools.analysis.attribution_patching import Node

    e = trace.edges
    tokens = e.token
    rows = np.nonzero(e.prompt == prompt)[0]
    circuit, outputs = set(), set()
    for k in rows.tolist():
        up, down = (int(e.up_layer[k]), int(e.up_head[k])), (int(e.layer[k]), int(e.head[k]))
        token = int(tokens[k])
        if up[1] >= 0:
            writer = Node("attn_head_out", position=token, layer=up[0], head=up[1])
            outputs.add(up)
        elif up[1] == MLP:
            writer = Node("mlp_out", position=token, layer=up[0])
        elif up[1] == EMBED:
            writer = Node("embed", position=token)
        else:  # a b_O is no node of TransformerLens's graph: it is never ablated
            continue
        reader = Node("q_input" if e.side[k] == "d" else "k_input", position=token, layer=down[0], head=down[1])
        circuit.add((writer, reader))
        outputs.add(down)
    logits = Node("logits", position=last, layer=n_layers - 1)
    circuit |= {(Node("attn_head_out", position=last, layer=l, head=h), logits) for l, h in outputs}
    return sorted(circuit, key=repr)


def tl_edge_faithfulness(model: LoadedModel, batch: Batch, trace: Any) -> dict[str, Any]:
    """TransformerLens 4's edge-level `faithfulness` (every edge outside the circuit takes the counterfactual run's
    write) of each prompt's traced edges with the traced heads' logit edges (`trace_edge_circuit`), on the first
    EDGE_PROMPTS prompts: the mean and spread of the recovered fraction, and the mean edge count."""
    from transformer_lens.tools.analysis.attribution_patching import faithfulness as tl_faithfulness

    recovered, edges, skipped = [], [], 0
    for row in range(min(EDGE_PROMPTS, batch.tokens.shape[0])):
        n = int(batch.lengths[row])
        def metric(logits, answers=batch.answers[row : row + 1]):
            return set_metric(logits[:, -1], answers.to(logits.device), batch.metric)[0]

        circuit = trace_edge_circuit(trace, row, n - 1, model.n_layers)
        try:
            result = tl_faithfulness(model.bridge, batch.tokens[row : row + 1, :n].to(model.device),
                                     batch.cf_tokens[row : row + 1, :n].to(model.device), metric, circuit)
        except ValueError as err:
            if "equal" not in str(err):  # a pair whose clean and corrupt metrics tie has no gap to recover
                raise
            skipped += 1
            continue
        recovered.append(float(result.recovered))
        edges.append(len(circuit))
    return {"recovered": float(np.mean(recovered)) if recovered else float("nan"),
            "recovered_std": float(np.std(recovered)) if recovered else float("nan"),
            "edges": float(np.mean(edges)) if edges else 0.0, "n_prompts": len(recovered), "skipped_prompts": skipped}


# ---------------------------------------------------------------------------------------------- the evaluation


def evaluate_faithfulness(
    model: LoadedModel,
    prompts: PromptSet,
    trace: Any,
    *,
    against: str,
    mean: bool = False,
    sizes: Sequence[int] | str | None = None,
    rankings: Sequence[str] = RANKINGS,
    random_draws: int = 10,
    seed: int = 0,
    references: dict[str, set[str]] | None = None,
    check_tl: bool = False,
    f_clean: Sequence[float] | None = None,
    progress: Progress | None = None,
) -> FaithfulnessResults:
    """Faithfulness curves of the `rankings` (influence and count from `trace`, attribution patching, DLA) and
    of random ones on `prompts` (each with a counterfactual), with the same ablation for all: see the module
    docstring. f_clean: each prompt's clean F where the run has it already (then, without attribution or DLA,
    no clean pass is run). check_tl: also run TransformerLens 4's `attribution_patch` against our scores and,
    where TransformerLens accepts the model, its edge-level `faithfulness` on the trace's edges.

    references: named head sets ("l.h") to score each method's top-k heads against (precision, recall, F1).
    """
    t_start = time.perf_counter()
    L, H = model.n_layers, model.n_heads
    N = L * H
    unknown = [r for r in rankings if r not in RANKINGS]
    if unknown:
        raise EvaluationError(f"unknown ranking {unknown[0]!r}; rankings are {', '.join(RANKINGS)}")
    batch = Batch.of(model, prompts)
    grid = tuple(range(N + 1)) if sizes == "all" else default_sizes(N) if sizes is None else tuple(sorted({0, N, *sizes}))
    if grid[-1] != N or grid[0] != 0:
        raise EvaluationError(f"circuit sizes must lie in 0..{N}")
    names = [f"{l}.{h}" for l in range(L) for h in range(H)]
    timings: dict[str, float] = {}

    # the counterfactual run (and the clean one where F, the head outputs or the scales are not at hand)
    t = time.perf_counter()
    z_cf, f_cf, _ = head_outputs(model, batch.cf_tokens, batch.lengths, batch.answers, metric=batch.metric)
    timings["forward"] = time.perf_counter() - t
    needs_clean = check_tl or f_clean is None or any(r in SIGNED for r in rankings)
    if needs_clean:
        scale_hooks = ["ln_final.hook_scale"] + [f"blocks.{l}.ln1_post.hook_scale" for l in range(L)
                                                  if f"blocks.{l}.ln1_post.hook_scale" in model.bridge.hook_dict]
        z_clean, clean_f, scales = head_outputs(model, batch.tokens, batch.lengths, batch.answers,
                                                extra=scale_hooks if "dla" in rankings else (), metric=batch.metric)
    else:
        clean_f = torch.as_tensor(np.asarray(f_clean, dtype=np.float64))
    replacement = z_cf
    if mean:  # per position, over the counterfactual prompts that reach it
        mask = (torch.arange(z_cf.shape[1])[None, :] < batch.lengths[:, None]).float()[:, :, None, None, None]
        replacement = (z_cf * mask).sum(0) / mask.sum(0).clamp_min(1)

    # rankings: name -> (order by |score|, order by signed score or None, scores [L, H])
    t = time.perf_counter()
    count_order, count_evidence = count_ranking(trace, L, H)
    attribution: dict[str, Any] = {"source": "own", "granularity": "node"}
    per_prompt: dict[str, Tensor] = {}
    fixed: dict[str, tuple[Tensor, Tensor | None, Tensor]] = {}
    for name in rankings:
        if name == "count":
            fixed[name] = (count_order, None, count_evidence)
        elif name == "influence":
            roots = {l * H + h for r in map(parse_root, trace.config.roots) for l, h in root_heads(r, H)}
            order, scores = influence_ranking(influence_scores(trace, prompts, L, H), roots, count_order)
            fixed[name] = (order, None, scores)
        else:
            if name == "dla":
                from circuitlang.models.geometry import attention_geometry

                scores = direct_logit_attribution(model, batch, z_clean, scales, attention_geometry(model).W_O).mean(0)
            else:
                per_prompt[name] = gradient_times_difference(model, batch, z_clean, z_cf, at=name.removeprefix("attribution_")
                                                             .replace("cf", "counterfactual"))
                scores = per_prompt[name].mean(0)
            fixed[name] = (rank_scores(scores), rank_scores(scores, signed=True), scores)
    if check_tl:  # TransformerLens 4's attribution_patch (the counterfactual gradient), one prompt a call
        try:
            tl = tl_attribution(model, batch)
        except (ValueError, NotImplementedError, RuntimeError) as err:
            attribution["tl_refused"] = str(err)
        else:
            own = per_prompt.get("attribution_cf")
            own = gradient_times_difference(model, batch, z_clean, z_cf) if own is None else own
            attribution["source"] = "own, checked against transformer_lens"
            attribution["max_abs_difference_own_vs_tl"] = float((tl.mean(0) - own.mean(0)).abs().max())
            attribution["max_abs_score"] = float(tl.mean(0).abs().max())
    timings["rankings"] = time.perf_counter() - t
    rows: list[Tensor] = []  # the orders evaluated, each once
    at: dict[str, tuple[int, int | None]] = {}  # name -> (row of the |score| order, row of the signed order)
    for name, (order, signed, _) in fixed.items():
        at[name] = (len(rows), None if signed is None else len(rows) + 1)
        rows += [order] if signed is None else [order, signed]
    randoms = random_rankings(N, random_draws, seed * 1_000_003 + 13)
    orders = torch.cat([torch.stack(rows) if rows else torch.empty(0, N, dtype=torch.long), randoms])  # [R, N]

    # one batched pass per circuit size: every ranking's circuit of that size (duplicates run once)
    t = time.perf_counter()
    masks = circuit_masks(orders, grid)  # [R, S, N]
    m = torch.empty(orders.shape[0], len(grid), dtype=torch.float64)
    m_full = float(clean_f.double().mean())
    inner = [s for s, k in enumerate(grid) if 0 < k < N]
    for done, s in enumerate([grid.index(0), *inner]):
        unique, inverse = torch.unique(masks[:, s].to(torch.uint8), dim=0, return_inverse=True)
        f = patched_logit_diff(model, batch, replacement, unique.bool().view(-1, L, H))
        m[:, s] = f.double().mean(1)[inverse]
        if progress is not None:
            progress("faithfulness", done + 1, len(inner) + 1)
    m[:, grid.index(N)] = m_full
    m_empty = float(m[0, 0])
    timings["curves"] = time.perf_counter() - t
    passes = len(inner) + 1

    curves = []
    for name, (order, signed, scores) in fixed.items():
        r_abs, r_signed = at[name]
        f = faithfulness(m[r_abs].numpy(), m_full, m_empty)
        f_signed = None if r_signed is None else faithfulness(m[r_signed].numpy(), m_full, m_empty)
        f_cpr = f if f_signed is None else f_signed
        mean_f, f_max = curve_summary(f_cpr, grid)
        curves.append(MethodCurve(name, tuple(names[i] for i in order.tolist()), m[r_abs].numpy(), f,
                                  areas(f_cpr, grid, N)[0], areas(f, grid, N)[1], mean_f, f_max,
                                  signed=None if signed is None else tuple(names[i] for i in signed.tolist()),
                                  m_signed=None if r_signed is None else m[r_signed].numpy(), f_signed=f_signed,
                                  scores=scores.double().numpy()))
    if random_draws:
        mr = m[len(rows):].numpy()
        fr = np.stack([faithfulness(row, m_full, m_empty) for row in mr])
        ar = np.array([areas(row, grid, N) for row in fr])
        summary = np.array([curve_summary(row, grid) for row in fr])
        curves.append(MethodCurve("random", tuple(names[i] for i in randoms[0].tolist()), mr.mean(0), fr.mean(0),
                                  float(ar[:, 0].mean()), float(ar[:, 1].mean()), float(summary[:, 0].mean()),
                                  curve_summary(fr.mean(0), grid)[1],
                                  f_std=fr.std(0), cpr_std=float(ar[:, 0].std()), cmd_std=float(ar[:, 1].std()),
                                  mean_f_std=float(summary[:, 0].std()), draws=random_draws))

    overlap = []
    for ref_name, ref in (references or {}).items():
        for curve in curves:
            if curve.method == "random":
                continue
            for k in REPORT_SIZES:
                if k <= N:
                    overlap.append(Overlap(curve.method, ref_name, k, *top_k_overlap(curve.ranking, ref, k)))

    edge_level: dict[str, Any] = {}
    if check_tl:
        refusal = tl_edge_support(model)
        edge_level["supported"] = refusal is None
        if refusal is not None:
            edge_level["reason"] = refusal
        elif hasattr(trace, "graph"):  # a real trace (not a ranking's stub): its edges, scored by TransformerLens
            t = time.perf_counter()
            edge_level |= tl_edge_faithfulness(model, batch, trace)
            timings["edge_level"] = time.perf_counter() - t

    timings["evaluation"] = time.perf_counter() - t_start
    timings["passes"] = float(passes)
    return FaithfulnessResults(
        against=against, ablation="mean" if mean else "counterfactual", n_prompts=len(prompts), n_heads=N, sizes=grid,
        m_full=m_full, m_empty=m_empty, m_counterfactual=float(f_cf.double().mean()), methods=tuple(curves),
        overlap=tuple(overlap), attribution=attribution, edge_level=edge_level, timings=timings)


def counterfactual_prompts(prompts: PromptSet, tokenizer: Any, against: str, seed: int = 0) -> PromptSet:
    """The prompts with their counterfactuals: generated for the ioi prompts (`abc`, `flipped`), the file's own
    otherwise (`file`: every prompt must carry one)."""
    if against in ("file", "counterfactual"):
        missing = [i for i, p in enumerate(prompts) if p.counterfactual is None]
        if missing:
            raise EvaluationError(f"prompt {missing[0]} has no counterfactual text")
        return prompts
    from circuitlang.data.ioi import ioi_counterfactuals

    return ioi_counterfactuals(prompts, tokenizer, against, seed)


def traced_heads(trace: Any, min_count: int = 1) -> set[str]:
    """The heads of the traced circuit: those in a communication edge seen in at least min_count prompts."""
    heads = set()
    for up, down, data in trace.graph.edges(data=True):
        if data.get("count", 0) >= min_count and len(up) == 2 and up[1] >= 0 and len(down) == 3:
            heads.add(f"{up[0]}.{up[1]}")
            heads.add(f"{down[0]}.{down[1]}")
    return heads


def evaluate_plan(plan: Any, model: LoadedModel, prompts: PromptSet, trace: Any, progress: Progress | None = None,
                  logit_diff: Sequence[float] = ()) -> FaithfulnessResults | None:
    """The plan's `evaluate faithfulness` statement on a traced run (None when the plan has none); logit_diff:
    the run's clean F per prompt, where it has them (the clean pass is then not repeated for them)."""
    ev = plan.evaluate
    if ev is None:
        return None
    references = {"trace": traced_heads(trace, plan.show_min_count)}
    if plan.compare is not None:
        from circuitlang.data.ioi import known_heads

        known = plan.compare if isinstance(plan.compare, tuple) else tuple(h for hs in known_heads(plan.compare).values() for h in hs)
        references["known"] = set(known)
    cf = counterfactual_prompts(prompts, model.tokenizer, ev.against, plan.seed)
    found = evaluate_faithfulness(model, cf, trace, against=ev.against, mean=ev.mean, sizes=ev.sizes, rankings=ev.rankings,
                                  random_draws=ev.random, seed=plan.seed, references=references, check_tl=ev.check_tl,
                                  f_clean=logit_diff or None, progress=progress)
    if ev.edges is None:
        return found
    from circuitlang.engine.edge_circuits import edge_circuits

    return replace(found, edge_circuits=edge_circuits(model, prompts, trace, ev.edges, f_clean=logit_diff or None, progress=progress))
