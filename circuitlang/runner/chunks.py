"""Prompts in chunks: the forward pass and the trace of each chunk, merged into the trace of all of them.

Singular Vector Tracing of a prompt reads only that prompt's activations, so a chunk's share of a trace
is a pure function of (model, chunk of prompts, plan): `trace_chunk`. Chunks are padded to the length of
the whole prompt set and traced with the same roots; `merge_chunks` then gives the firing statistics,
events and edges of one unchunked trace, row for row (events in layer-descending (prompt, head, dest,
src) order, edges in `canonical_edges` order). Peak memory follows the chunk, not the prompt set.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from circuitlang.data.prompts import PromptSet
from circuitlang.engine.forward import Activations
from circuitlang.environment import chunk_budget_mb
from circuitlang.models.geometry import AttentionGeometry
from circuitlang.models.model import LoadedModel
from circuitlang.engine.results import FiringStats, TracedEdges, TracedEvents
from circuitlang.engine.trace import canonical_edges, root_positions, trace_activations
from circuitlang.lang.plan import Plan, Root

FORWARD_BATCH = 64  # prompts per forward pass inside a chunk


def activation_bytes(model: LoadedModel, n: int, resid_layers: int = 0, writers: bool = False, kv: bool = False) -> int:
    """Bytes one prompt of n positions takes in Activations (with each MLP's write: `writers`; every layer's
    keys and values: `kv`), with the trace's per-layer working copies. The attention pattern and scores are
    not kept (the capture keeps the firing events, a few per head and token): only one layer's at a time."""
    L, H, d, r = model.n_layers, model.n_heads, model.d_model, model.d_head
    H_kv = getattr(model.bridge.cfg, "n_key_value_heads", None) or H
    residual_copies = 1 + (resid_layers + 1) / max(L, 1) + writers  # x, the residuals kept, the embeddings, MLP writes
    floats = L * n * d * residual_copies + n * L * H * r + 6 * L * H * n + 2 * L * n + kv * 2 * L * H_kv * n * r
    per_layer_work = 2 * H * n * r + 2 * H * n * n  # token projections onto both bases; one layer's scores and firing mask
    # Measured on Gemma 3 270M: a capture's peak is ~1.5x what its Activations hold (the batches beside the
    # field being stacked); the trace's and the interventions' working tensors come on top.
    return int(2 * 4 * (floats + per_layer_work))


def default_budget() -> int:
    """The activation budget of a chunk: $CIRCUITLANG_CHUNK_MB, else an eighth of the machine's memory, at most
    1.5 GiB (the machine's, not what is free at the moment: the same spec chunks alike on the same machine).
    The cap keeps a chunk of Gemma 3 270M's IOI prompts at 256, the default spec's size: a larger run peaks
    like it (measured: docs/performance.md)."""
    budget_mb = chunk_budget_mb()
    if budget_mb is not None:
        return int(budget_mb * 2**20)
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system that says
        memory = 8 * 2**30
    return int(min(1.5 * 2**30, max(memory // 8, 64 * 2**20)))


def chunk_size(model: LoadedModel, prompts: PromptSet, budget: int | None = None, resid_layers: int = 0,
               writers: bool = False, kv: bool = False) -> int:
    """Prompts per chunk within `budget` bytes of activations (with the residual at `resid_layers` layers);
    a multiple of the forward batch when larger, so the forward passes batch the prompts exactly as an
    unchunked run does."""
    n = max(len(p.token_ids) for p in prompts)
    size = max(1, (budget or default_budget()) // activation_bytes(model, n, resid_layers, writers, kv))
    if size >= FORWARD_BATCH:
        size -= size % FORWARD_BATCH
    return min(size, len(prompts))


def chunk_bounds(total: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, total)) for start in range(0, total, size)]


@dataclass(frozen=True)
class ChunkTrace:
    """One chunk's share of a trace: prompts start..start+P-1 (events and edges carry global prompt ids;
    edge rows point at the chunk's own event rows); logit_diff [P]: F(X), when the prompts name answers."""

    start: int
    firing: FiringStats
    events: TracedEvents
    edges: TracedEdges
    logit_diff: np.ndarray | None


def trace_chunk(acts: Activations, geometry: AttentionGeometry, prompts: PromptSet, start: int, roots: Sequence[Root],
                plan: Plan, n_layers: int, n_heads: int) -> ChunkTrace:
    """Algorithm 1 on the activations `acts` of the chunk `prompts`, the first of which is prompt `start`."""
    positions = root_positions(prompts, roots, n_layers, n_heads)
    firing, events, edges = trace_activations(acts, geometry, positions, plan.threshold, plan.mass, plan.slices,
                                              readings=plan.readings, writers=plan.writers)
    events = dataclasses.replace(events, prompt=events.prompt + start)
    edges = dataclasses.replace(edges, prompt=edges.prompt + start)
    diff = acts.logit_diff.double().numpy() if acts.logit_diff is not None else None
    return ChunkTrace(start, firing, events, edges, diff)


def merge_chunks(chunks: Sequence[ChunkTrace]) -> tuple[FiringStats, TracedEvents, TracedEdges, np.ndarray | None]:
    """The firing statistics, events and edges of the chunks' prompts traced as one set, and F(X)."""
    chunks = sorted(chunks, key=lambda c: c.start)
    L, H = chunks[0].firing.counts.shape
    firing = FiringStats(
        counts=sum(c.firing.counts for c in chunks),
        slice_counts=tuple(tuple(np.concatenate([c.firing.slice_counts[l][h] for c in chunks]) for h in range(H)) for l in range(L)),
        slice_usage=sum(c.firing.slice_usage for c in chunks),
    )
    bases = np.cumsum([0] + [len(c.events) for c in chunks])
    cols = {f: np.concatenate([getattr(c.events, f) for c in chunks]) for f in TracedEvents.__dataclass_fields__ if f != "slices"}
    slices = tuple(s for c in chunks for s in c.events.slices)
    # Unchunked order: layers from the top, then (prompt, head, dest, src); chunks hold disjoint prompts.
    order = np.lexsort((cols["src"], cols["dest"], cols["head"], cols["prompt"], -cols["layer"]))
    events = TracedEvents(**{k: v[order] for k, v in cols.items()}, slices=tuple(slices[k] for k in order))
    new_row = np.empty_like(order)
    new_row[order] = np.arange(len(order))
    edge_cols = {f: np.concatenate([getattr(c.edges, f) for c in chunks]) for f in TracedEdges.__dataclass_fields__}
    edge_cols["event"] = new_row[np.concatenate([c.edges.event + base for c, base in zip(chunks, bases)])]
    edges = canonical_edges(TracedEdges(**edge_cols))
    diffs = [c.logit_diff for c in chunks]
    return firing, events, edges, (np.concatenate(diffs) if all(d is not None for d in diffs) else None)
