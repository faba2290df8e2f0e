"""Edge circuits scored by SVT's own interventions (docs/method.md, "Edge circuits"; `evaluate ... edges K, ...`).

A traced firing (l, h) on (i, j) reads its signal through two subspaces of the head's input: span{u_k : k in
S_ij} of the query input at i (side d) and span{v_k} of the key input at j (side s). A *site* is one such
(prompt, head, side, token, offset); a site's signal is (P [r; 0])[:d], r the clean residual entering layer l
at the token, and the traced edge from head (l', b) carries its part (P [o; 0])[:d] (eq. 8; o its write there,
`intervene.group_signals`). The edge circuit of the top k edges of a ranking keeps, at every site of every
traced firing, the signals of the kept edges into it and ablates the rest of the site's signal: the local
intervention of section 5.4 applied to the complement, (kept - signal) / scale added to the head's query input
(side d) or key input (side s) at the site's token, q and k only (`intervene_deltas(..., qk_only=True)`), with
the clean run's signals and scales. m(k) is the mean F over the prompts, and

    f(k) = (m(k) - m_none) / (m_all - m_none)

with m_all every traced edge kept (the writers the trace did not keep, MLPs, embeddings, biases and dropped
heads, are still ablated in the firings' subspaces, so m_all is not the clean run's m) and m_none no edge kept.
An edge is a communication edge of the trace graph, (l', b) -> (l, h) at a token label; keeping it keeps it in
every prompt and firing where it was traced. Rankings: `influence` (the flow of the roots' influence through
the edge, `evaluate.influence_flows`, summed over prompts) and `count` (prompts, then total contribution).
The variants run stacked, partial passes from the lowest traced layer (`intervene.stacked_pass`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from circuitlang.data.prompts import PromptSet
from circuitlang.engine.results import Trace

if TYPE_CHECKING:
    from circuitlang.models.model import LoadedModel

EDGE_RANKINGS = ("influence", "count")
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class EdgeCurve:
    """One ranking's edge circuits at `EdgeCircuits.sizes`: edges "l'.b -> l.h@label", best first (up to the
    largest size asked for), m [S] the mean F and f [S] the faithfulness of each circuit."""

    ranking: str
    edges: tuple[str, ...]
    m: np.ndarray
    f: np.ndarray


@dataclass(frozen=True)
class EdgeCircuits:
    """Edge circuits of the trace kept by its own interventions (module docstring). sizes: edge counts k, from 0
    to n_edges (the trace graph's edges between heads); n_firings: traced firings, n_sites: their (side, token)
    subspaces intervened on; m_clean: the clean run's mean F; passes: the stacked forward passes run."""

    sizes: tuple[int, ...]
    n_edges: int
    n_firings: int
    n_sites: int
    n_prompts: int
    m_clean: float
    m_all: float
    m_none: float
    curves: tuple[EdgeCurve, ...]
    passes: int = 0
    timings: dict[str, float] = field(default_factory=dict, compare=False)

    def curve(self, ranking: str) -> EdgeCurve:
        return next(c for c in self.curves if c.ranking == ranking)

    @property
    def f_clean(self) -> float:
        """Where the clean run sits on the f axis (1 only if the untraced writers carry nothing in the subspaces)."""
        gap = self.m_all - self.m_none
        return (self.m_clean - self.m_none) / gap if gap != 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["curves"] = [{k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in asdict(c).items()} for c in self.curves]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EdgeCircuits:
        curves = tuple(EdgeCurve(c["ranking"], tuple(c["edges"]), np.asarray(c["m"], dtype=float), np.asarray(c["f"], dtype=float))
                       for c in data["curves"])
        return cls(**{**data, "sizes": tuple(data["sizes"]), "curves": curves})


# --- the trace's edges and sites (numpy) -------------------------------------------------------------------


def graph_edges(trace: Trace) -> tuple[list[tuple], np.ndarray]:
    """(keys, key_of_row): the trace graph's communication edges between heads, ((l', b), (l, h, label)) in
    first-seen order, and each edge row's index into them (-1 for writers other than heads)."""
    e = trace.edges
    index: dict[tuple, int] = {}
    key_of_row = np.full(len(e), -1, dtype=np.int64)
    for k, (p, ul, uh, l, h, t) in enumerate(zip(*(c.tolist() for c in (e.prompt, e.up_layer, e.up_head, e.layer, e.head, e.token)))):
        if uh >= 0:
            key_of_row[k] = index.setdefault(((ul, uh), (l, h, trace.labels[p][t])), len(index))
    return list(index), key_of_row


def edge_order(trace: Trace, prompts: PromptSet, keys: list[tuple], key_of_row: np.ndarray, ranking: str, n_layers: int,
               n_heads: int) -> np.ndarray:
    """Indices into `keys`, best first: by influence (the edge's summed flow, then count) or by count (prompts,
    then total contribution), ties in first-seen order."""
    count = np.array([trace.graph.edges[up, down]["count"] for up, down in keys], dtype=float)
    total = np.array([trace.graph.edges[up, down]["total"] for up, down in keys], dtype=float)
    first = np.arange(len(keys))
    if ranking == "count":
        return np.lexsort((first, -total, -count))
    if ranking != "influence":
        raise ValueError(f"unknown edge ranking {ranking!r}; edge rankings are {', '.join(EDGE_RANKINGS)}")
    from circuitlang.engine.evaluate import influence_flows

    flow = influence_flows(trace, prompts, n_layers, n_heads)[1]
    influence = np.zeros(len(keys))
    heads = key_of_row >= 0
    np.add.at(influence, key_of_row[heads], flow[heads])
    return np.lexsort((first, -count, -influence))


@dataclass(frozen=True)
class SitePlan:
    """The sites of every traced firing and the traced head edges into them, as two `intervene.GroupPlan`s:
    sites (their slices: the union of S_ij of the firings at the site) and pairs (site, upstream head), each
    pair with its site's slices; pair_site [Q]: its site, pair_key [Q]: its graph edge (`graph_edges`)."""

    sites: Any
    pairs: Any
    pair_site: np.ndarray
    pair_key: np.ndarray


def plan_sites(trace: Trace, key_of_row: np.ndarray, r: int, rotary: bool) -> SitePlan:
    import torch

    from circuitlang.engine.intervene import GroupPlan

    ev, e = trace.events, trace.edges
    site_of: dict[tuple, int] = {}
    masks: list[np.ndarray] = []
    for k, (p, l, h, i, j) in enumerate(zip(*(c.tolist() for c in (ev.prompt, ev.layer, ev.head, ev.dest, ev.src)))):
        for side, token in (("d", i), ("s", j)):
            s = site_of.setdefault((p, l, h, side, token, i - j if rotary else 0), len(site_of))
            if s == len(masks):
                masks.append(np.zeros(r, dtype=bool))
            masks[s][trace.events.slices[k]] = True
    pair_of: dict[tuple, int] = {}
    pair_key: list[int] = []
    for k in np.nonzero(key_of_row >= 0)[0].tolist():
        side, i, j = str(e.side[k]), int(e.dest[k]), int(e.src[k])
        site = site_of[int(e.prompt[k]), int(e.layer[k]), int(e.head[k]), side, i if side == "d" else j, i - j if rotary else 0]
        if pair_of.setdefault((site, int(e.up_layer[k]), int(e.up_head[k])), len(pair_of)) == len(pair_key):
            pair_key.append(int(key_of_row[k]))
    keys = list(site_of)
    column = lambda rows, c: torch.tensor([row[c] for row in rows], dtype=torch.long)  # noqa: E731
    mask = torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, r, dtype=torch.bool)
    sites = GroupPlan(column(keys, 0), torch.full((len(keys),), -1), torch.full((len(keys),), -1), column(keys, 1),
                      column(keys, 2), np.array([k[3] for k in keys], dtype=np.str_), column(keys, 4), column(keys, 5), mask, mask)
    pairs_site = np.array([s for s, _, _ in pair_of], dtype=np.int64)
    idx = torch.from_numpy(pairs_site)
    pairs = replace(sites.take(idx), up_layer=torch.tensor([u for _, u, _ in pair_of], dtype=torch.long),
                    up_head=torch.tensor([b for _, _, b in pair_of], dtype=torch.long))
    return SitePlan(sites, pairs, pairs_site, np.array(pair_key, dtype=np.int64))


# --- the evaluation (torch inside) ---------------------------------------------------------------------------


def edge_circuits(model: LoadedModel, prompts: PromptSet, trace: Trace, sizes: Sequence[int], *,
                  rankings: Sequence[str] = EDGE_RANKINGS, f_clean: Sequence[float] | None = None, batch_rows: int = 256,
                  partial: bool = True, progress: Progress | None = None) -> EdgeCircuits:
    """f(k) of the top-k edge circuits of each ranking, k in `sizes` (with 0 and every edge added; a k beyond the
    trace's edges is every edge): see the module docstring. partial=False runs every pass from the tokens (the
    same numbers). f_clean: the clean F per prompt where the run has it."""
    import torch

    from circuitlang.engine import intervene as iv
    from circuitlang.engine.forward import answer_ids, capture
    from circuitlang.models.geometry import attention_geometry

    t0 = time.perf_counter()
    geometry = attention_geometry(model)
    L, H = model.n_layers, model.n_heads
    keys, key_of_row = graph_edges(trace)
    N = len(keys)
    grid = tuple(sorted({0, N, *(min(int(k), N) for k in sizes)}))
    orders = {name: edge_order(trace, prompts, keys, key_of_row, name, L, H) for name in rankings}
    plan = plan_sites(trace, key_of_row, geometry.W_Q.shape[-1], geometry.rotary)
    sites, pairs = plan.sites, plan.pairs
    layers = sorted(set(sites.layer.tolist()))
    centre = iv._norm_centres(model)
    answers = answer_ids(prompts)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    acts = capture(model, prompts, resid_layers=layers, kv=partial)
    timings["capture"] = time.perf_counter() - t
    m_clean = float(np.mean(f_clean)) if f_clean is not None and len(f_clean) else float(acts.logit_diff.double().mean())
    # Each site's whole signal and each traced edge's part of it, in the downstream head's subspace (clean run).
    resid = torch.stack([acts.resid[layer][p, m].double() for layer, p, m in
                         zip(sites.layer.tolist(), sites.prompt.tolist(), sites.token.tolist())]) if len(sites) else torch.zeros(0, 1)
    signal = iv.project_writes(acts, geometry, sites, resid, (sites.slices,), centre)[0] if len(sites) else resid
    parts = (iv.project_writes(acts, geometry, pairs, iv.upstream_writes(acts, geometry, pairs, pairs.prompt), (pairs.slices,),
                               centre)[0] if len(pairs) else torch.zeros(0, signal.shape[-1], dtype=torch.float64))
    scale = acts.scale[sites.layer, sites.prompt, sites.token].float() if len(sites) else torch.zeros(0)

    # The variants: each distinct kept set of (site, edge) pairs once, whatever rankings and sizes share it.
    kept_of: dict[bytes, np.ndarray] = {}
    variant_of: dict[tuple[str, int], bytes] = {}
    for name, order in orders.items():
        rank = np.empty(N, dtype=np.int64)
        rank[order] = np.arange(N)
        for k in grid:
            kept = rank[plan.pair_key] < k
            variant_of[name, k] = kept.tobytes()
            kept_of.setdefault(kept.tobytes(), kept)
    variants = list(kept_of)
    groups = []
    for v in variants:
        kept = torch.from_numpy(kept_of[v])
        h = torch.zeros_like(signal).index_add_(0, torch.from_numpy(plan.pair_site)[kept], parts[kept]) - signal
        groups.append(iv.EdgeGroups(**{f: getattr(sites, f) for f in sites.__dataclass_fields__}, h=h.float(),
                                    h_random=torch.zeros_like(h, dtype=torch.float32), scale=scale))

    # Stacked passes from the lowest traced layer and each batch's first intervened position.
    ids = np.arange(len(prompts))
    lengths = acts.lengths.numpy()
    firsts = np.minimum(iv.first_changes(sites, ids), lengths - 1) if len(sites) else lengths - 1
    resume = partial and model.family.resumable and acts.kv is not None
    start = layers[0] if partial and model.family.resumable and layers else 0
    f_rows = np.zeros((len(variants), len(prompts)))
    passes = 0
    t = time.perf_counter()
    batches = iv.pass_batches(firsts, max(1, batch_rows))
    per_pass = max(1, batch_rows // max(len(b) for b in batches)) if batches else 1
    total = len(batches) * -(-len(variants) // per_pass)
    n = acts.tokens.shape[1]  # the pass's length (see intervene.stacked_pass)
    for batch in batches:
        local = torch.from_numpy(batch)
        first = int(firsts[batch[0]]) if resume else 0
        for at in range(0, len(variants), per_pass):
            chunk = range(at, min(at + per_pass, len(variants)))
            deltas = [iv.intervention_deltas(model, geometry, groups[v], "boost", "local", "signal", batch.tolist(), n, first,
                                             qk_only=True) for v in chunk]
            f_after, _ = iv.stacked_pass(model, acts, deltas, batch, local, start, first, answers, prompts.metric)
            f_rows[at : at + len(chunk), batch] = f_after.reshape(len(chunk), len(batch))
            passes += 1
            if progress is not None:
                progress("edge circuits", passes, total)
    timings["passes"] = time.perf_counter() - t
    m_of = dict(zip(variants, f_rows.mean(1)))
    m_all, m_none = float(m_of[variant_of[rankings[0], N]]), float(m_of[variant_of[rankings[0], 0]])
    gap = m_all - m_none
    curves = []
    for name, order in orders.items():
        m = np.array([m_of[variant_of[name, k]] for k in grid])
        f = (m - m_none) / gap + 0.0 if gap != 0 else np.full(len(m), np.nan)  # + 0.0: no -0.0 at k = 0
        label = lambda q: "{}.{} -> {}.{}@{}".format(*keys[q][0], *keys[q][1])  # noqa: E731
        curves.append(EdgeCurve(name, tuple(label(q) for q in order[: max(grid)].tolist()), m, f))
    timings["edge_circuits"] = time.perf_counter() - t0
    return EdgeCircuits(grid, N, len(trace.events), len(sites), len(prompts), m_clean, m_all, m_none, tuple(curves), passes, timings)
