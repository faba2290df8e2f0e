"""What a trace returns: frozen, columnar records named after the paper, plus the aggregated graph.

Arrays are numpy so that reports, exports and diffs never need torch or the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np


# Writers other than heads (`sources mlp embed bias`) are graph nodes and edge sources (layer, code) with a
# negative code in the head's place: the MLP of a layer, the attention output bias b_O of a layer, and
# the embeddings (layer -1: they write before layer 0).
MLP, BIAS, EMBED = -1, -2, -3
WRITER_CODES = {MLP: "mlp", BIAS: "bias", EMBED: "embed"}
# The classes an event's signal is split into (TracedEvents.split_dest / split_src), in column order.
WRITER_CLASSES = ("heads", "mlp", "embed", "bias", "homogeneous")


def writer_label(node: tuple) -> str:
    """(9, 6) -> "9.6", (5, MLP) -> "mlp 5", (3, BIAS) -> "bias 3", (-1, EMBED) -> "embed"."""
    layer, head = node[0], node[1]
    if head >= 0:
        return f"{layer}.{head}"
    return WRITER_CODES[head] if head == EMBED else f"{WRITER_CODES[head]} {layer}"


@dataclass(frozen=True)
class FiringStats:
    """Every firing event of every head (section 4.3), decomposed into slices (section 4.1).

    counts[l, h]: number of firing events (attention > threshold, src != 0, score > 0) over all prompts.
    slice_counts[l, h]: |S_ij| of each of those events (a 1-d array per head; Fig. 3).
    slice_usage[l, h, k]: how many firing events of head (l, h) have slice k in S_ij (Fig. 2).
    Prompts longer than trace.STATS_TOKENS: slice_counts and slice_usage cover the events the trace reaches
    only (len(slice_counts[l][h]) of the counts[l, h] firings), not every firing event.
    """

    counts: np.ndarray
    slice_counts: tuple[tuple[np.ndarray, ...], ...]
    slice_usage: np.ndarray


@dataclass(frozen=True)
class TracedEvents:
    """Firing events reached by the trace (Algorithm 1), one row each.

    prompt, layer, head, dest, src: the event; score: A'_ij (eq. 3); attention: A_ij;
    n_slices: |S_ij|; slices[e]: indices k in S_ij, in decreasing order of their term;
    signal_dest / signal_src: the sqrt(sigma)-weighted signal projection of x_i / x_j (the sum of every
    residual writer's contribution, eq. 8 extended to all writers); split_dest / split_src [E, 5]: that
    signal split by writer class (WRITER_CLASSES: heads, MLPs, embeddings, biases, the homogeneous
    coordinate), each row summing to the signal (NaN in a trace.json written before the split existed).
    residual: the model's own score minus the sum of every slice term (eq. 3; exact up to float rounding);
    position: a position term added to the score outside the bilinear form and not attributed (ALiBi's
    slope_h * j; zero elsewhere). NaN in a trace.json written before they were recorded.
    """

    prompt: np.ndarray
    layer: np.ndarray
    head: np.ndarray
    dest: np.ndarray
    src: np.ndarray
    score: np.ndarray
    attention: np.ndarray
    n_slices: np.ndarray
    slices: tuple[np.ndarray, ...]
    signal_dest: np.ndarray
    signal_src: np.ndarray
    split_dest: np.ndarray
    split_src: np.ndarray
    residual: np.ndarray
    position: np.ndarray

    def __len__(self) -> int:
        return len(self.prompt)


def exactness(events: TracedEvents) -> dict[str, Any]:
    """How exactly the slices rebuilt the model's scores over every traced event: the largest
    |score - sum of the terms| and that over the largest |score| (a ratio that tiny scores cannot inflate);
    with a position term (ALiBi), its largest size too, which the trace does not attribute."""
    residual = np.abs(events.residual)
    scores = np.abs(events.score + events.residual)
    out: dict[str, Any] = {
        "events": len(events),
        "max_residual": float(residual.max()) if len(events) else 0.0,
        "max_relative_residual": float(residual.max() / scores.max()) if len(events) and scores.max() > 0 else 0.0,
    }
    if len(events) and np.any(events.position != 0):
        out["unattributed_position_term"] = float(np.abs(events.position).max())
    return out


@dataclass(frozen=True)
class TracedEdges:
    """Communication edges (l, b) -> (layer, head, token), one row per traced event and selected upstream writer.

    event: row in TracedEvents; up_layer, up_head: the upstream head, or a writer (up_head MLP, BIAS or
    EMBED) with `sources`; side: "s" (through the src token, V subspace) or "d" (dest token, U
    subspace); contribution: c of eq. (8).
    """

    event: np.ndarray
    prompt: np.ndarray
    up_layer: np.ndarray
    up_head: np.ndarray
    layer: np.ndarray
    head: np.ndarray
    dest: np.ndarray
    src: np.ndarray
    side: np.ndarray
    contribution: np.ndarray

    def __len__(self) -> int:
        return len(self.prompt)

    @property
    def token(self) -> np.ndarray:
        """The token each edge writes into: the destination through side "d", the source through "s"."""
        return np.where(self.side == "d", self.dest, self.src)


@dataclass(frozen=True)
class TraceConfig:
    threshold: float
    mass: float
    slices: str
    roots: tuple[str, ...]
    sources: str = "heads"  # the `sources` statement
    readings: str = "circuitlang"  # the `readings` statement (lang.plan.Readings)


@dataclass(frozen=True)
class Trace:
    """A singular vector trace over a prompt set (section 4.2, Algorithm 1), aggregated into `graph`.

    graph: head nodes (layer, head) and token nodes (layer, head, role); communication edges
    (l, b) -> (layer, head, role) with attributes type ("s"/"d"), count (prompts), total and mean
    contribution; attention edges (layer, head, role) -> (layer, head) with count. Head nodes carry
    `firing` (all firing events of that head) and `traced` (events the trace reached).
    token_text[p][t]: the text of token t of prompt p (empty for a trace read from an older trace.json).
    """

    config: TraceConfig
    model: str
    n_layers: int
    n_heads: int
    prompts: str
    labels: tuple[tuple[str, ...], ...]
    firing: FiringStats
    events: TracedEvents
    edges: TracedEdges
    graph: nx.DiGraph
    token_text: tuple[tuple[str, ...], ...] = ()  # per prompt, each token decoded (the viewer's prompt text)
    timings: dict[str, float] = field(default_factory=dict, compare=False)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
