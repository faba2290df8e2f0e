"""A straightforward per-pair reference implementation of Singular Vector Tracing, for the benchmark.

Written the way a first implementation (and the paper authors' own code) would be, and computing the same
outputs as the engine's `trace`: the firing statistics of every head (Figs. 2-3) and the walk of
Algorithm 1 with its graph (Fig. 5). Arithmetic is float64 numpy.

1. Omega is built dense, (d+1) x (d+1), for every head and decomposed with `torch.linalg.svd`, once per
   head.
2. Firing statistics, as the authors' data-collection script (`full_tracing_data_collection.py`) loops:
   over prompts, layers, heads, dest tokens and src tokens; per pair it checks firing, and per firing
   pair it computes the r slice terms from x~_i, x~_j and that head's U, S, V, and S_ij. It counts the
   firing events, the |S_ij| of each and how often each slice is in S_ij (their script also computes
   every upstream contribution of every firing event; this one does not).
3. The walk: per prompt, Algorithm 1 recurses from each root with a visited set (memoisation). For each
   firing event it reaches it decomposes the event again (step 2 keeps only the statistics), takes the
   signed sqrt(sigma) weights, then loops over every upstream head, computing its output z @ W_O at the
   token and its contribution eq. (8) divided by the downstream LayerNorm scale, and selects by the
   mass rule; edges are listed in the order the depth-first walk finds them.

It reads only the cached activations and the bridge's weights (not the engine's geometry, slices or
decomposition code) and implements the engine's definitions independently, so the two are a check on
each other:

- firing (section 4.3): attention A_ij > threshold, src j != 0, model score > 0, both tokens inside the
  prompt (attention is causal, so src <= dest);
- S_ij (section 4.1): drop the largest set of slice terms whose sum is <= 0, i.e. the longest tail of
  the terms sorted by decreasing value that sums to <= 0;
- signs (appendix): u_k oriented to a positive inner product with x~_i, v_k flipped with it; weights
  sign_k sqrt(sigma_k) for k in S_ij;
- eq. (8): c = sum_k w_k u_k . o / scale_i (v_k and scale_j through the source), o = z W_O of the upstream
  head at that token, the homogeneous coordinate of u_k, v_k dropped (o carries no homogeneous 1);
- selection (section 5.3): sorted decreasing, keep up to the first position where the running sum
  exceeds mass x (sum of all contributions), and every contribution tied with that one;
- recursion (Algorithm 1, lines 18-27): into every firing of a selected upstream head whose destination
  is the token it was selected through; each event is computed once per prompt.

The aggregation over prompts is the engine's own `graph.aggregate` (the comparison is about the tracing);
it does not depend on the order of the edge rows, so the reference's depth-first order gives the same graph.
Only GPT-2-style models (no rotary positions, no q/k or post-attention norms) are supported.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Sequence

import networkx as nx
import numpy as np
import torch

from circuitlang.data.prompts import PromptSet
from circuitlang.engine.forward import Activations
from circuitlang.engine.graph import aggregate
from circuitlang.engine.results import WRITER_CLASSES, FiringStats, TracedEdges, TracedEvents
from circuitlang.lang.plan import Root

# Per-prompt fields of Activations and the axis that indexes prompts.
_PROMPT_AXIS = {
    "tokens": 0, "lengths": 0, "x": 1, "scale": 1, "pattern": 1, "scores": 1, "z": 0, "final_scale": 0,
    "logit_diff": 0, "q_scale": 1, "k_scale": 1, "post_scale": 1, "embed": 0, "mlp_out": 1,
}


def first_prompts(acts: Activations, k: int) -> Activations:
    """The activations of the first `k` prompts (same padding; `lengths` masks it)."""
    sliced = {}
    for name, axis in _PROMPT_AXIS.items():
        value = getattr(acts, name)
        if value is not None:
            sliced[name] = value.narrow(axis, 0, k).clone()
    return replace(acts, **sliced)


@dataclass
class ReferenceResult:
    events: TracedEvents
    edges: TracedEdges
    graph: nx.DiGraph
    firing: FiringStats
    timings: dict[str, float] = field(default_factory=dict)


def omega_svd(model, heads: Sequence[tuple[int, int]] | None = None) -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(layer, head) -> (U [(d+1), r], S [r], V [(d+1), r]): the dense Omega of eq. (2), torch.linalg.svd.

    Every head, or only `heads`."""
    b = model.bridge
    W_Q, b_Q = b.W_Q.detach().double().cpu(), b.b_Q.detach().double().cpu()
    W_K, b_K = b.W_K.detach().double().cpu(), b.b_K.detach().double().cpu()
    L, H, d, r = W_Q.shape
    if W_K.shape[1] != H:
        raise ValueError("the reference supports GPT-2-style models only (one key head per query head)")
    out = {}
    for layer, head in heads if heads is not None else [(l, h) for l in range(L) for h in range(H)]:
        wq, bq, wk, bk = W_Q[layer, head], b_Q[layer, head], W_K[layer, head], b_K[layer, head]
        omega = torch.zeros(d + 1, d + 1, dtype=torch.float64)
        omega[:d, :d] = wq @ wk.T
        omega[:d, d] = wq @ bk
        omega[d, :d] = bq @ wk.T
        omega[d, d] = bq @ bk
        U, S, Vh = torch.linalg.svd(omega)
        out[layer, head] = (U[:, :r].numpy(), S[:r].numpy(), Vh[:r].T.numpy())
    return out


def sparse_set(terms: np.ndarray) -> list[int]:
    """S_ij: the slices outside the largest set of terms whose sum is <= 0, by decreasing term."""
    order = sorted(range(len(terms)), key=lambda k: terms[k], reverse=True)
    size, tail = len(order), 0.0
    for m in range(len(order) - 1, -1, -1):  # tail = sum of the sorted terms from m on
        tail += terms[order[m]]
        if tail <= 0:
            size = m
    return order[:size]


def select(contributions: list[float], mass: float) -> list[int]:
    """Indices of the smallest set of contributions holding `mass` of their sum (ties with the last kept)."""
    ranked = sorted(contributions, reverse=True)
    target = mass * sum(contributions)
    running, cutoff = 0.0, ranked[-1]
    for c in ranked:
        running += c
        if running > target:
            cutoff = c
            break
    return [k for k, c in enumerate(contributions) if c >= cutoff]


def decompose(xi: np.ndarray, xj: np.ndarray, U: np.ndarray, S: np.ndarray, V: np.ndarray):
    """One event from x~_i, x~_j (with the homogeneous 1): (slice terms [r], S_ij, x~_i U [r], x~_j V [r])."""
    xu, xv = xi @ U, xj @ V
    terms = xu * S * xv  # the r slice terms; they sum to A'_ij
    return terms, sparse_set(terms), xu, xv


def reference_trace(
    model,
    prompts: PromptSet,
    roots: Sequence[Root],
    acts: Activations,
    threshold: float = 0.5,
    mass: float = 0.7,
    authors: bool = False,
) -> ReferenceResult:
    """Singular Vector Tracing of `prompts` (the first len(prompts) prompts of `acts`) from `roots`.

    authors=True reads eq. (8) as the authors' released code does: the upstream write with a homogeneous
    1 appended, [o; 1], the whole reading divided by the LayerNorm scale; and builds the graph as their
    graph code does (`authors_graph`), not with the engine's aggregation.

    Returns the engine's outputs: the firing statistics of every head, the traced events and edges, and
    the graph. timings: "svd" (step 1), "stats" (step 2), "walk" (step 3), "graph" (aggregation).
    """
    if any(getattr(acts, f) is not None for f in ("q_scale", "k_scale", "post_scale", "cos")):
        raise ValueError("the reference supports GPT-2-style models only (no rotary positions or extra norms)")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    svd = omega_svd(model)
    timings["svd"] = time.perf_counter() - t0

    P = len(prompts)
    x = acts.x[:, :P].double().numpy()  # [L, P, n, d]
    scale = acts.scale[:, :P].double().numpy()  # [L, P, n]
    pattern = acts.pattern[:, :P].numpy()  # [L, P, H, n, n], float32 as cached
    scores = acts.scores[:, :P].numpy()
    z = acts.z[:P].double().numpy()  # [P, n, L, H, r]
    W_O = model.bridge.W_O.detach().double().cpu().numpy()  # [L, H, r, d]
    lengths = acts.lengths[:P].tolist()
    L, _, H, n, _ = pattern.shape
    d = x.shape[-1]
    r = W_O.shape[2]

    def fires(p: int, layer: int, head: int, dest: int, src: int) -> bool:
        return (src != 0 and dest < lengths[p] and src < lengths[p]
                and pattern[layer, p, head, dest, src] > threshold and scores[layer, p, head, dest, src] > 0)

    # Step 2: the firing statistics, every (prompt, layer, head, dest, src) pair.
    t0 = time.perf_counter()
    counts = np.zeros((L, H), dtype=np.int64)
    sizes: list[list[list[int]]] = [[[] for _ in range(H)] for _ in range(L)]
    usage = np.zeros((L, H, r), dtype=np.int64)
    for p in range(P):
        for layer in range(L):
            for head in range(H):
                U, S, V = svd[layer, head]
                for dest in range(lengths[p]):
                    for src in range(1, dest + 1):
                        if not fires(p, layer, head, dest, src):
                            continue
                        xi = np.append(x[layer, p, dest], 1.0)
                        xj = np.append(x[layer, p, src], 1.0)
                        _, chosen, _, _ = decompose(xi, xj, U, S, V)
                        counts[layer, head] += 1
                        sizes[layer][head].append(len(chosen))
                        usage[layer, head, chosen] += 1
    firing = FiringStats(counts=counts, slice_usage=usage,
                         slice_counts=tuple(tuple(np.array(s, dtype=np.int64) for s in row) for row in sizes))
    timings["stats"] = time.perf_counter() - t0

    # Step 3: the walk of Algorithm 1, depth first from each root, per prompt.
    t0 = time.perf_counter()
    events: list[tuple] = []
    edges: list[tuple] = []
    kept: dict[tuple, list[tuple]] = {}  # (prompt, layer, head, dest, src) -> its edges, s side first (authors=True)
    for p in range(P):
        visited: set[tuple[int, int, int, int]] = set()

        def svt(layer: int, head: int, dest: int, src: int) -> None:
            if (layer, head, dest, src) in visited or not fires(p, layer, head, dest, src):
                return
            visited.add((layer, head, dest, src))
            U, S, V = svd[layer, head]
            xi = np.append(x[layer, p, dest], 1.0)
            xj = np.append(x[layer, p, src], 1.0)
            terms, chosen, xu, xv = decompose(xi, xj, U, S, V)
            weights = np.array([(-1.0 if xu[k] < 0 else 1.0) * math.sqrt(S[k]) for k in chosen])
            event = len(events)
            events.append((p, layer, head, dest, src, float(terms.sum()), float(pattern[layer, p, head, dest, src]),
                           len(chosen), np.array(chosen), float(weights @ xu[chosen]), float(weights @ xv[chosen])))
            if layer == 0:
                return
            chosen_edges = {}
            for side, token, vectors in (("d", dest, U), ("s", src, V)):
                reader = vectors[:, chosen] @ weights  # sum_k w_k u_k, homogeneous coordinate last
                contributions = []
                for up_layer in range(layer):
                    for up_head in range(H):
                        o = z[p, token, up_layer, up_head] @ W_O[up_layer, up_head]
                        # the appendix's [o; 0] drops the homogeneous coordinate; the authors' code appends a 1
                        read = reader @ np.append(o, 1.0) if authors else reader[:d] @ o
                        contributions.append(float(read) / scale[layer, p, token])
                chosen_edges[side] = [(divmod(k, H), contributions[k]) for k in select(contributions, mass)]
                for (up_layer, up_head), c in chosen_edges[side]:
                    edges.append((event, p, up_layer, up_head, layer, head, dest, src, side, c))
                    for up_src in range(token + 1):
                        svt(up_layer, up_head, token, up_src)
            kept[p, layer, head, dest, src] = [(side, up, c) for side in ("s", "d") for up, c in chosen_edges[side]]

        for root in roots:
            svt(root.layer, root.head, prompts[p].role(root.dest), prompts[p].role(root.src))
    timings["walk"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ev = _events_table(events)
    ed = _edges_table(edges)
    labels = tuple(p.labels for p in prompts)
    if authors:
        graph = authors_graph(kept, prompts, roots, labels, firing.counts, ev)
    else:
        graph = aggregate(ev, ed, labels, firing.counts)
    timings["graph"] = time.perf_counter() - t0
    return ReferenceResult(ev, ed, graph, firing, timings)


def authors_graph(kept: dict[tuple, list[tuple]], prompts: PromptSet, roots: Sequence[Root], labels, firing_counts,
                  events: TracedEvents) -> nx.DiGraph:
    """The graph as the authors' graph code builds it from the same events and kept edges.

    Per prompt and root, their walk recurses without memo (an event reached by two paths is walked twice)
    and lists each event's s-side edges, then its d-side edges, then recurses into the s side's heads and
    the d side's. Each listed edge is added in order: a new edge gets count 1, its contribution as total and
    its side as type, and remembers the prompt; a listed edge whose remembered prompt differs adds 1 and its
    contribution (the remembered prompt is never updated); otherwise nothing. An attention edge gets the
    same additions as the edges into its token."""
    graph = nx.DiGraph()
    first_prompt: dict[tuple, int] = {}

    def walk(p, layer, head, dest, src) -> list[tuple]:
        if (p, layer, head, dest, src) not in kept:
            return []
        listed = [(side, up, c, layer, head, dest, src) for side, up, c in kept[p, layer, head, dest, src]]
        for side, up, _ in kept[p, layer, head, dest, src]:
            token = dest if side == "d" else src
            for up_src in range(token + 1):
                listed += walk(p, *up, token, up_src)
        return listed

    for p, prompt in enumerate(prompts):
        for root in roots:
            for side, up, c, layer, head, dest, src in walk(p, root.layer, root.head, prompt.role(root.dest), prompt.role(root.src)):
                down = (layer, head, labels[p][dest if side == "d" else src])
                if not graph.has_edge(up, down):
                    graph.add_edge(up, down, kind="communication", type=side, count=1, total=c)
                    first_prompt[up, down] = p
                    added = 1
                elif first_prompt[up, down] != p:
                    graph.edges[up, down]["count"] += 1
                    graph.edges[up, down]["total"] += c
                    added = 1
                else:
                    added = 0
                if not graph.has_edge(down, down[:2]):
                    graph.add_edge(down, down[:2], kind="attention", count=1)
                else:
                    graph.edges[down, down[:2]]["count"] += added
    for _, _, data in graph.edges(data=True):
        if data["kind"] == "communication":
            data["mean"] = data["total"] / data["count"]
    traced = {}
    for l, h in zip(events.layer.tolist(), events.head.tolist()):
        traced[l, h] = traced.get((l, h), 0) + 1
    graph.add_nodes_from(traced)
    for node in graph.nodes:
        graph.nodes[node].update({"kind": "head", "firing": int(firing_counts[node]), "traced": traced.get(node, 0)}
                                 if len(node) == 2 else {"kind": "token"})
    return graph


def _events_table(events: list[tuple]) -> TracedEvents:
    cols = list(zip(*events)) if events else [()] * 11
    ints = lambda c: np.array(c, dtype=np.int64)  # noqa: E731
    floats = lambda c: np.array(c, dtype=np.float64)  # noqa: E731
    unsplit = np.full((len(cols[0]), len(WRITER_CLASSES)), np.nan)  # the reference does not split the signal
    return TracedEvents(prompt=ints(cols[0]), layer=ints(cols[1]), head=ints(cols[2]), dest=ints(cols[3]),
                        src=ints(cols[4]), score=floats(cols[5]), attention=floats(cols[6]), n_slices=ints(cols[7]),
                        slices=tuple(cols[8]), signal_dest=floats(cols[9]), signal_src=floats(cols[10]),
                        split_dest=unsplit, split_src=unsplit, residual=unsplit[:, 0], position=unsplit[:, 0])


def _edges_table(edges: list[tuple]) -> TracedEdges:
    cols = list(zip(*edges)) if edges else [()] * 10
    ints = lambda c: np.array(c, dtype=np.int64)  # noqa: E731
    return TracedEdges(event=ints(cols[0]), prompt=ints(cols[1]), up_layer=ints(cols[2]), up_head=ints(cols[3]),
                       layer=ints(cols[4]), head=ints(cols[5]), dest=ints(cols[6]), src=ints(cols[7]),
                       side=np.array(cols[8], dtype=np.str_), contribution=np.array(cols[9], dtype=np.float64))


# --- Comparison -----------------------------------------------------------------------------------


def compare_firing(a: FiringStats, b: FiringStats) -> tuple[list[str], list[tuple[int, int]]]:
    """Differences between two FiringStats, exactly: counts equal, |S_ij| equal per head as multisets (the
    order of the events within a head is not part of the statistics), slice_usage equal.

    Returns the problems and the heads (layer, head) whose slice_counts or slice_usage differ."""
    problems: list[str] = []
    differing: set[tuple[int, int]] = set()
    if a.counts.shape != b.counts.shape or not np.array_equal(a.counts, b.counts):
        bad = np.argwhere(a.counts != b.counts).tolist() if a.counts.shape == b.counts.shape else "shapes"
        problems.append(f"firing counts differ (layer, head): {bad[:5] if isinstance(bad, list) else bad}")
    heads = [(l, h) for l in range(len(a.slice_counts)) for h in range(len(a.slice_counts[l]))]
    if len(b.slice_counts) != len(a.slice_counts) or any(len(b.slice_counts[l]) != len(a.slice_counts[l]) for l in range(len(a.slice_counts))):
        problems.append("slice_counts: different numbers of layers or heads")
    else:
        bad = [(l, h) for l, h in heads
               if not np.array_equal(np.sort(a.slice_counts[l][h]), np.sort(b.slice_counts[l][h]))]
        differing.update(bad)
        if bad:
            l, h = bad[0]
            sa, sb = np.sort(a.slice_counts[l][h]), np.sort(b.slice_counts[l][h])
            detail = (f"{len(sa)} vs {len(sb)} events" if len(sa) != len(sb)
                      else f"{int((sa != sb).sum())} of {len(sa)} sorted sizes differ")
            problems.append(f"slice_counts (|S_ij| per head, as multisets) differ on {len(bad)} heads, e.g. {l}.{h}: {detail}")
    if a.slice_usage.shape != b.slice_usage.shape or not np.array_equal(a.slice_usage, b.slice_usage):
        if a.slice_usage.shape == b.slice_usage.shape:
            bad = [tuple(lh) for lh in np.argwhere((a.slice_usage != b.slice_usage).any(-1)).tolist()]
            differing.update(bad)
            diff = np.abs(a.slice_usage - b.slice_usage).sum()
            problems.append(f"slice_usage differs on {len(bad)} heads {bad[:5]} (total absolute difference {diff})")
        else:
            problems.append("slice_usage: different shapes")
    return problems, sorted(differing)


def compare(engine, ref: ReferenceResult, rtol: float = 1e-4) -> dict:
    """Compare the engine's Trace with the reference: firing statistics, graph, then events (diagnostics).

    The firing statistics agree when they are equal exactly (`compare_firing`). The graphs agree when
    they have the same communication edges with the same type and count, totals equal to `rtol`
    relative, the same attention edges and counts, and the same head node attributes.
    Returns {"equal": bool (both), "firing_equal", "graph_equal", "problems": [str], and sizes and the
    worst relative total difference}.
    """
    firing_problems, firing_heads = compare_firing(engine.firing, ref.firing)
    problems: list[str] = []
    ga, gb = engine.graph, ref.graph

    def comm(g):
        return {(u, v): d for u, v, d in g.edges(data=True) if d["kind"] == "communication"}

    def attn(g):
        return {(u, v): d["count"] for u, v, d in g.edges(data=True) if d["kind"] == "attention"}

    ca, cb = comm(ga), comm(gb)
    for key in sorted(set(ca) - set(cb)):
        problems.append(f"communication edge {key} only in the engine's graph ({ca[key]})")
    for key in sorted(set(cb) - set(ca)):
        problems.append(f"communication edge {key} only in the reference's graph ({cb[key]})")
    worst = 0.0
    for key in sorted(set(ca) & set(cb)):
        a, b = ca[key], cb[key]
        if a["count"] != b["count"]:
            problems.append(f"edge {key}: count {a['count']} (engine) != {b['count']} (reference)")
        if a["type"] != b["type"]:
            problems.append(f"edge {key}: type {a['type']} (engine) != {b['type']} (reference)")
        rel = abs(a["total"] - b["total"]) / max(abs(a["total"]), abs(b["total"]), 1e-30)
        worst = max(worst, rel)
        if rel > rtol:
            problems.append(f"edge {key}: total {a['total']:.8g} (engine) vs {b['total']:.8g} (reference), rel {rel:.2e}")
    aa, ab = attn(ga), attn(gb)
    if aa != ab:
        diff = sorted(set(aa.items()) ^ set(ab.items()))
        problems.append(f"attention edges differ: {diff[:5]}{' ...' if len(diff) > 5 else ''}")
    heads_a = {n: (d.get("firing"), d.get("traced")) for n, d in ga.nodes(data=True) if d.get("kind") == "head"}
    heads_b = {n: (d.get("firing"), d.get("traced")) for n, d in gb.nodes(data=True) if d.get("kind") == "head"}
    if heads_a != heads_b:
        diff = sorted(set(heads_a.items()) ^ set(heads_b.items()))
        problems.append(f"head nodes (firing, traced) differ: {diff[:5]}{' ...' if len(diff) > 5 else ''}")

    # Diagnostics on the raw tables, to point at the first differing event when the graphs differ.
    ea, eb = engine.events, ref.events
    ka = {k: e for e, k in enumerate(zip(ea.prompt.tolist(), ea.layer.tolist(), ea.head.tolist(), ea.dest.tolist(), ea.src.tolist()))}
    kb = {k: e for e, k in enumerate(zip(eb.prompt.tolist(), eb.layer.tolist(), eb.head.tolist(), eb.dest.tolist(), eb.src.tolist()))}
    if set(ka) != set(kb):
        only_a, only_b = sorted(set(ka) - set(kb)), sorted(set(kb) - set(ka))
        problems.append(f"traced events differ: {len(only_a)} only in the engine {only_a[:3]}, "
                        f"{len(only_b)} only in the reference {only_b[:3]} (prompt, layer, head, dest, src)")
    slice_diffs = [k for k in set(ka) & set(kb) if sorted(ea.slices[ka[k]].tolist()) != sorted(eb.slices[kb[k]].tolist())]
    if slice_diffs:
        k = sorted(slice_diffs)[0]
        problems.append(f"S_ij differs on {len(slice_diffs)} events, e.g. {k}: engine {sorted(ea.slices[ka[k]].tolist())} "
                        f"reference {sorted(eb.slices[kb[k]].tolist())}")
    return {
        "equal": not problems and not firing_problems,
        "firing_equal": not firing_problems,
        "graph_equal": not problems,
        "firing_heads": firing_heads,
        "counts_equal": engine.firing.counts.shape == ref.firing.counts.shape
                        and bool(np.array_equal(engine.firing.counts, ref.firing.counts)),
        "problems": firing_problems + problems,
        "firing_events": int(engine.firing.counts.sum()),
        "reference_firing_events": int(ref.firing.counts.sum()),
        "communication_edges": len(ca),
        "attention_edges": len(aa),
        "events": len(ka),
        "edges": len(engine.edges),
        "reference_edges": len(ref.edges),
        "max_rel_total_diff": worst,
    }
