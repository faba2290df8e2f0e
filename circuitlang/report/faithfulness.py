"""Faithfulness results (`evaluate faithfulness`) as a Rich table, a plot of the curves and faithfulness.json.
Reads FaithfulnessResults; never the model, never torch."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table

from circuitlang.atomic import atomic_path, atomic_write
from circuitlang.report.export import plain

if TYPE_CHECKING:
    from circuitlang.engine.edge_circuits import EdgeCircuits
    from circuitlang.engine.evaluate import FaithfulnessResults

FORMAT = "circuitlang.faithfulness/1"
LABELS = {"influence": "SVT influence (trace)", "count": "SVT count (trace)",
          # EAP: the gradient at the clean run (MIB); TL 4: at the counterfactual run (TransformerLens 4)
          "attribution_clean": "attrib. patching (EAP)", "attribution_cf": "attrib. patching (TL 4)", "dla": "direct logit attribution",
          "random": "random"}
COLOURS = {"influence": "#d62728", "count": "#ff9896", "attribution_clean": "#1f77b4", "attribution_cf": "#9edae5",
           "dla": "#2ca02c", "random": "#7f7f7f"}
TRACE_METHODS = ("influence", "count")
REPORT_SIZES = (5, 10, 20)


def faithfulness_to_dict(results: FaithfulnessResults) -> dict:
    """Plain JSON data, without the timings (so that the file is the same on every run)."""
    data = results.to_dict()
    data.pop("timings", None)
    return plain({"format": FORMAT, **data})


def faithfulness_from_dict(data: dict) -> FaithfulnessResults:
    """FaithfulnessResults back from `faithfulness_to_dict`; ValueError if it is not one."""
    from circuitlang.engine.evaluate import FaithfulnessResults

    if data.get("format") != FORMAT:
        raise ValueError(f"not a faithfulness result (format {data.get('format')!r}, expected {FORMAT!r})")
    return FaithfulnessResults.from_dict({k: v for k, v in data.items() if k != "format"})


def write_faithfulness_json(results: FaithfulnessResults, path: str | os.PathLike) -> Path:
    text = json.dumps(faithfulness_to_dict(results), sort_keys=True, indent=1, ensure_ascii=False) + "\n"
    return atomic_write(path, text)


def _num(x: float | None, digits: str = ".2f") -> str:
    return "—" if x is None or not math.isfinite(x) else format(x, digits)


def _pm(x: float | None, sd: float | None) -> str:
    return _num(x) if sd is None else f"{_num(x)} ± {_num(sd)}"


def table_order(results: FaithfulnessResults) -> list:
    """The methods by their mean f over circuits of 1 to 20 heads (capped at 1: overshoot is no win), random
    last: no method is listed first unless it leads where a researcher reads a circuit."""
    fixed = [c for c in results.methods if c.method != "random"]
    key = lambda c: -c.mean_f if math.isfinite(c.mean_f) else math.inf  # noqa: E731
    return sorted(fixed, key=key) + [c for c in results.methods if c.method == "random"]


def render_faithfulness(results: FaithfulnessResults, console: Console) -> None:
    """Method x (CPR, CMD, f at 5/10/20 heads, mean f up to 20 heads, the largest f there), the two ends of the
    gap, the top-k overlaps, the run time."""
    sizes = list(results.sizes)
    ablation = "the mean over the counterfactual prompts" if results.ablation == "mean" else "each prompt's own counterfactual"
    table = Table(title=f"Faithfulness against {results.against}: heads outside the circuit take the outputs of {ablation}",
                  box=box.SIMPLE_HEAD, caption="MIB-style, on heads: f = (m(C) - m(empty)) / (m(M) - m(empty)); CPR = area "
                  "under f of the circuits on signed scores (higher is better), CMD = area of |1 - f| of the circuits on "
                  "|score| (lower is better), over the fraction of heads kept; f@k and mean f (k <= 20, f capped at 1) on "
                  "CPR's circuits; max f > 1 is overshoot, not a win; attribution patching's gradient at the clean run (EAP, "
                  "as MIB) or at the counterfactual run (TL 4)",
                  collapse_padding=True, pad_edge=False)  # 80 columns hold every method's name and numbers whole
    for column in ("method", "CPR", "CMD", *(f"f@{k}" for k in REPORT_SIZES), "mean f", "max f"):
        table.add_column(column, justify="left" if column == "method" else "right", no_wrap=column == "method")
    for curve in table_order(results):
        name = LABELS.get(curve.method, curve.method) + (f" ({curve.draws} draws)" if curve.method == "random" else "")
        cells = []
        for k in REPORT_SIZES:
            at = sizes.index(k) if k in sizes else None
            cells.append("—" if at is None else _pm(float(curve.f_cpr[at]), None if curve.f_std is None else float(curve.f_std[at])))
        over = f"[yellow]{_num(curve.f_max)}[/yellow]" if math.isfinite(curve.f_max) and curve.f_max > 1 else _num(curve.f_max)
        table.add_row(name, _pm(curve.cpr, curve.cpr_std), _pm(curve.cmd, curve.cmd_std), *cells,
                      _pm(curve.mean_f, curve.mean_f_std), over)
    console.print(table)
    console.print(f"m = mean F over {results.n_prompts} prompts: full model {results.m_full:.3f}, empty circuit "
                  f"{results.m_empty:.3f}, counterfactual run {results.m_counterfactual:.3f}; {results.n_heads} heads, "
                  f"sizes {', '.join(map(str, sizes))}", highlight=False)
    gap = results.m_full - results.m_empty
    if not abs(gap) >= 0.1:
        console.print(f"[yellow]note[/yellow]: m(M) - m(empty) = {gap:.3g} is small: f divides by it, so it is noisy here", highlight=False)
    a = results.attribution
    if "max_abs_difference_own_vs_tl" in a:
        console.print(f"attribution patching: our batched gradient x difference; TransformerLens 4's attribution_patch "
                      f"(node granularity, counterfactual gradient) differs from it by at most "
                      f"{a['max_abs_difference_own_vs_tl']:.2g} (largest score {a.get('max_abs_score', float('nan')):.3g})",
                      highlight=False)
    elif a.get("tl_refused"):
        console.print(f"attribution patching: our gradient x difference on head outputs; TransformerLens refused the check "
                      f"({a['tl_refused']})", highlight=False)
    edge = results.edge_level
    if edge and not edge.get("supported", False) and edge.get("reason"):
        console.print(f"edge level: TransformerLens 4's faithfulness refuses this model: {edge.get('reason', '')}", highlight=False)
    elif edge.get("n_prompts"):
        console.print(f"edge level: TransformerLens 4's faithfulness of the trace's own edges ({edge['edges']:.0f} per prompt: "
                      f"the query and key inputs it traced, and the traced heads' logit edges; every other edge, value "
                      f"inputs included, ablated): {edge['recovered']:.2f} ± {edge['recovered_std']:.2f} of the gap recovered "
                      f"over {edge['n_prompts']} prompts", highlight=False)
    if results.edge_circuits is not None:
        render_edge_circuits(results.edge_circuits, console, results.timings.get("forward"))
    # SVT's ranking is the trace's own evidence, so its top k against the traced heads is 1.00 by construction
    rows = [o for o in results.overlap if not (o.method in TRACE_METHODS and o.reference == "trace")]
    if rows:
        circular = len(rows) < len(results.overlap)
        overlap = Table(title="Top-k heads against reference sets", box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False,
                        caption="SVT against the trace is left out: its ranking is the trace's own evidence" if circular else None)
        for column in ("method", "reference", "k", "precision", "recall", "F1"):
            overlap.add_column(column, justify="left" if column in ("method", "reference") else "right", no_wrap=True)
        for o in rows:
            overlap.add_row(LABELS.get(o.method, o.method), o.reference, str(o.k), _num(o.precision), _num(o.recall), _num(o.f1))
        console.print(overlap)
    t = results.timings
    if t.get("evaluation") and t.get("forward"):
        console.print(f"evaluation: {t['evaluation']:.1f} s = {t['evaluation'] / t['forward']:.1f} times the counterfactual "
                      f"capture pass ({t['forward']:.2f} s, to the final norm); {int(t.get('passes', 0))} batched patched "
                      f"passes", highlight=False)


def render_edge_circuits(edges: EdgeCircuits, console: Console, forward: float | None = None) -> None:
    """f(k) of the trace's top-k edge circuits (k edges kept in every traced firing's query/key subspaces, the rest of
    their signal ablated locally), per edge ranking, with the two ends and where the clean run falls."""
    table = Table(title=f"Edge circuits: the top k of the trace's {edges.n_edges} edges kept, the rest of the signal of its "
                  f"{edges.n_firings} firings ablated in their query/key subspaces", box=box.SIMPLE_HEAD,
                  caption="f(k) = (m(k) - m(no edge)) / (m(every edge) - m(no edge)); SVT's local intervention, no counterfactual",
                  collapse_padding=True, pad_edge=False)
    table.add_column("k edges", justify="right")
    for curve in edges.curves:
        table.add_column(f"f ({curve.ranking})", justify="right")
    for s, k in enumerate(edges.sizes):
        table.add_row(str(k), *(_num(float(c.f[s])) for c in edges.curves))
    console.print(table)
    cost = edges.timings.get("edge_circuits")
    console.print(f"m = mean F: every edge kept {edges.m_all:.3f}, no edge {edges.m_none:.3f}, clean run {edges.m_clean:.3f} "
                  f"(f = {_num(edges.f_clean)}: the writers the trace left out, MLPs and embeddings included, are ablated at "
                  f"every k); {edges.n_sites} subspaces, {edges.passes} stacked passes"
                  + (f", {cost:.1f} s = {cost / forward:.1f} times the counterfactual pass" if cost and forward else ""),
                  highlight=False)
    if edges.f_clean < 0:  # keeping every edge moves F away from the clean run: a rising f is not the behaviour kept
        console.print(f"every edge kept moves F away from the clean run ({edges.m_none:.3f} -> {edges.m_all:.3f}, clean "
                      f"{edges.m_clean:.3f}): f(k) here measures how close k edges come to that, not how much of the "
                      "behaviour they keep", highlight=False)


def write_faithfulness_plot(results: FaithfulnessResults, path: str | os.PathLike) -> Path:
    """faithfulness.png: f (CPR's circuits) against the number of heads kept, one line per method, random as mean
    ± 1 sd, on a symlog axis (linear to 1 head)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    x = np.asarray(results.sizes)
    for curve in results.methods:
        colour = COLOURS.get(curve.method)
        label = f"{LABELS.get(curve.method, curve.method)} (CPR {curve.cpr:.2f})"
        ax.plot(x, curve.f_cpr, marker="o", markersize=3, color=colour, label=label,
                linewidth=2 if curve.method in TRACE_METHODS else 1.4)
        if curve.f_std is not None:
            ax.fill_between(x, curve.f - curve.f_std, curve.f + curve.f_std, color=colour, alpha=0.2, linewidth=0)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle=":")
    ax.axhline(0.0, color="black", linewidth=0.8, linestyle=":")
    ax.set_xlabel("heads kept (top k of each ranking)")
    ax.set_ylabel("faithfulness f")
    ax.set_xlim(0, results.n_heads)
    ax.set_xscale("symlog", linthresh=1.0)  # the small circuits, where a researcher reads one, stay visible
    ax.set_title(f"faithfulness against {results.against} ({results.ablation} ablation), {results.n_prompts} prompts", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    return path
