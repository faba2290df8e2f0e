"""trace.json and GraphML exports, the edge filter of Figs. 5 and 15, and the comparison with known heads.

trace.json holds the whole Trace (no model needed to re-draw, report or diff it) and is deterministic:
keys sorted, floats rounded to FLOAT_DIGITS significant digits, timings only on request.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterable

import networkx as nx
import numpy as np

from circuitlang.data.ioi import known_heads
from circuitlang.engine.results import (WRITER_CLASSES, WRITER_CODES, FiringStats, Trace, TraceConfig, TracedEdges, TracedEvents,
                                        exactness, writer_label)
from circuitlang.lang.plan import Readings, Root, RootSet, parse_root
from circuitlang.atomic import atomic_write

FORMAT = "circuitlang.trace/1"
FLOAT_DIGITS = 7
_FLOAT_COLUMNS = {"score", "attention", "signal_dest", "signal_src", "split_dest", "split_src", "contribution", "residual", "position"}

Head = tuple[int, int]
ROOTS_LISTED = 6  # more roots than this, or a root set, are summarised per head


def counted(trace: Trace) -> str:
    """What an edge's count counts: prompts, or under `readings ... count events` every event reaching it."""
    n = len(trace.labels)
    if Readings.parse(trace.config.readings).count == "events":
        return f"events, over {n} prompt{'s' * (n != 1)}"
    return f"of {n} prompt{'s' * (n != 1)}"


def root_firings(trace: Trace, root: Root | RootSet, rows: np.ndarray | None = None) -> np.ndarray:
    """Bool [len(rows)]: which traced events (`rows`, default all) `root` starts from, its roles matched by the
    token labels the trace keeps (a role's label, unless a role of higher label priority shares its token)."""
    rows = np.arange(len(trace.events)) if rows is None else rows
    layer, head, prompt = (getattr(trace.events, f)[rows] for f in ("layer", "head", "prompt"))
    dest, src = (np.array([trace.labels[p][t] for p, t in zip(prompt.tolist(), getattr(trace.events, side)[rows].tolist())],
                          dtype=object) for side in ("dest", "src"))
    if isinstance(root, Root):
        return (layer == root.layer) & (head == root.head) & (dest == root.dest) & (src == root.src)
    # each event is its own "prompt" here, whose role is named where the set's is
    role = lambda name: name and np.full(len(rows), name, dtype=object)  # noqa: E731
    return root.chooses(layer, np.arange(len(rows)), dest, src, role(root.dest), role(root.src))


def roots_summary(trace: Trace) -> str:
    """The roots, one by one when few; else per layer, how many roots each head has (explicit roots) or how many
    of its traced firings a root set starts from (`root_firings`)."""
    roots = [parse_root(r) for r in trace.config.roots]
    sets = [r for r in roots if isinstance(r, RootSet)]
    if len(roots) <= ROOTS_LISTED and not sets:
        return ", ".join(trace.config.roots)
    per_head: dict[tuple[int, int], int] = {}
    for r in roots:
        if not isinstance(r, RootSet):
            per_head[r.layer, r.head] = per_head.get((r.layer, r.head), 0) + 1
    ev = trace.events
    rows, head = np.zeros(len(ev), dtype=bool), []
    for r in sets:
        mine = root_firings(trace, r)
        head.append(f"{r}: {int(mine.sum())} root firings")
        rows |= mine
    for l, h in zip(ev.layer[rows].tolist(), ev.head[rows].tolist()):
        per_head[l, h] = per_head.get((l, h), 0) + 1
    n_explicit = len(roots) - len(sets)
    head += [f"{n_explicit} explicit roots"] if n_explicit else []
    lines = ["; ".join(head) + f" on {len(per_head)} heads"]
    for layer in sorted({l for l, _ in per_head}):
        heads = sorted((h, n) for (l, h), n in per_head.items() if l == layer)
        lines.append(f"layer {layer}: " + ", ".join(f"{layer}.{h} {n}" for h, n in heads))
    return "\n".join(lines)


def _round(x: float) -> float | None:
    """FLOAT_DIGITS significant digits, so float noise cannot break byte identity; NaN and inf -> null."""
    return float(f"{x:.{FLOAT_DIGITS}g}") if math.isfinite(x) else None


def plain(value: Any) -> Any:
    """JSON-ready copy: numpy to lists and scalars, tuples to lists, floats rounded."""
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, np.generic):
        return plain(value.item())
    if isinstance(value, float):
        return _round(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def node_id(node: tuple) -> str:
    """(9, 6) -> "9.6"; (9, 6, "end") -> "9.6:end"; writers: (5, MLP) -> "mlp 5", (-1, EMBED) -> "embed"."""
    return writer_label(node) + (f":{node[2]}" if len(node) == 3 else "")


_WRITER_ID = {name: code for code, name in WRITER_CODES.items()}


def parse_node_id(text: str) -> tuple:
    head, _, role = text.partition(":")
    kind, _, layer = head.partition(" ")
    if kind in _WRITER_ID:
        return (int(layer) if layer else -1, _WRITER_ID[kind])
    layer, number = head.split(".")
    return (int(layer), int(number), role) if role else (int(layer), int(number))


def _node_record(node: tuple, data: dict) -> dict:
    """A node's attributes with its tuple id flattened into layer, head and (token nodes) role; a writer
    node (`sources`) has its kind ("mlp", "bias", "embed") and no head."""
    if len(node) == 2 and node[1] < 0:
        return {"layer": node[0]} | data
    flat = {"layer": node[0], "head": node[1]} | ({"role": node[2]} if len(node) == 3 else {})
    return flat | data


def _columns(table: TracedEvents | TracedEdges) -> dict[str, Any]:
    return {f.name: getattr(table, f.name) for f in fields(table)}


def trace_to_dict(trace: Trace, plan_text: str | None = None, *, include_timings: bool = False, metric: dict | None = None) -> dict:
    """The whole trace as plain JSON data. Graph in node-link form with string ids ("9.6", "9.6:end").

    `plan_text` (the compiled spec) defaults to the one a trace read back from trace.json carries; `metric`, the
    task metric on the clean prompts ({"kind", "mean", "positive_fraction", "prompts"}), is written when given.
    """
    g = trace.graph
    data = {
        "format": FORMAT,
        "config": vars(trace.config),
        "model": trace.model,
        "n_layers": trace.n_layers,
        "n_heads": trace.n_heads,
        "prompts": trace.prompts,
        "labels": trace.labels,
        "token_text": trace.token_text,
        "firing": {"counts": trace.firing.counts, "slice_counts": trace.firing.slice_counts, "slice_usage": trace.firing.slice_usage},
        "events": _columns(trace.events),
        # Two digits: a size of rounding error, and the same whether read from the trace or from its trace.json.
        "exactness": {k: float(f"{v:.2g}") if isinstance(v, float) else v for k, v in exactness(trace.events).items()},
        "edges": _columns(trace.edges),
        "graph": {
            "nodes": [{"id": node_id(n)} | _node_record(n, g.nodes[n]) for n in sorted(g.nodes)],
            "edges": [{"source": node_id(u), "target": node_id(v)} | g.edges[u, v] for u, v in sorted(g.edges)],
        },
        "plan": plan_text if plan_text is not None else trace.extra.get("plan"),
        "extra": {k: v for k, v in trace.extra.items() if k != "plan"},
    }
    if metric is not None:
        data["metric"] = metric
    if include_timings:
        data["timings"] = trace.timings
    return plain(data)


def dumps(data: dict) -> str:
    return json.dumps(data, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def write_trace_json(trace: Trace, path: str | os.PathLike, plan_text: str | None = None, *, include_timings: bool = False,
                     metric: dict | None = None) -> Path:
    return atomic_write(path, dumps(trace_to_dict(trace, plan_text, include_timings=include_timings, metric=metric)))


def _table(cls, columns: dict[str, list]):
    # Column dtypes as the engine makes them: float64 contributions and scores, "s"/"d" sides, int64 rest.
    def array(name, values):
        dtype = np.float64 if name in _FLOAT_COLUMNS else np.str_ if name == "side" else np.int64
        return np.array(values, dtype=dtype)

    if cls is TracedEvents:  # a trace.json from before the split by writer class or the residuals: unknown, not zero
        unknown = np.full((len(columns["prompt"]), len(WRITER_CLASSES)), np.nan)
        columns = {"split_dest": unknown, "split_src": unknown, "residual": unknown[:, 0], "position": unknown[:, 0]} | columns
    return cls(**{k: tuple(np.array(v, dtype=np.int64) for v in vs) if k == "slices" else array(k, vs) for k, vs in columns.items()})


def trace_from_dict(data: dict) -> Trace:
    if data.get("format") != FORMAT:
        raise ValueError(f"not a circuitlang trace (format {data.get('format')!r}, expected {FORMAT!r})")
    graph = nx.DiGraph()
    for record in data["graph"]["nodes"]:
        node = parse_node_id(record["id"])
        graph.add_node(node, **{k: v for k, v in record.items() if k not in ("id", "layer", "head", "role")})
    for record in data["graph"]["edges"]:
        graph.add_edge(parse_node_id(record["source"]), parse_node_id(record["target"]),
                       **{k: v for k, v in record.items() if k not in ("source", "target")})
    f = data["firing"]
    config = data["config"]
    return Trace(
        config=TraceConfig(**(config | {"roots": tuple(config["roots"])})),
        model=data["model"],
        n_layers=data["n_layers"],
        n_heads=data["n_heads"],
        prompts=data["prompts"],
        labels=tuple(tuple(row) for row in data["labels"]),
        firing=FiringStats(
            counts=np.array(f["counts"], dtype=np.int64),
            slice_counts=tuple(tuple(np.array(c, dtype=np.int64) for c in layer) for layer in f["slice_counts"]),
            slice_usage=np.array(f["slice_usage"], dtype=np.int64),
        ),
        events=_table(TracedEvents, data["events"]),
        edges=_table(TracedEdges, data["edges"]),
        graph=graph,
        token_text=tuple(tuple(row) for row in data.get("token_text", ())),  # absent before the viewer
        timings=data.get("timings", {}),
        extra=data["extra"] | ({"plan": data["plan"]} if data["plan"] is not None else {}),
    )


def read_trace_json(path: str | os.PathLike) -> Trace:
    """A Trace back from trace.json: numpy columns, the DiGraph with tuple node ids and its attributes."""
    with open(path, encoding="utf-8") as fh:
        return trace_from_dict(json.load(fh))


def write_graphml(trace: Trace, path: str | os.PathLike) -> Path:
    """The trace graph as GraphML: string ids ("9.6", "9.6:end"), attributes layer, head, role flattened."""
    g = trace.graph
    out = nx.DiGraph()
    out.add_nodes_from((node_id(n), _node_record(n, g.nodes[n])) for n in sorted(g.nodes))
    out.add_edges_from((node_id(u), node_id(v), g.edges[u, v]) for u, v in sorted(g.edges))
    return atomic_write(path, "\n".join(nx.generate_graphml(out)) + "\n")


def edge_filter(graph: nx.DiGraph, min_count: int) -> nx.DiGraph:
    """Communication edges seen in >= min_count prompts, the attention edges of the token nodes they reach,
    and the nodes they touch (Fig. 5 keeps edges seen 65 times in 256 prompts, Fig. 15 170 times)."""
    comm = [(u, v) for u, v, d in graph.edges(data=True) if d["kind"] == "communication" and d["count"] >= min_count]
    tokens = {v for _, v in comm}
    attention = [(u, v) for u, v, d in graph.edges(data=True) if d["kind"] == "attention" and u in tokens]
    kept = sorted(set(comm) | set(attention))
    out = nx.DiGraph()
    out.add_nodes_from((n, graph.nodes[n]) for n in sorted({n for edge in kept for n in edge}))
    out.add_edges_from((u, v, graph.edges[u, v]) for u, v in kept)
    return out


def writer_shares(trace: Trace, heads: Iterable[Head]) -> dict[Head, dict[str, dict[str, float]]]:
    """Per head and token side ("d", "s"): each writer class's share of the signal of the head's traced
    events (WRITER_CLASSES; the ratio of sums, so the shares add to 1). Heads without traced events, or
    from a trace.json older than the split, are left out."""
    ev = trace.events
    out = {}
    for layer, head in heads:
        mine = (ev.layer == layer) & (ev.head == head)
        sides = {}
        for side, split in (("d", ev.split_dest[mine]), ("s", ev.split_src[mine])):
            total = split.sum()
            if len(split) and np.isfinite(total) and total != 0:
                sides[side] = {name: float(split[:, k].sum() / total) for k, name in enumerate(WRITER_CLASSES)}
        if sides:
            out[layer, head] = sides
    return out


def graph_heads(graph: nx.DiGraph) -> set[Head]:
    """The graph's head nodes (not its token nodes, nor the writer nodes of `sources`)."""
    return {n for n in graph.nodes if len(n) == 2 and n[1] >= 0}


def known_head_set(compare: str | Iterable[str] | None) -> set[Head]:
    """Heads to compare with: a known list by name ("ioi": Wang et al.'s IOI circuit) or "l.h" strings."""
    if compare is None:
        return set()
    names = [h for heads in known_heads(compare).values() for h in heads] if isinstance(compare, str) else compare
    return {parse_node_id(h) for h in names}


def precision_recall(heads: Iterable[Head], known: Iterable[Head]) -> tuple[float, float, float]:
    """Precision, recall and F1 of traced heads against known ones (the paper's Fig. 15: 0.52, 0.69)."""
    heads, known = set(heads), set(known)
    hit = len(heads & known)
    precision = hit / len(heads) if heads else 0.0
    recall = hit / len(known) if known else 0.0
    f1 = 2 * precision * recall / (precision + recall) if hit else 0.0
    return precision, recall, f1
