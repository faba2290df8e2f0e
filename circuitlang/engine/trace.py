"""Singular Vector Tracing (section 4.2, Algorithm 1), batched over events and walked top-down by layer.

Algorithm 1 recurses from a firing into each selected upstream head that fires with the same token as
its destination. Upstream heads sit in strictly lower layers, so the recursion is a walk down the layers:
at layer l every event wanted so far is decomposed in one batch, its upstream heads are selected, and
the firings they lead to are marked wanted in lower layers. Each event is computed once (memoised by
the `wanted` mask), weights are projected onto the slices once per head, and no residual stream is
copied per event.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from circuitlang.data.prompts import PromptSet
from circuitlang.engine import decompose as dc
from circuitlang.engine.forward import Activations, capture
from circuitlang.engine.omega_cache import cached_layer_slices, cached_pair_slices
from circuitlang.models.geometry import AttentionGeometry, attention_geometry
from circuitlang.engine.graph import aggregate
from circuitlang.models.model import LoadedModel
from circuitlang.engine.omega import OmegaSlices
from circuitlang.engine.results import BIAS, EMBED, MLP, WRITER_CLASSES, FiringStats, Trace, TraceConfig, TracedEdges, TracedEvents
from circuitlang.lang.plan import Readings, Root, RootSet, SliceRule, parse_root, root_heads

Progress = Callable[[str, int, int], None]

EVENT_CHUNK = 2048  # events per GEMM batch; bounds memory at chunk x layers x heads x d_head floats
STATS_TOKENS = 64
"""Prompts of at most this many positions have every firing event decomposed for the firing statistics (Omega
cores for every head and offset: at most 64 x H a layer); longer ones decompose the events the walk reaches
only, so that rotary models compute the cores of the offsets traced events use and no others (at 1,024 tokens
Gemma 3 270M's firings used ~7,000 (layer, head, offset) pairs, 7.6 GB of cores and 14x the forward pass)."""


class TraceError(ValueError):
    """A trace request that cannot run (bad root, role missing from the prompts)."""


def slices_for(geometry: AttentionGeometry, acts: Activations, layer: int, heads: Tensor | None = None,
               offsets: Tensor | None = None, dtype: torch.dtype = torch.float64) -> OmegaSlices:
    """Omega's slices of `layer` (cached in CLI runs). Rotary models: one core per offset 0..n-1 for every head,
    or, given events' heads and offsets [E], for those (head, offset) pairs only, in `dtype`."""
    if not geometry.rotary:
        return cached_layer_slices(geometry, layer)
    if heads is None:
        return cached_layer_slices(geometry, layer, acts.cos[layer], acts.sin[layer])
    return cached_pair_slices(geometry, layer, heads, offsets, acts.cos[layer], acts.sin[layer], dtype)


@dataclass(frozen=True)
class LayerDecomposition:
    """Every firing event of one layer: indices, slice terms, S_ij, and the token coordinates.

    xu_dest, xv_src [E, r]: x~_i . u_k and v_k . x~_j; q_scale, k_scale [E]: the q/k norm scales of
    the two tokens (ones without q/k norms); offset [E]: i - j, which picks the Omega of rotary models
    (`OmegaSlices.index`).
    """

    prompt: Tensor
    head: Tensor
    dest: Tensor
    src: Tensor
    offset: Tensor
    terms: Tensor
    mask: Tensor
    order: Tensor
    xu_dest: Tensor
    xv_src: Tensor
    q_scale: Tensor
    k_scale: Tensor


def decompose_layer(acts: Activations, slices: OmegaSlices, fires: Tensor, layer: int, rule: SliceRule) -> LayerDecomposition:
    """Slice terms and S_ij for every firing event of `layer` (fires: [P, H, n, n]); section 4.1."""
    return decompose_events(acts, slices, *fires.nonzero(as_tuple=True), layer, rule)


def decompose_events(acts: Activations, slices: OmegaSlices, p: Tensor, a: Tensor, i: Tensor, j: Tensor, layer: int,
                     rule: SliceRule) -> LayerDecomposition:
    """`decompose_layer` for the events (prompt p, head a, dest i, src j) [E] of `layer`."""
    x = acts.x[layer]
    Q_a, Q_b, U, S, V = (t.to(x.dtype) for t in (slices.Q_a, slices.Q_b, slices.U, slices.S, slices.V))
    m = i - j
    h, k = slices.index(a, m)
    xu = dc.through_cores(dc.project_tokens(x, Q_a)[p, a, i], U, h, k)
    xv = dc.through_cores(dc.project_tokens(x, Q_b)[p, a, j], V, h, k)
    ones = torch.ones(len(p), dtype=x.dtype)
    sq = acts.q_scale[layer, p, a, i] if acts.q_scale is not None else ones
    sk = acts.k_scale[layer, p, a, j] if acts.k_scale is not None else ones
    terms = dc.slice_terms(xu, S[h, k], xv, 1.0 / (sq * sk))
    mask, order = dc.sparse_set(terms, rule)
    return LayerDecomposition(p, a, i, j, m, terms, mask, order, xu, xv, sq, k_scale=sk)


@dataclass(frozen=True)
class EventSignals:
    """For a batch of events of one layer: the weights of eq. (8) turned into residual-space readers.

    dir_* [E, d] and homog_* [E]: a writer o of the dest (src) token contributes dir . o, and the
    homogeneous coordinate homog; signal_* [E]: the whole sqrt(sigma)-weighted signal of the token.
    """

    dir_d: Tensor
    homog_d: Tensor
    signal_d: Tensor
    dir_s: Tensor
    homog_s: Tensor
    signal_s: Tensor


def event_signals(acts: Activations, slices: OmegaSlices, dec: LayerDecomposition, rows: Tensor, layer: int) -> EventSignals:
    Q_a, Q_b, U, S, V = (t.to(acts.x.dtype) for t in (slices.Q_a, slices.Q_b, slices.U, slices.S, slices.V))
    p, a, i, j, m = dec.prompt[rows], dec.head[rows], dec.dest[rows], dec.src[rows], dec.offset[rows]
    xu, xv, sq, sk = dec.xu_dest[rows], dec.xv_src[rows], dec.q_scale[rows], dec.k_scale[rows]
    h, k = slices.index(a, m)
    w = dc.slice_weights(dec.mask[rows], xu, S[h, k])
    w_d = dc.through_cores(w, U, h, k, transpose=True) / sq[:, None]
    w_s = dc.through_cores(w, V, h, k, transpose=True) / sk[:, None]
    dir_d, homog_d = dc.signal_directions(w_d, a, Q_a, acts.scale[layer, p, i])
    dir_s, homog_s = dc.signal_directions(w_s, a, Q_b, acts.scale[layer, p, j])
    return EventSignals(dir_d, homog_d, (w * xu).sum(-1) / sq, dir_s, homog_s, (w * xv).sum(-1) / sk)


def upstream_contributions(acts: Activations, W_O: Tensor, direction: Tensor, prompt: Tensor, token: Tensor, layer: int) -> Tensor:
    """[E, layer, H]: eq. (8) for every head below `layer`, read at each event's token."""
    post = acts.post_scale[:layer, prompt, token].T if acts.post_scale is not None else None
    return dc.head_contributions(direction, W_O[:layer], acts.z[prompt, token, :layer], post)


@dataclass(frozen=True)
class SideWriters:
    """One token side of a batch of events of one layer: eq. (8) for each writer an edge may come from.

    candidates [E, m]: the writers the mass rule chooses among (heads first, then the `sources` asked
    for), with ids up_layer, up_head [m] (results.MLP, BIAS, EMBED for writers that are not heads);
    split [E, 5]: the token's signal by writer class (results.WRITER_CLASSES), summing to the signal.
    """

    candidates: Tensor
    up_layer: Tensor
    up_head: Tensor
    split: Tensor


def side_writers(acts: Activations, geometry: AttentionGeometry, direction: Tensor, homog: Tensor, signal: Tensor,
                 prompt: Tensor, token: Tensor, layer: int, readings: Readings, writers: Sequence[str]) -> SideWriters:
    """Contributions of the writers below `layer` to each event's signal at `token` (direction, homog from
    `event_signals`), read as `readings` says (docs/method.md, "Readings of the paper")."""
    E, H = len(prompt), geometry.W_O.shape[1]
    post = acts.post_scale[:layer, prompt, token].T if acts.post_scale is not None else None
    heads = upstream_contributions(acts, geometry.W_O, direction, prompt, token, layer)  # [E, layer, H]
    b_O = geometry.b_O[:layer]
    if readings.value == "head" and geometry.value_out is not None:  # (b): eq. (4), the bias is the head's
        heads = heads + dc.bias_contributions(direction, geometry.value_out[:layer], post)
        b_O = b_O - geometry.value_out[:layer].sum(1)
    bias = dc.bias_contributions(direction, b_O, post)  # [E, layer]
    embed = (acts.embed[prompt, token] * direction).sum(-1)
    # The MLPs' share is what the other writers leave of the signal: exact by completeness (tested with each
    # MLP's own write in writer_contributions), and no MLP output needs keeping unless MLPs are sources.
    head_sum, bias_sum = heads.sum((1, 2)), bias.sum(1)
    # No MLP writes below layer 0: exactly zero there, not the rounding noise of the difference.
    mlp = signal - (head_sum + embed + bias_sum + homog) if layer > 0 else torch.zeros_like(signal)
    split = torch.stack([head_sum, mlp, embed, bias_sum, homog], dim=1)

    if readings.homogeneous == "one":  # (a): the authors' [o; 1] adds the homogeneous term to every head
        scale = acts.scale[layer, prompt, token]
        heads = heads + (homog / scale)[:, None, None]
    columns = [heads.reshape(E, layer * H)]
    up_layer = [torch.arange(layer).repeat_interleave(H)]
    up_head = [torch.arange(H).repeat(layer)]
    others = {  # writer kind -> (contributions [E, m], their layers [m], their code), computed when asked for
        "mlp": lambda: ((acts.mlp_out[:layer, prompt, token] * direction).sum(-1).T, torch.arange(layer), MLP),
        "bias": lambda: (bias, torch.arange(layer), BIAS),
        "embed": lambda: (embed[:, None], torch.tensor([-1]), EMBED),
    }
    for kind in ("mlp", "bias", "embed"):
        if kind in writers:
            values, layers, code = others[kind]()
            columns.append(values)
            up_layer.append(layers)
            up_head.append(torch.full((len(layers),), code))
    return SideWriters(torch.cat(columns, 1), torch.cat(up_layer), torch.cat(up_head), split)


def root_events(events: TracedEvents, prompts: PromptSet, roots: Sequence[Root | RootSet]) -> list[list[int]]:
    """Per prompt, the event rows where each root fired, in the roots' order, a root set's by (layer, head,
    dest, src) (where the authors' graph code starts its walks, `readings ... count events`)."""
    row = {key: e for e, key in enumerate(zip(events.prompt.tolist(), events.layer.tolist(), events.head.tolist(),
                                              events.dest.tolist(), events.src.tolist()))}
    found = [[] for _ in prompts]
    for root in roots:
        if isinstance(root, RootSet):
            dest, src = (np.array([p.role(role) for p in prompts]) if role else None for role in (root.dest, root.src))
            rows = np.flatnonzero(root.chooses(events.layer, events.prompt, events.dest, events.src, dest, src))
            for e in rows[np.lexsort([getattr(events, f)[rows] for f in ("src", "dest", "head", "layer", "prompt")])].tolist():
                found[events.prompt[e]].append(e)
            continue
        for k, prompt in enumerate(prompts):
            e = row.get((k, root.layer, root.head, prompt.role(root.dest), prompt.role(root.src)))
            if e is not None:
                found[k].append(e)
    return found


def root_positions(prompts: PromptSet, roots: Sequence[Root | RootSet], n_layers: int,
                   n_heads: int) -> list[tuple[Root | RootSet, Tensor | None, Tensor | None]]:
    """Each root with its roles' position in every prompt (None for a root set without that role)."""
    out = []
    for root in roots:
        if not all(0 <= l < n_layers and 0 <= h < n_heads for l, h in root_heads(root, n_heads)):
            raise TraceError(f"root {root} is outside the model ({n_layers} layers x {n_heads} heads)")
        for role in (root.dest, root.src):
            if role is not None and role not in prompts.role_names:
                raise TraceError(f"root {root}: role {role!r} is not defined by the prompts; roles: {', '.join(prompts.role_names)}")
        dest, src = (torch.tensor([p.role(role) for p in prompts]) if role is not None else None for role in (root.dest, root.src))
        out.append((root, dest, src))
    return out


def trace(
    model: LoadedModel,
    prompts: PromptSet,
    roots: Sequence[Root | RootSet | str],
    threshold: float = 0.5,
    mass: float = 0.7,
    slices: SliceRule | str = "paper",
    *,
    readings: Readings = Readings(),
    writers: Sequence[str] = ("heads",),
    activations: Activations | None = None,
    geometry: AttentionGeometry | None = None,
    progress: Progress | None = None,
) -> Trace:
    """Trace `prompts` from `roots` (head, dest role -> src role, or root sets) and aggregate the graph (Fig. 5)."""
    rule = slices if isinstance(slices, SliceRule) else SliceRule(kind=slices)
    roots = [parse_root(r) if isinstance(r, str) else r for r in roots]
    root_pos = root_positions(prompts, roots, model.n_layers, model.n_heads)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if activations is None:
        tick = (lambda done, total: progress("forward", done, total)) if progress else None
        activations = capture(model, prompts, progress=tick, writers="mlp" in writers)
    timings["forward"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if geometry is None:
        geometry = attention_geometry(model)
    timings["geometry"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    firing, events, edges = trace_activations(activations, geometry, root_pos, threshold, mass, rule, progress,
                                              readings=readings, writers=writers)
    timings["trace"] = time.perf_counter() - t0
    return build_trace(model, prompts, roots, threshold, mass, rule, firing, events, edges, timings, readings=readings, writers=writers)


def build_trace(model: LoadedModel, prompts: PromptSet, roots: Sequence[Root | RootSet], threshold: float, mass: float, rule: SliceRule,
                firing: FiringStats, events: TracedEvents, edges: TracedEdges, timings: dict[str, float], *,
                readings: Readings = Readings(), writers: Sequence[str] = ("heads",)) -> Trace:
    """The Trace of these statistics, events and edges: the graph aggregated over prompts (Fig. 5)."""
    t0 = time.perf_counter()
    labels = tuple(p.labels for p in prompts)
    root_rows = root_events(events, prompts, roots) if readings.count == "events" else None
    graph = aggregate(events, edges, labels, firing.counts, root_rows)
    config = TraceConfig(threshold=threshold, mass=mass, slices=str(rule), roots=tuple(str(r) for r in roots),
                         sources=" ".join(writers), readings=str(readings))
    token_text = tuple(tuple(model.tokenizer.decode([t]) for t in p.token_ids) for p in prompts)
    return Trace(
        config=config,
        model=model.name,
        n_layers=model.n_layers,
        n_heads=model.n_heads,
        prompts=prompts.description,
        labels=labels,
        firing=firing,
        events=events,
        edges=edges,
        graph=graph,
        token_text=token_text,
        timings={**timings, "graph": time.perf_counter() - t0},
    )


def trace_activations(
    acts: Activations,
    geometry: AttentionGeometry,
    root_positions: Sequence[tuple[Root | RootSet, Tensor | None, Tensor | None]],
    threshold: float,
    mass: float,
    rule: SliceRule,
    progress: Progress | None = None,
    *,
    readings: Readings = Readings(),
    writers: Sequence[str] = ("heads",),
) -> tuple[FiringStats, TracedEvents, TracedEdges]:
    """The walk of Algorithm 1 over cached activations; see the module docstring. `writers` ("heads" and
    any of "mlp", "embed", "bias") are the writers an edge may come from; the walk recurses through heads."""
    L, H, r = geometry.W_Q.shape[0], geometry.W_Q.shape[1], geometry.W_Q.shape[-1]
    P = len(acts.lengths)
    # The walk runs on the firing events alone (sparse, in (layer, prompt, head, dest, src) order): `wanted`
    # marks the rows Algorithm 1 reaches; a firing's row is found by its key, never in an [L, P, H, n, n] mask.
    fires = acts.firings_at(threshold)
    wanted = torch.zeros(len(fires), dtype=torch.bool)
    prompt_ids = torch.arange(P)
    for root, dest, src in root_positions:
        if isinstance(root, RootSet):  # a filter on the firings, not a lookup per prompt
            wanted |= root.chooses(fires.layer, fires.prompt, fires.dest, fires.src, dest, src)
            continue
        rows = fires.rows_of(torch.full((P,), root.layer), prompt_ids, torch.full((P,), root.head), dest, src)
        wanted[rows[rows >= 0]] = True
    dest_keys = fires.dest_keys()

    counts = np.bincount((fires.layer * H + fires.head).numpy(), minlength=L * H).reshape(L, H).astype(np.int64)
    usage = np.zeros((L, H, r), dtype=np.int64)
    slice_counts: list[tuple[np.ndarray, ...]] = []
    events: dict[str, list] = {k: [] for k in TracedEvents.__dataclass_fields__}
    edges: dict[str, list] = {k: [] for k in TracedEdges.__dataclass_fields__}
    n_events = 0

    every = acts.tokens.shape[1] <= STATS_TOKENS
    for layer in reversed(range(L)):
        at = fires.of_layer(layer)
        if not every:  # long prompts: the walk's events alone (the firing statistics count these)
            at = at[wanted[at]]
        p, a, i, j = fires.prompt[at], fires.head[at], fires.dest[at], fires.src[at]
        # Cores for the (head, offset) pairs of these events only, in the float32 the terms use.
        slices = slices_for(geometry, acts, layer, a, i - j, torch.float32)
        dec = decompose_events(acts, slices, p, a, i, j, layer, rule)
        sizes = dec.mask.sum(-1)
        usage[layer] = torch.zeros(H, r, dtype=torch.long).index_add_(0, dec.head, dec.mask.long()).numpy()
        slice_counts.insert(0, tuple(sizes[dec.head == h].numpy() for h in range(H)))
        if progress:
            progress("trace", L - layer, L)
        traced = wanted[at].nonzero(as_tuple=True)[0]
        for rows in traced.split(EVENT_CHUNK):
            p, a, i, j = dec.prompt[rows], dec.head[rows], dec.dest[rows], dec.src[rows]
            sig = event_signals(acts, slices, dec, rows, layer)
            E, base = len(rows), n_events
            n_events += E
            sides = {side: side_writers(acts, geometry, direction, homog, signal, p, token, layer, readings, writers)
                     for side, direction, homog, signal, token in (("d", sig.dir_d, sig.homog_d, sig.signal_d, i),
                                                                   ("s", sig.dir_s, sig.homog_s, sig.signal_s, j))}
            score = dec.terms[rows].sum(-1)
            _append(events, prompt=p, layer=torch.full((E,), layer), head=a, dest=i, src=j,
                    score=score, attention=fires.attention[at[rows]], n_slices=sizes[rows],
                    signal_dest=sig.signal_d, signal_src=sig.signal_s, split_dest=sides["d"].split, split_src=sides["s"].split,
                    residual=fires.score[at[rows]].double() * geometry.score_scale - score,
                    position=geometry.position_slope[a].double() * j if geometry.position_slope is not None else torch.zeros(E))
            events["slices"] += [o[:k].numpy() for o, k in zip(dec.order[rows], sizes[rows].tolist())]
            for side, token in (("d", i), ("s", j)):
                w = sides[side]
                if w.candidates.shape[1] == 0:  # layer 0 without other sources: nothing upstream
                    continue
                e_idx, col = dc.select_upstream(w.candidates, mass, readings.negative).nonzero(as_tuple=True)
                up_l, up_h = w.up_layer[col], w.up_head[col]
                _append(edges, event=base + e_idx, prompt=p[e_idx], up_layer=up_l, up_head=up_h,
                        layer=torch.full((len(e_idx),), layer), head=a[e_idx], dest=i[e_idx], src=j[e_idx],
                        side=np.full(len(e_idx), side), contribution=w.candidates[e_idx, col])
                # Algorithm 1, lines 18-27: recurse where the upstream head fires with this token as dest
                # (an MLP, a bias or the embeddings is a leaf: SVT explains attention).
                head = up_h >= 0
                tok, pp = token[e_idx][head], p[e_idx][head]
                wanted |= torch.isin(dest_keys, dc.dest_key(up_l[head], pp, up_h[head], tok))

    floats = {"score", "attention", "signal_dest", "signal_src", "split_dest", "split_src", "contribution", "residual", "position"}
    columns = lambda table: {k: _cat(v, np.float64 if k in floats else np.str_ if k == "side" else np.int64,  # noqa: E731
                                     (0, len(WRITER_CLASSES)) if k.startswith("split") else (0,))
                             for k, v in table.items() if k != "slices"}
    firing = FiringStats(counts=counts, slice_counts=tuple(slice_counts), slice_usage=usage)
    return firing, TracedEvents(**columns(events), slices=tuple(events["slices"])), canonical_edges(TracedEdges(**columns(edges)))


def canonical_edges(edges: TracedEdges) -> TracedEdges:
    """Edge rows ordered by (event, side d before s, upstream layer, upstream head): one order however the
    events were batched, so that traces of prompt chunks merge into the rows of one unchunked trace."""
    order = np.lexsort((edges.up_head, edges.up_layer, edges.side == "s", edges.event))
    return TracedEdges(**{f: getattr(edges, f)[order] for f in TracedEdges.__dataclass_fields__})


def _append(table: dict[str, list], **columns) -> None:
    for key, value in columns.items():
        table[key].append(value.numpy() if isinstance(value, Tensor) else value)


def _cat(parts: list, dtype, empty: tuple[int, ...]) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(empty, dtype=dtype)


def writer_contributions(acts: Activations, geometry: AttentionGeometry, events: TracedEvents, side: str) -> dict[str, np.ndarray]:
    """Eq. (8) for every residual writer of each traced event's token, not only heads.

    Writers: "embed" (the residual entering layer 0), "head l.h", "attn_bias l" (b_O), "mlp l" (the
    MLP block's write) and "qk_bias" (the homogeneous coordinate: the downstream head's own bias). They
    sum to the event's signal (`signal_dest` / `signal_src`): a completeness check the paper does not
    have. `acts` must be captured with `writers=True`.
    """
    if acts.embed is None or acts.mlp_out is None:
        raise TraceError("writer contributions need activations captured with writers=True")
    L, H = geometry.W_O.shape[:2]
    out = {name: np.zeros(len(events)) for name in
           ["embed", "qk_bias"] + [f"{k} {l}" for l in range(L) for k in ("attn_bias", "mlp")]
           + [f"head {l}.{h}" for l in range(L) for h in range(H)]}
    for layer in np.unique(events.layer).tolist():
        order = np.nonzero(events.layer == layer)[0]
        p, a = torch.from_numpy(events.prompt[order]), torch.from_numpy(events.head[order])
        i, j = torch.from_numpy(events.dest[order]), torch.from_numpy(events.src[order])
        slices = slices_for(geometry, acts, layer, a, i - j)
        dec = decompose_events(acts, slices, p, a, i, j, layer, SliceRule("all"))
        # Re-impose each event's recorded S_ij.
        mask = torch.zeros_like(dec.mask)
        for row, e in enumerate(order):
            mask[row, torch.from_numpy(events.slices[e])] = True
        dec = LayerDecomposition(**{**dec.__dict__, "mask": mask})
        sig = event_signals(acts, slices, dec, torch.arange(len(order)), layer)
        direction, homog = (sig.dir_d, sig.homog_d) if side == "d" else (sig.dir_s, sig.homog_s)
        token = dec.dest if side == "d" else dec.src
        heads = upstream_contributions(acts, geometry.W_O, direction, dec.prompt, token, layer)
        post = acts.post_scale[:layer, dec.prompt, token].T if acts.post_scale is not None else torch.ones(len(order), layer)
        parts = {"embed": (acts.embed[dec.prompt, token] * direction).sum(-1), "qk_bias": homog}
        for l in range(layer):
            parts[f"attn_bias {l}"] = (direction @ geometry.b_O[l]) / post[:, l]
            parts[f"mlp {l}"] = (acts.mlp_out[l, dec.prompt, token] * direction).sum(-1)
            for h in range(H):
                parts[f"head {l}.{h}"] = heads[:, l, h]
        for name, value in parts.items():
            out[name][order] = value.numpy()
    return out
