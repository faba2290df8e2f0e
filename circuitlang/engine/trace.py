"""Singular Vector Tracing (section 4.2, Algorithm 1), batched over events and walked top-down by layer.

Algorithm 1 recurses from a firing into each selected upstream head that fires with the same token as
its destination. Upstream heads sit in strictly lower layers, so the recursion is a walk down the layers:
at layer l every event wanted so far is decomposed in one batch, its upstream heads are selected, and
the firings they lead to are marked wanted in lower layers. Each event is computed once (memoised by
the `wanted` mask), and no residual stream is copied per event.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from circuitlang.data.prompts import PromptSet
from circuitlang.engine import decompose as dc
from circuitlang.engine.forward import Activations, capture
from circuitlang.engine.graph import aggregate
from circuitlang.engine.model import LoadedModel
from circuitlang.engine.omega import OmegaSlices, omega_slices
from circuitlang.engine.results import FiringStats, Trace, TraceConfig, TracedEdges, TracedEvents
from circuitlang.lang.plan import Root, SliceRule

Progress = Callable[[str, int, int], None]

EVENT_CHUNK = 2048  # events per GEMM batch; bounds memory at chunk x layers x heads x d_head floats


class TraceError(ValueError):
    """A trace request that cannot run (bad root, role missing from the prompts)."""


def model_slices(model: LoadedModel) -> OmegaSlices:
    """Omega's orthogonal slices for every head of the model (eqs. 2, 5)."""
    b = model.bridge
    with torch.no_grad():
        return omega_slices(b.W_Q.detach(), b.b_Q.detach(), b.W_K.detach(), b.b_K.detach())


@dataclass(frozen=True)
class LayerDecomposition:
    """Decomposed events of one layer: the index tensors and, per event, terms, S_ij and weights."""

    prompt: Tensor
    head: Tensor
    dest: Tensor
    src: Tensor
    terms: Tensor
    mask: Tensor
    order: Tensor
    xu_dest: Tensor
    xv_src: Tensor


def decompose_layer(acts: Activations, slices: OmegaSlices, fires: Tensor, layer: int, rule: SliceRule) -> LayerDecomposition:
    """Slice terms and S_ij for every firing event of `layer` (fires: [P, H, n, n])."""
    x = acts.x[layer]
    U, S, V = (t[layer].to(x.dtype) for t in (slices.U, slices.S, slices.V))
    xu = dc.project_tokens(x, U)  # [P, H, n, r]
    xv = dc.project_tokens(x, V)
    p, a, i, j = fires.nonzero(as_tuple=True)
    xu_dest, xv_src = xu[p, a, i], xv[p, a, j]
    terms = dc.slice_terms(xu_dest, S[a], xv_src)
    mask, order = dc.sparse_set(terms, rule)
    return LayerDecomposition(p, a, i, j, terms, mask, order, xu_dest, xv_src)


def writer_contributions(acts: Activations, omega: OmegaSlices, W_O: Tensor, b_O: Tensor, events: TracedEvents, side: str) -> dict[str, np.ndarray]:
    """Eq. (8) for every residual writer of each traced event's token, not only heads.

    Writers: "embed" (token + position), "head l.h", "attn_bias l" (b_O), "mlp l", and "qk_bias" (the
    homogeneous coordinate: the downstream head's own bias). They sum to the event's signal projection
    (`signal_dest` / `signal_src`); `acts` must be captured with `writers=True`.
    """
    if acts.embed is None or acts.mlp_out is None:
        raise TraceError("writer contributions need activations captured with writers=True")
    out: dict[str, list[Tensor]] = {}
    for layer in np.unique(events.layer).tolist():
        rows = torch.from_numpy(np.nonzero(events.layer == layer)[0])
        p, a = torch.from_numpy(events.prompt)[rows], torch.from_numpy(events.head)[rows]
        i, j = torch.from_numpy(events.dest)[rows], torch.from_numpy(events.src)[rows]
        token = i if side == "d" else j
        U, S, V = (t[layer].to(acts.x.dtype) for t in (omega.U, omega.S, omega.V))
        xu = dc.project_tokens(acts.x[layer], U)[p, a, i]
        mask = torch.zeros_like(xu, dtype=torch.bool)
        for row, e in enumerate(rows.tolist()):
            mask[row, torch.from_numpy(events.slices[e])] = True
        w = dc.slice_weights(mask, xu, S[a])
        direction, homog = dc.signal_directions(w, a, U if side == "d" else V, acts.scale[layer, p, token])
        heads = dc.head_contributions(direction, W_O[:layer], acts.z[p, token, :layer])
        parts = {"embed": (acts.embed[p, token] * direction).sum(-1), "qk_bias": homog}
        for l in range(acts.x.shape[0]):
            for h in range(W_O.shape[1]):
                parts[f"head {l}.{h}"] = heads[:, l, h] if l < layer else torch.zeros(len(rows))
            parts[f"attn_bias {l}"] = direction @ b_O[l] if l < layer else torch.zeros(len(rows))
            parts[f"mlp {l}"] = (acts.mlp_out[l, p, token] * direction).sum(-1) if l < layer else torch.zeros(len(rows))
        for name, value in parts.items():
            out.setdefault(name, []).append(value)
    order = np.argsort(np.concatenate([np.nonzero(events.layer == l)[0] for l in np.unique(events.layer)]))
    return {name: torch.cat(values).numpy()[order] for name, values in out.items()}


_ROOT = re.compile(r"^\s*(\d+)\.(\d+)\s+([\w+-]+)\s*->\s*([\w+-]+)\s*$")


def parse_root(text: str) -> Root:
    """`"9.6 end->IO"` -> Root(9, 6, "end", "IO"), for the Python API; specs go through the language."""
    match = _ROOT.match(text)
    if not match:
        raise TraceError(f"root {text!r} is not of the form 'layer.head dest->src', e.g. '9.6 end->IO'")
    return Root(int(match[1]), int(match[2]), match[3], match[4])


def _root_positions(prompts: PromptSet, roots: Sequence[Root], n_layers: int, n_heads: int) -> list[tuple[Root, Tensor, Tensor]]:
    out = []
    for root in roots:
        if not (0 <= root.layer < n_layers and 0 <= root.head < n_heads):
            raise TraceError(f"root {root} is outside the model ({n_layers} layers x {n_heads} heads)")
        for role in (root.dest, root.src):
            if role not in prompts.role_names:
                raise TraceError(f"root {root}: role {role!r} is not defined by the prompts; roles: {', '.join(prompts.role_names)}")
        dest = torch.tensor([p.role(root.dest) for p in prompts])
        src = torch.tensor([p.role(root.src) for p in prompts])
        out.append((root, dest, src))
    return out


def trace(
    model: LoadedModel,
    prompts: PromptSet,
    roots: Sequence[Root | str],
    threshold: float = 0.5,
    mass: float = 0.7,
    slices: SliceRule | str = "paper",
    *,
    activations: Activations | None = None,
    omega: OmegaSlices | None = None,
    progress: Progress | None = None,
) -> Trace:
    """Trace `prompts` from `roots` (head, dest role -> src role) and aggregate the graph (Fig. 5)."""
    rule = slices if isinstance(slices, SliceRule) else SliceRule(kind=slices)
    roots = [parse_root(r) if isinstance(r, str) else r for r in roots]
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if omega is None:
        omega = model_slices(model)
    timings["omega"] = time.perf_counter() - t0
    root_pos = _root_positions(prompts, roots, model.n_layers, model.n_heads)
    t0 = time.perf_counter()
    if activations is None:
        tick = (lambda done, total: progress("forward", done, total)) if progress else None
        activations = capture(model, prompts, progress=tick)
    timings["forward"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    W_O = model.bridge.W_O.detach().to("cpu", torch.float32)
    result = trace_activations(activations, omega, W_O, root_pos, threshold, mass, rule, progress)
    timings["trace"] = time.perf_counter() - t0
    firing, events, edges = result
    t0 = time.perf_counter()
    labels = tuple(p.labels for p in prompts)
    graph = aggregate(events, edges, labels, firing.counts)
    timings["graph"] = time.perf_counter() - t0
    config = TraceConfig(threshold=threshold, mass=mass, slices=str(rule), roots=tuple(str(r) for r in roots))
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
        timings=timings,
    )


def trace_activations(
    acts: Activations,
    omega: OmegaSlices,
    W_O: Tensor,
    root_positions: Sequence[tuple[Root, Tensor, Tensor]],
    threshold: float,
    mass: float,
    rule: SliceRule,
    progress: Progress | None = None,
) -> tuple[FiringStats, TracedEvents, TracedEdges]:
    """The walk of Algorithm 1 over cached activations; see the module docstring."""
    L, P, H, n, _ = acts.pattern.shape
    r = omega.rank
    fires = dc.firing_mask(acts.pattern, acts.scores, acts.lengths, threshold)  # [L, P, H, n, n]
    wanted = torch.zeros_like(fires)
    prompt_ids = torch.arange(P)
    for root, dest, src in root_positions:
        wanted[root.layer, prompt_ids, root.head, dest, src] = True
    wanted &= fires

    counts = fires.sum(dim=(1, 3, 4)).numpy()
    usage = np.zeros((L, H, r), dtype=np.int64)
    slice_counts: list[tuple[np.ndarray, ...]] = []
    ev_cols: dict[str, list] = {k: [] for k in ("prompt", "layer", "head", "dest", "src", "score", "attention", "n_slices", "signal_dest", "signal_src")}
    ev_slices: list[np.ndarray] = []
    ed_cols: dict[str, list] = {k: [] for k in ("event", "prompt", "up_layer", "up_head", "layer", "head", "dest", "src", "side", "contribution")}
    n_events = 0

    for layer in reversed(range(L)):
        dec = decompose_layer(acts, omega, fires[layer], layer, rule)
        sizes = dec.mask.sum(-1)
        usage[layer] = torch.zeros(H, r, dtype=torch.long).index_add_(0, dec.head, dec.mask.long()).numpy()
        slice_counts.insert(0, tuple(sizes[dec.head == h].numpy() for h in range(H)))
        if progress:
            progress("trace", L - layer, L)

        traced_rows = wanted[layer, dec.prompt, dec.head, dec.dest, dec.src].nonzero(as_tuple=True)[0]
        if len(traced_rows) == 0:
            continue
        U, S, V = (t[layer].to(acts.x.dtype) for t in (omega.U, omega.S, omega.V))
        for chunk in traced_rows.split(EVENT_CHUNK):
            p, a, i, j = dec.prompt[chunk], dec.head[chunk], dec.dest[chunk], dec.src[chunk]
            mask, xu_i, xv_j = dec.mask[chunk], dec.xu_dest[chunk], dec.xv_src[chunk]
            w = dc.slice_weights(mask, xu_i, S[a])
            dir_d, homog_d = dc.signal_directions(w, a, U, acts.scale[layer, p, i])
            dir_s, homog_s = dc.signal_directions(w, a, V, acts.scale[layer, p, j])
            # The full signal projections (every writer's share summed), eq. (8) applied to x~ itself.
            signal_d = (w * xu_i).sum(-1)
            signal_s = (w * xv_j).sum(-1)
            E = len(chunk)
            base = n_events
            n_events += E
            ev_cols["prompt"].append(p); ev_cols["layer"].append(torch.full((E,), layer)); ev_cols["head"].append(a)
            ev_cols["dest"].append(i); ev_cols["src"].append(j)
            ev_cols["score"].append(dec.terms[chunk].sum(-1)); ev_cols["attention"].append(acts.pattern[layer, p, a, i, j])
            ev_cols["n_slices"].append(mask.sum(-1)); ev_cols["signal_dest"].append(signal_d); ev_cols["signal_src"].append(signal_s)
            order = dec.order[chunk]
            ev_slices += [o[:k].numpy() for o, k in zip(order, mask.sum(-1).tolist())]
            if layer == 0:
                continue
            for side, direction, token in (("d", dir_d, i), ("s", dir_s, j)):
                contrib = dc.head_contributions(direction, W_O[:layer], acts.z[p, token, :layer])  # [E, layer, H]
                flat = contrib.reshape(E, layer * H)
                chosen = dc.select_upstream(flat, mass)
                e_idx, up = chosen.nonzero(as_tuple=True)
                up_l, up_h = up // H, up % H
                ed_cols["event"].append(base + e_idx); ed_cols["prompt"].append(p[e_idx])
                ed_cols["up_layer"].append(up_l); ed_cols["up_head"].append(up_h)
                ed_cols["layer"].append(torch.full((len(e_idx),), layer)); ed_cols["head"].append(a[e_idx])
                ed_cols["dest"].append(i[e_idx]); ed_cols["src"].append(j[e_idx])
                ed_cols["side"].append(np.full(len(e_idx), side))
                ed_cols["contribution"].append(flat[e_idx, up])
                # Algorithm 1, lines 18-27: recurse where the upstream head fires with this token as dest.
                tok = token[e_idx]
                pp = p[e_idx]
                wanted[up_l, pp, up_h, tok] |= fires[up_l, pp, up_h, tok]

    def cat(parts: list, dtype=None) -> np.ndarray:
        if not parts:
            return np.zeros(0, dtype=dtype or np.int64)
        arrays = [x.numpy() if isinstance(x, Tensor) else x for x in parts]
        return np.concatenate(arrays).astype(dtype) if dtype else np.concatenate(arrays)

    events = TracedEvents(
        **{k: cat(v, np.float64 if k in ("score", "attention", "signal_dest", "signal_src") else np.int64) for k, v in ev_cols.items()},
        slices=tuple(ev_slices),
    )
    edges = TracedEdges(
        **{k: cat(v, np.float64 if k == "contribution" else (np.str_ if k == "side" else np.int64)) for k, v in ed_cols.items()}
    )
    firing = FiringStats(counts=counts, slice_counts=tuple(slice_counts), slice_usage=usage)
    return firing, events, edges
