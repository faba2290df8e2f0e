"""`circ diff A B`: how two traces differ (slice rule, mass, threshold, prompts, model).

Both graphs are filtered as they are drawn (`edge_filter` at min_count) and then compared: nodes are heads
and token boxes, edges the communication edges (a token box's attention edge comes with the box). Node ids
are (layer, head[, role]), so traces of two models of different sizes compare too.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import networkx as nx
from rich import box
from rich.console import Console
from rich.table import Table

from circuitlang.engine.results import Trace, writer_label
from circuitlang.lang import SpecError, parse_spec, parse_text
from circuitlang.atomic import atomic_write
from circuitlang.report.draw import (DRAWING_FORMATS, PENWIDTH, Drawing, digraph, head_label, layered_nodes, writer_attrs, render_dot,
                                     token_attrs)
from circuitlang.report.export import dumps, edge_filter, node_id, plain, read_trace_json
from circuitlang.report.outdir import require_listed

FORMAT = "circuitlang.diff/1"
ONLY_A, ONLY_B, BOTH = "#e07b00", "#7b3fb5", "#9a9a9a"  # orange, purple, grey
FILL = {ONLY_A: "#fde8d0", ONLY_B: "#ece1f6", BOTH: "#f2f2f2"}

Node = tuple
Edge = tuple[Node, Node]


@dataclass(frozen=True)
class EdgeChange:
    """A communication edge of either graph: side, prompt count and total contribution in A and in B (0 where absent)."""

    up: Node
    down: Node
    type: str
    count_a: int
    count_b: int
    total_a: float
    total_b: float

    @property
    def delta_count(self) -> int:
        return self.count_b - self.count_a

    @property
    def delta_total(self) -> float:
        return self.total_b - self.total_a


@dataclass(frozen=True)
class TraceDiff:
    """Two traces compared on their graphs filtered to edges seen in >= min_count prompts.

    settings: (name, A's, B's) for model, prompts, prompt count, roots, threshold, mass, slices.
    changes: every communication edge of the union, the largest |change of total contribution| first.
    """

    names: tuple[str, str]
    min_count: int
    settings: tuple[tuple[str, str, str], ...]
    nodes_only_a: tuple[Node, ...]
    nodes_only_b: tuple[Node, ...]
    nodes_both: tuple[Node, ...]
    edges_only_a: tuple[Edge, ...]
    edges_only_b: tuple[Edge, ...]
    edges_both: tuple[Edge, ...]
    jaccard_nodes: float
    jaccard_edges: float
    changes: tuple[EdgeChange, ...]


def _colour(c: EdgeChange) -> str:
    """Where an edge is: only in A, only in B (edges kept by the filter have count >= 1), or in both."""
    return ONLY_A if not c.count_b else ONLY_B if not c.count_a else BOTH


def _settings(trace: Trace) -> dict[str, str]:
    c = trace.config
    return {"model": trace.model, "prompts": trace.prompts, "prompt count": str(len(trace.labels)),
            "roots": ", ".join(c.roots), "threshold": str(c.threshold), "mass": str(c.mass), "slices": c.slices}


def _communication(graph: nx.DiGraph) -> dict[Edge, dict]:
    return {(u, v): d for u, v, d in graph.edges(data=True) if d["kind"] == "communication"}


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def diff_traces(a: Trace, b: Trace, min_count: int, names: tuple[str, str] = ("A", "B")) -> TraceDiff:
    """Compare the graphs of `a` and `b`, each filtered to communication edges seen in >= min_count prompts."""
    ga, gb = edge_filter(a.graph, min_count), edge_filter(b.graph, min_count)
    na, nb = set(ga.nodes), set(gb.nodes)
    ea, eb = _communication(ga), _communication(gb)
    absent = {"count": 0, "total": 0.0}
    changes = [EdgeChange(u, v, (ea.get((u, v)) or eb[u, v])["type"], ea.get((u, v), absent)["count"],
                          eb.get((u, v), absent)["count"], ea.get((u, v), absent)["total"], eb.get((u, v), absent)["total"])
               for u, v in ea.keys() | eb.keys()]
    changes.sort(key=lambda c: (-abs(c.delta_total), -abs(c.delta_count), c.up, c.down))
    sa, sb = _settings(a), _settings(b)
    return TraceDiff(
        names=names, min_count=min_count, settings=tuple((k, sa[k], sb[k]) for k in sa),
        nodes_only_a=tuple(sorted(na - nb)), nodes_only_b=tuple(sorted(nb - na)), nodes_both=tuple(sorted(na & nb)),
        edges_only_a=tuple(sorted(ea.keys() - eb.keys())), edges_only_b=tuple(sorted(eb.keys() - ea.keys())),
        edges_both=tuple(sorted(ea.keys() & eb.keys())),
        jaccard_nodes=_jaccard(na, nb), jaccard_edges=_jaccard(set(ea), set(eb)), changes=tuple(changes),
    )


def read_input(path: str, load: Callable[[str], Trace]) -> tuple[Trace, int]:
    """The trace of `path` and its spec's `show` filter: a trace.json read back (filter 1 if it carries no
    readable plan), or a .circ spec traced by `load` (which may reuse a cached run). A trace.json in a run
    directory is read only if the run's manifest lists it with these bytes (report/outdir.py)."""
    if Path(path).suffix == ".json":
        require_listed(path)
        try:
            trace = read_trace_json(path)
        except ValueError as err:  # not JSON, or not a trace; OSError messages already name the file
            raise ValueError(f"{path}: {err}") from err
        try:
            return trace, parse_text(trace.extra["plan"]).show_min_count
        except (KeyError, SpecError):  # no plan, or one naming a prompts file that is not here
            return trace, 1
    min_count = parse_spec(path).show_min_count  # a bad spec fails before anything runs
    return load(path), min_count


def diff_inputs(a: str, b: str, load: Callable[[str], Trace], min_count: int | None = None) -> TraceDiff:
    """`circ diff A B`: A and B are .circ specs or trace.json files; min_count defaults to the larger of
    their `show` filters."""
    (ta, ma), (tb, mb) = read_input(a, load), read_input(b, load)
    return diff_traces(ta, tb, max(ma, mb) if min_count is None else min_count, names=(a, b))


# --- Output ------------------------------------------------------------------------------------------


def _edge_text(c: EdgeChange) -> tuple[str, str]:
    return writer_label(c.up), f"{c.down[0]}.{c.down[1]} {c.down[2]}"


def _heads(nodes: tuple[Node, ...]) -> str:
    """Heads and the writer nodes of `sources` (mlp 5, embed), as the report writes them."""
    return ", ".join(writer_label(n) for n in nodes if len(n) == 2) or "—"


def render_diff(diff: TraceDiff, console: Console, top: int = 15) -> None:
    """The diff as Rich tables: settings, overlap, heads only in one trace, the largest edge changes."""
    a, b = diff.names
    settings = Table(title="Diff", box=box.SIMPLE_HEAD)
    for name in ("", "A", "B"):
        settings.add_column(name, style="bold" if not name else None)
    settings.add_row("input", a, b)
    for name, x, y in diff.settings:
        settings.add_row(name, x, y, style=None if x == y else "yellow")
    console.print(settings)

    overlap = Table(title=f"Graphs of edges seen in >= {diff.min_count} prompts", box=box.SIMPLE_HEAD)
    for name in ("", "in both", "only in A", "only in B", "Jaccard"):
        overlap.add_column(name, justify="left" if not name else "right", style="bold" if not name else None)
    overlap.add_row("nodes", str(len(diff.nodes_both)), str(len(diff.nodes_only_a)), str(len(diff.nodes_only_b)),
                    f"{diff.jaccard_nodes:.2f}")
    overlap.add_row("communication edges", str(len(diff.edges_both)), str(len(diff.edges_only_a)), str(len(diff.edges_only_b)),
                    f"{diff.jaccard_edges:.2f}")
    overlap.add_row("heads only in A", _heads(diff.nodes_only_a), style=ONLY_A)
    overlap.add_row("heads only in B", _heads(diff.nodes_only_b), style=ONLY_B)
    console.print(overlap)

    for title, key in (("Largest changes of total contribution (B - A)", lambda c: abs(c.delta_total)),
                       ("Largest changes of prompt count (B - A)", lambda c: abs(c.delta_count))):
        changed = sorted((c for c in diff.changes if key(c) > 0), key=lambda c: (-key(c), c.up, c.down))
        if not changed:  # a table of headers and no rows reads like a rendering fault
            console.print(f"[italic]{title}[/italic]: none", highlight=False)
            continue
        # 80 columns (a file, a narrow terminal) hold every column whole: no cell is cut or wrapped
        table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True,
                      caption=f"{len(changed) - top} more changed edges not shown" if len(changed) > top else None)
        for name in ("up", "into", "side", "count A", "count B", "total A", "total B", "change"):
            table.add_column(name, justify="left" if name in ("up", "into", "side") else "right", no_wrap=True)
        for c in changed[:top]:
            change = f"{c.delta_total:+.3g}" if "total" in title else f"{c.delta_count:+d}"
            table.add_row(*_edge_text(c), c.type, str(c.count_a), str(c.count_b), f"{c.total_a:.3g}", f"{c.total_b:.3g}",
                          change, style=None if _colour(c) == BOTH else _colour(c))
        console.print(table)


def diff_to_dict(diff: TraceDiff) -> dict:
    """The diff as plain JSON data, node ids as in trace.json ("9.6", "9.6:end"), floats rounded likewise."""
    edges = lambda items: [{"source": node_id(u), "target": node_id(v)} for u, v in items]  # noqa: E731
    return plain({
        "format": FORMAT,
        "a": diff.names[0],
        "b": diff.names[1],
        "min_count": diff.min_count,
        "settings": {name: {"a": x, "b": y} for name, x, y in diff.settings},
        "nodes": {"only_a": [node_id(n) for n in diff.nodes_only_a], "only_b": [node_id(n) for n in diff.nodes_only_b],
                  "both": [node_id(n) for n in diff.nodes_both]},
        "edges": {"only_a": edges(diff.edges_only_a), "only_b": edges(diff.edges_only_b), "both": edges(diff.edges_both)},
        "jaccard": {"nodes": diff.jaccard_nodes, "edges": diff.jaccard_edges},
        "changes": [{"source": node_id(c.up), "target": node_id(c.down), "type": c.type, "count_a": c.count_a,
                     "count_b": c.count_b, "total_a": c.total_a, "total_b": c.total_b} for c in diff.changes],
    })


def _title(diff: TraceDiff) -> str:
    e = html.escape
    rows = [f'<b><font color="{ONLY_A}">A</font></b> {e(diff.names[0])}   vs   <b><font color="{ONLY_B}">B</font></b> {e(diff.names[1])}']
    rows += [f"{e(name)}: {e(x)}  →  {e(y)}" for name, x, y in diff.settings if x != y]
    rows += [
        f"edges seen in ≥ {diff.min_count} prompts  ·  Jaccard: nodes {diff.jaccard_nodes:.2f}, edges {diff.jaccard_edges:.2f}",
        f'<font color="{ONLY_A}">━ only in A</font>   <font color="{ONLY_B}">━ only in B</font>   <font color="{BOTH}">━ in both</font>',
        "solid: into a source token (s)  ·  dashed: into a destination token (d)  ·  width: |change of total contribution|",
    ]
    return "<" + '<table border="0" cellspacing="1">' + "".join(f'<tr><td align="left">{r}</td></tr>' for r in rows) + "</table>>"


def build_diff_dot(diff: TraceDiff):
    """The union of both filtered graphs, laid out as Fig. 5, coloured by where each node and edge is."""
    dot = digraph("diff", _title(diff))
    where = {n: colour for colour, nodes in ((ONLY_A, diff.nodes_only_a), (ONLY_B, diff.nodes_only_b),
                                            (BOTH, diff.nodes_both)) for n in nodes}

    def style(n: Node) -> dict:
        colour = where[n]
        if len(n) == 3:
            return {**token_attrs(n), "color": colour, "penwidth": "1.5"}
        if n[1] < 0:
            return {**writer_attrs(n), "color": colour, "penwidth": "2"}
        return {"label": head_label(n), "shape": "ellipse", "style": "filled", "fillcolor": FILL[colour],
                "color": colour, "penwidth": "2", "tooltip": f"head {n[0]}.{n[1]}"}

    ids = layered_nodes(dot, where, style)
    largest = max((abs(c.delta_total) for c in diff.changes), default=0.0) or 1.0
    lo, hi = PENWIDTH
    for c in sorted(diff.changes, key=lambda c: (c.up, c.down)):
        dot.edge(ids[c.up], ids[c.down], color=_colour(c), style="dashed" if c.type == "d" else "solid",
                 penwidth=f"{lo + (hi - lo) * abs(c.delta_total) / largest:.2f}",
                 tooltip=f"{' -> '.join(_edge_text(c))} ({c.type}): A {c.count_a} prompts, total {c.total_a:.3g}; "
                         f"B {c.count_b} prompts, total {c.total_b:.3g}")
    for token in sorted(n for n in ids if len(n) == 3):  # each token box's attention edge into its head
        dot.edge(ids[token], ids[token[:2]], color=where[token], penwidth="0.8", arrowsize="0.5")
    return dot


def write_diff(diff: TraceDiff, directory: str | os.PathLike, stem: str = "diff") -> Drawing:
    """Write `stem`.json and the drawing (.dot, .svg, .png; only .dot without Graphviz, `message` says why)."""
    path = atomic_write(Path(directory) / f"{stem}.json", dumps(diff_to_dict(diff)))
    drawing = render_dot(build_diff_dot(diff), directory, stem, DRAWING_FORMATS)
    return Drawing([path, *drawing.paths], drawing.message)
