"""The trace as Rich tables: summary, firing counts, top edges, |S_ij| per head, comparison with known heads.

Readable at 100 columns; on a non-terminal Console (file, record=True) the same tables come out as text.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table

from circuitlang.engine.results import WRITER_CLASSES, Trace, exactness, writer_label
from circuitlang.lang.plan import parse_root, root_heads
from circuitlang.report.draw import shade
from circuitlang.report.export import ROOTS_LISTED, Head, counted, edge_filter, graph_heads, precision_recall, roots_summary, writer_shares

HEATMAP_HEADS = 12  # heads per heatmap table; wider models get one table per 12 heads


def _count(n: int) -> str:
    return str(n) if n < 1000 else f"{n / 1000:.1f}k" if n < 100_000 else f"{n // 1000}k"


def _heads(heads: Iterable[Head]) -> str:
    return ", ".join(f"{l}.{h}" for l, h in sorted(heads)) or "—"


def exactness_line(trace: Trace) -> str:
    """One line: how exactly the slices rebuilt the model's scores (trace.json's `exactness`)."""
    ex = exactness(trace.events)
    if not ex["events"] or math.isnan(ex["max_residual"]):
        return "not recorded" if ex["events"] else "no events traced"
    line = (f"scores rebuilt from the slices over {ex['events']} events: max |residual| {ex['max_residual']:.1e}, "
            f"{ex['max_relative_residual']:.1e} of the largest score")
    if "unattributed_position_term" in ex:
        line += f"; position term (ALiBi) up to {ex['unattributed_position_term']:.2g}, not attributed"
    return line


def _summary(trace: Trace, shown, min_count: int) -> Table:
    c, g = trace.config, trace.graph
    comm = sum(d["kind"] == "communication" for _, _, d in g.edges(data=True))
    shown_comm = sum(d["kind"] == "communication" for _, _, d in shown.edges(data=True))
    rows = [
        ("model", f"{trace.model}  ({trace.n_layers} layers x {trace.n_heads} heads)"),
        ("prompts", f"{len(trace.labels)}  ({trace.prompts})"),
        ("roots", roots_summary(trace)),
        ("firing", f"attention > {c.threshold}; {int(trace.firing.counts.sum())} firing events in all"),
        ("slices / mass", f"S_ij rule {c.slices}; upstream writers holding {c.mass:.0%} of the contribution"),
        ("sources", f"{c.sources}; readings {c.readings}"),
        ("traced", f"{len(trace.events)} events, {len(trace.edges)} edge rows"),
        ("exactness", exactness_line(trace)),
        ("graph", f"{len(graph_heads(g))} heads, {comm} communication edges"),
        (f"count >= {min_count}", f"{len(graph_heads(shown))} heads, {shown_comm} communication edges (count: {counted(trace)})"),
    ]
    if trace.timings:
        rows.append(("timings", "  ".join(f"{k} {v:.2f}s" for k, v in trace.timings.items())))
    table = Table(title="Summary", box=box.SIMPLE, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for row in rows:
        table.add_row(*row)
    return table


def _firing(trace: Trace, shown_heads: set[Head]) -> list[Table]:
    """Firing events per head, layers x heads, shaded by count (log scale); * marks heads drawn."""
    counts = trace.firing.counts
    most = math.log1p(counts.max()) or 1.0
    tables = []
    for first in range(0, trace.n_heads, HEATMAP_HEADS):
        heads = range(first, min(first + HEATMAP_HEADS, trace.n_heads))
        table = Table(title="Firing counts per head" if first == 0 else None, box=box.SIMPLE_HEAD, padding=(0, 0, 0, 1),
                      caption="* head in the filtered graph" if first + HEATMAP_HEADS >= trace.n_heads else None)
        table.add_column("layer", justify="right", style="bold")
        for h in heads:
            table.add_column(str(h), justify="right")
        for layer in range(trace.n_layers):
            cells = []
            for h in heads:
                fill, font = shade(math.log1p(counts[layer, h]) / most)
                mark = "*" if (layer, h) in shown_heads else " "
                cells.append(f"[{font} on {fill}]{_count(int(counts[layer, h]))}{mark}[/]")
            table.add_row(str(layer), *cells)
        tables.append(table)
    return tables


def _edges(shown, key: str, top: int, title: str) -> Table:
    comm = [(u, v, d) for u, v, d in shown.edges(data=True) if d["kind"] == "communication"]
    comm.sort(key=lambda e: (-e[2][key], e[0], e[1]))
    table = Table(title=title, box=box.SIMPLE_HEAD)
    for name in ("up", "down token", "type", "count", "total", "mean"):
        table.add_column(name, justify="left" if name in ("up", "down token", "type") else "right")
    for u, v, d in comm[:top]:
        table.add_row(writer_label(u), f"{v[0]}.{v[1]} {v[2]}", d["type"], str(d["count"]), f"{d['total']:.3g}", f"{d['mean']:.3g}")
    return table


def _slices(trace: Trace, shown, top: int) -> Table:
    """|S_ij| over every firing event of each drawn head (Fig. 3), the `top` most traced heads."""
    heads = sorted(graph_heads(shown), key=lambda n: (-shown.nodes[n]["traced"], n))
    table = Table(title="|S_ij| per head (all firing events)", box=box.SIMPLE_HEAD,
                  caption=f"{len(heads) - top} more heads not shown" if len(heads) > top else None)
    for name in ("head", "firings", "traced", "median", "IQR", "min-max", "mean"):
        table.add_column(name, justify="left" if name == "head" else "right")
    for l, h in sorted(heads[:top]):
        sizes = trace.firing.slice_counts[l][h]
        if len(sizes) == 0:
            table.add_row(f"{l}.{h}", "0", str(shown.nodes[l, h]["traced"]), "—", "—", "—", "—")
            continue
        q1, median, q3 = np.percentile(sizes, [25, 50, 75])
        table.add_row(f"{l}.{h}", str(len(sizes)), str(shown.nodes[l, h]["traced"]), f"{median:g}", f"{q1:g}-{q3:g}",
                      f"{sizes.min()}-{sizes.max()}", f"{sizes.mean():.1f}")
    return table


def _writers(trace: Trace, shown, top: int) -> Table | None:
    """Each root's and the most traced heads' signal by writer class, dest and src side (the head-only
    trace explains the `heads` share; the rest is what `sources mlp embed bias` can add)."""
    roots = [head for r in trace.config.roots for head in root_heads(parse_root(r), trace.n_heads)]
    ranked = sorted(graph_heads(shown) - set(roots), key=lambda n: (-shown.nodes[n]["traced"], n))
    heads = list(dict.fromkeys(roots + ranked[: max(top - len(roots), 0)]))[:max(top, ROOTS_LISTED)]
    shares = writer_shares(trace, heads)
    if not shares:
        return None
    table = Table(title="Where each head's signal comes from (share of its traced events' signal)", box=box.SIMPLE_HEAD,
                  caption="d: destination token, s: source token; roots first. MLPs: the signal less every other writer "
                          "(exact by completeness)")
    table.add_column("head")
    table.add_column("side")
    for name in WRITER_CLASSES:
        table.add_column(name, justify="right")
    for head in heads:
        for side in ("d", "s"):
            if side in shares.get(head, {}):
                mark = " (root)" if head in roots else ""
                table.add_row(f"{head[0]}.{head[1]}{mark}" if side == "d" else "", side,
                              *(f"{shares[head][side][name]:.0%}" for name in WRITER_CLASSES))
    return table


def _known(shown_heads: set[Head], known: set[Head]) -> Table:
    precision, recall, f1 = precision_recall(shown_heads, known)
    table = Table(title="Traced heads vs known heads", box=box.SIMPLE, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("precision", f"{precision:.2f}  ({len(shown_heads & known)} of {len(shown_heads)} traced heads are known)")
    table.add_row("recall", f"{recall:.2f}  ({len(shown_heads & known)} of {len(known)} known heads traced)")
    table.add_row("F1", f"{f1:.2f}")
    table.add_row("matched", _heads(shown_heads & known))
    table.add_row("missed", _heads(known - shown_heads))
    table.add_row("extra", _heads(shown_heads - known))
    return table


def render_report(trace: Trace, console: Console, *, min_count: int = 1, known: Iterable[Head] | None = None, top: int = 15) -> None:
    """Print the report: the edges and heads are those of the graph filtered to count >= min_count."""
    shown = edge_filter(trace.graph, min_count)
    shown_heads = graph_heads(shown)
    console.print(_summary(trace, shown, min_count))
    for table in _firing(trace, shown_heads):
        console.print(table)
    console.print(_edges(shown, "count", top, f"Top edges by count ({counted(trace)})"))
    console.print(_edges(shown, "total", top, "Top edges by total contribution"))
    console.print(_slices(trace, shown, top))
    writers = _writers(trace, shown, top)
    if writers is not None:
        console.print(writers)
    if known is not None:
        console.print(_known(shown_heads, set(known)))
