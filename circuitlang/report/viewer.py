"""The interactive viewer: one self-contained HTML file (trace.html, diff.html) that explores a trace.

No server, no network, no JavaScript library: the page is hand-written JS and CSS (report/assets) with the
data embedded as JSON, and it lays the circuit out itself as Fig. 5 does (layers top to bottom, a row of
token boxes above a row of head ovals per layer). What is embedded is aggregated here, not copied from
trace.json: one record per communication edge of the graph (up head -> token node of a downstream head,
the graph's own count, total, mean and type) carrying, per prompt it was traced in, the contribution summed
over that prompt's events and the downstream event (dest, src, side) with the largest |contribution|; per
head its firing count, traced events, |S_ij| histogram and slice usage; each prompt's token text once. The
event rows themselves are not embedded, so the file grows with the number of (edge, prompt) pairs, not
with the number of event rows (docs/viewer.md).
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from circuitlang.engine.results import WRITER_CLASSES, Trace
from circuitlang.lang.plan import parse_root, root_heads
from circuitlang.atomic import atomic_write
from circuitlang.report.draw import ATTENTION_COLOUR, DARK, KNOWN_BORDER, LIGHT, PENWIDTH, SIDE_COLOURS
from circuitlang.report.export import graph_heads, node_id, parse_node_id, plain, writer_shares

if TYPE_CHECKING:
    from circuitlang.engine.intervene import InterventionResults
    from circuitlang.lang.plan import Plan
    from circuitlang.report.diff import TraceDiff

FORMAT = "circuitlang.viewer/1"
ASSETS = Path(__file__).resolve().parent / "assets"
ROOT_COLOUR = "#d4a017"  # the ring around a root head
CONTRIBUTION_DIGITS = 4  # significant digits of the per-prompt contributions (the totals keep export's 7)


def _round(x: float, digits: int = CONTRIBUTION_DIGITS) -> float | None:
    return float(f"{x:.{digits}g}") if math.isfinite(x) else None


def _root_head(root: str) -> str:
    """"11.3 end->S2" -> "11.3"."""
    return root.split()[0]


def _known_classes(compare: str | Iterable[str] | None) -> dict[str, str]:
    """Head id -> class of the compared heads: the known list's classes, or "compared" for listed heads."""
    if compare is None:
        return {}
    if isinstance(compare, str):
        from circuitlang.data.ioi import known_heads

        return {head: cls for cls, heads in known_heads(compare).items() for head in heads}
    return {head: "compared" for head in compare}


def _role_order(labels: tuple[tuple[str, ...], ...]) -> list[str]:
    """Token labels in the order they appear in the prompts (by mean position), so boxes read left to right."""
    positions: dict[str, list[int]] = defaultdict(list)
    for row in labels:
        for position, label in enumerate(row):
            positions[label].append(position)
    return sorted(positions, key=lambda label: (sum(positions[label]) / len(positions[label]), label))


def edge_prompts(trace: Trace) -> dict[tuple, dict[int, list]]:
    """Per communication edge (up head, token node) of the graph, per prompt it was traced in:
    [contribution summed over the prompt's rows, |largest row contribution|, dest, src, side of that row].

    The token node is named as `engine.graph.aggregate` names it (the label of the token written into), so
    the keys are exactly the graph's communication edges and the prompt sets give their counts."""
    e = trace.edges
    out: dict[tuple, dict[int, list]] = defaultdict(dict)
    for p, ul, uh, l, h, i, j, side, c in zip(
        e.prompt.tolist(), e.up_layer.tolist(), e.up_head.tolist(), e.layer.tolist(), e.head.tolist(),
        e.dest.tolist(), e.src.tolist(), e.side.tolist(), e.contribution.tolist(),
    ):
        key = ((ul, uh), (l, h, trace.labels[p][i if side == "d" else j]))
        record = out[key].get(p)
        if record is None:
            out[key][p] = [c, abs(c), i, j, side]
        else:
            record[0] += c
            if abs(c) > record[1]:
                record[1:] = [abs(c), i, j, side]
    return out


def _histogram(values: np.ndarray) -> list[int]:
    """Counts of each value 0..max (|S_ij| is at least 1, so index 0 is 0)."""
    return np.bincount(np.asarray(values, dtype=np.int64)).tolist() if len(values) else []


def _intervention_dict(interventions: InterventionResults | dict | None) -> dict | None:
    if interventions is None or isinstance(interventions, dict):
        return interventions
    from circuitlang.report.interventions import interventions_to_dict

    return interventions_to_dict(interventions)


def _selectors(plan: Plan | None, trace: Trace) -> dict[str, tuple]:
    """Each intervention set's edge selectors, from the plan or from the plan text the trace carries."""
    if plan is None and trace.extra.get("plan"):
        from circuitlang.lang import SpecError, parse_text

        try:
            plan = parse_text(trace.extra["plan"])
        except (SpecError, ValueError, OSError):  # e.g. a prompts file that is not here: the sets' heads
            plan = None
    return {s.name: s.edges for s in plan.interventions} if plan is not None else {}


def _set_edges(selectors: tuple | None, info: dict, edges: list[dict], roots: list[str]) -> list[int]:
    """Indices of the graph edges an intervention set acts on: those its selectors name (edge, into, from,
    top k; `at ROLE` matches the token box's label, a side an edge traced through that side in some
    prompt). Without the selectors: edges from the set's upstream heads into its downstream heads."""
    ids = lambda heads: {"{}.{}".format(*h) for h in heads}  # noqa: E731
    if not selectors:
        up, down = ids(info.get("upstream", ())), ids(info.get("downstream", ()))
        return [k for k, e in enumerate(edges) if e["u"] in up and e["v"].split(":")[0] in down]
    chosen: set[int] = set()
    heaviest = sorted(range(len(edges)), key=lambda k: (-edges[k]["total"], parse_node_id(edges[k]["u"]),
                                                        parse_node_id(edges[k]["v"])))
    for sel in selectors:
        head = lambda h: "{}.{}".format(*h) if h is not None else None  # noqa: E731
        down = head(sel.down)
        if sel.kind == "into" and sel.root is not None and 1 <= sel.root <= len(roots):
            down = _root_head(roots[sel.root - 1])
        top = set(heaviest[: sel.k or 0]) if sel.kind == "top" else set()
        for k, e in enumerate(edges):
            v_head, _, role = e["v"].partition(":")
            if sel.kind == "edge" and not (e["u"] == head(sel.up) and v_head == down):
                continue
            if sel.kind == "into" and v_head != down:
                continue
            if sel.kind == "from" and e["u"] != head(sel.up):
                continue
            if sel.kind == "top" and k not in top:
                continue
            if sel.role is not None and role != sel.role:
                continue
            if sel.side is not None and not e["n" + sel.side]:
                continue
            chosen.add(k)
    return sorted(chosen)


def trace_view_data(trace: Trace, *, min_count: int = 1, compare: str | Iterable[str] | None = None,
                    interventions: InterventionResults | dict | None = None, plan: Plan | None = None,
                    title: str | None = None) -> dict:
    """Everything trace.html shows, as plain JSON data (see the module docstring)."""
    g = trace.graph
    per_edge = edge_prompts(trace)
    edges = []
    for u, v, d in sorted(g.edges(data=True), key=lambda x: x[:2]):
        if d["kind"] != "communication":
            continue
        prompts = per_edge.get((u, v), {})
        ps = sorted(prompts)
        edges.append({
            "u": node_id(u), "v": node_id(v), "type": d["type"], "count": d["count"], "total": d["total"], "mean": d["mean"],
            "ns": sum(prompts[p][4] == "s" for p in ps), "nd": sum(prompts[p][4] == "d" for p in ps),
            # per prompt: prompt, dest, src, side of the largest row, contribution summed over the prompt
            "p": ps, "i": [prompts[p][2] for p in ps], "j": [prompts[p][3] for p in ps],
            "s": "".join(prompts[p][4] for p in ps), "c": [_round(prompts[p][0]) for p in ps],
        })
    attention = {node_id(u): d["count"] for u, v, d in g.edges(data=True) if d["kind"] == "attention"}
    heads = []
    shares = writer_shares(trace, graph_heads(g))
    for n in sorted(graph_heads(g)):
        l, h = n
        usage = trace.firing.slice_usage[l, h]
        used = np.nonzero(usage)[0]
        heads.append({
            "id": node_id(n), "firing": int(trace.firing.counts[l, h]), "traced": int(g.nodes[n].get("traced", 0)),
            "hist": _histogram(trace.firing.slice_counts[l][h]),
            "usage": usage[: used[-1] + 1 if len(used) else 0].tolist(),
            "split": {side: {k: _round(v) for k, v in by.items()} for side, by in shares.get(n, {}).items()},
        })
    c = trace.config
    text = trace.token_text or tuple(tuple(label.strip("'") for label in row) for row in trace.labels)
    data = {
        "format": FORMAT, "mode": "trace",
        "title": title or f"{trace.model} · {trace.prompts}",
        "model": trace.model, "prompts": trace.prompts, "n_prompts": len(trace.labels),
        "n_layers": trace.n_layers, "n_heads": trace.n_heads,
        "config": {"threshold": c.threshold, "mass": c.mass, "slices": c.slices, "roots": list(c.roots),
                   "sources": c.sources, "readings": c.readings},
        "writer_classes": list(WRITER_CLASSES),
        "roots": sorted({f"{l}.{h}" for r in c.roots for l, h in root_heads(parse_root(r), trace.n_heads)}),
        "min_count": min_count,
        "known": _known_classes(compare),
        "compare": compare if isinstance(compare, str) or compare is None else "listed heads",
        "role_order": _role_order(trace.labels),
        "text": text, "text_is_labels": not trace.token_text, "labels": trace.labels,
        "heads": heads, "edges": edges, "attention": attention,
        "interventions": None,
        "style": _style(),
    }
    found = _intervention_dict(interventions)
    if found is not None:
        selectors = _selectors(plan, trace)
        data["interventions"] = {
            "model": found.get("model"), "centred": found.get("centred"), "homogeneous": found.get("homogeneous"),
            "verdicts": found.get("verdicts", []), "summaries": found.get("summaries", []),
            "sets": [{**{k: s.get(k) for k in ("name", "selectors", "matched", "n_edge_rows", "n_prompts", "actions",
                                                "places", "random_control")},
                      "edges": _set_edges(selectors.get(s["name"]), s, edges, list(c.roots))}
                     for s in found.get("sets", [])],
        }
    return plain(data)


def diff_view_data(diff: TraceDiff) -> dict:
    """Everything diff.html shows: the union of both filtered graphs' communication edges with their counts
    and totals in A and in B (the data of diff.json), so the page can re-filter at any count >= min_count."""
    from circuitlang.report.diff import diff_to_dict

    data = diff_to_dict(diff)
    return plain({
        "format": FORMAT, "mode": "diff",
        "title": f"{diff.names[0]}  vs  {diff.names[1]}",
        "names": list(diff.names), "min_count": diff.min_count,
        "settings": [list(s) for s in diff.settings],
        "edges": [{"u": c["source"], "v": c["target"], "type": c["type"], "ca": c["count_a"], "cb": c["count_b"],
                   "ta": c["total_a"], "tb": c["total_b"]} for c in data["changes"]],
        "role_order": sorted({c["target"].partition(":")[2] for c in data["changes"]}),
        "style": _style(),
    })


def _style() -> dict:
    from circuitlang.report.diff import BOTH, FILL, ONLY_A, ONLY_B

    return {"s": SIDE_COLOURS["s"], "d": SIDE_COLOURS["d"], "attention": ATTENTION_COLOUR, "known": KNOWN_BORDER,
            "root": ROOT_COLOUR, "light": list(LIGHT), "dark": list(DARK), "penwidth": list(PENWIDTH),
            "only_a": ONLY_A, "only_b": ONLY_B, "both": BOTH,
            "fill_a": FILL[ONLY_A], "fill_b": FILL[ONLY_B], "fill_both": FILL[BOTH]}


def render_html(data: dict) -> str:
    """The page: the assets inlined and `data` embedded as JSON ("</" escaped so no string ends the script)."""
    css = (ASSETS / "viewer.css").read_text(encoding="utf-8")
    js = (ASSETS / "viewer.js").read_text(encoding="utf-8")
    payload = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    payload = payload.replace("</", "<\\/").replace("<!--", "<\\!--")
    title = data["title"].replace("&", "&amp;").replace("<", "&lt;")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<link rel="icon" href="data:,">\n'
        f"<title>circuitlang · {title}</title>\n<style>\n{css}</style>\n</head>\n<body>\n"
        f'<script id="data" type="application/json">{payload}</script>\n'
        f"<script>\n{js}</script>\n</body>\n</html>\n"
    )


def write_trace_viewer(trace: Trace, path: str | os.PathLike, **options: Any) -> Path:
    """trace.html (options: those of `trace_view_data`), written atomically."""
    return atomic_write(path, render_html(trace_view_data(trace, **options)))


def write_diff_viewer(diff: TraceDiff, path: str | os.PathLike) -> Path:
    """diff.html, written atomically."""
    return atomic_write(path, render_html(diff_view_data(diff)))


def _run_settings(trace: Trace) -> tuple[int, str | tuple[str, ...] | None]:
    """The `show` filter and `compare` of the spec a trace.json carries (1 and None without a readable plan)."""
    from circuitlang.lang import SpecError, parse_text

    try:
        plan = parse_text(trace.extra["plan"])
    except (KeyError, TypeError, ValueError, OSError, SpecError):  # no plan, or a prompts file not here
        return 1, None
    return plan.show_min_count, plan.compare


def viewer_for_run(trace_json: str | os.PathLike) -> tuple[Path, bool, str | None]:
    """trace.html beside `trace_json`, from the files its directory's manifest lists (report/outdir.py):
    trace.json, and interventions.json when the run wrote it. Rewritten when the manifest does not list it
    as made from them, or it is older than the viewer's code; returns its path, whether it was written, and
    a note for the user (or None). In a directory without a manifest (an older circuitlang's), only the
    trace is shown: an interventions.json there might be another run's. The `show` filter and `compare`
    come from the plan the trace carries."""
    from circuitlang.report.export import read_trace_json
    from circuitlang.report.interventions import read_interventions_json
    from circuitlang.report.outdir import MANIFEST, listed, record, require_listed

    trace_json = Path(trace_json)
    html = trace_json.with_name("trace.html")
    manifest = require_listed(trace_json)  # NotThisRun for a trace.json its run did not write
    code = max(p.stat().st_mtime for p in [Path(__file__), *ASSETS.iterdir()])
    if manifest is None:
        found, note = None, f"no {MANIFEST} in {trace_json.parent}: showing the trace alone (an interventions.json there may be another run's)"
        fresh = html.exists() and html.stat().st_mtime >= max(code, trace_json.stat().st_mtime)
    else:
        found, note = (trace_json.with_name("interventions.json") if "interventions.json" in manifest["files"] else None), None
        if found is not None:
            require_listed(found)
        fresh = html.exists() and listed(html)[0] and html.stat().st_mtime >= code
    if fresh:
        return html, False, note
    trace = read_trace_json(trace_json)
    min_count, compare = _run_settings(trace)
    interventions = read_interventions_json(found) if found is not None else None
    path = write_trace_viewer(trace, html, min_count=min_count, compare=compare, interventions=interventions)
    if manifest is not None:
        record(path, manifest)
    return path, True, note
