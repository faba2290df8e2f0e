"""Intervention results (section 5.4) as interventions.json, a Rich table with verdicts, and box plots in
the style of the paper's Figs. 6 and 17-28. Reads InterventionResults; never the model, never torch."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rich import box
from rich.console import Console
from rich.table import Table

from circuitlang.atomic import atomic_path, atomic_write
from circuitlang.report.export import plain

if TYPE_CHECKING:
    from circuitlang.engine.intervene import InterventionResults

FORMAT = "circuitlang.interventions/1"
# The paper's colours (Figs. 6, 21-24): green ablation, red boosting, blue random ablation, orange random boosting.
CONDITIONS = (("ablate", "signal", "ablate", "#2ca02c"), ("boost", "signal", "boost", "#d62728"),
              ("ablate", "random", "random ablate", "#1f77b4"), ("boost", "random", "random boost", "#ff7f0e"))
VERDICT_STYLE = {"yes": "green", "reversed": "magenta", "ablate only": "yellow", "boost only": "yellow", "no": "red", "n/a": "dim"}


def interventions_to_dict(results: InterventionResults) -> dict:
    """The results as plain JSON data: sets, summaries, verdicts, and the per-prompt rows as columns."""
    rows = results.rows
    return plain({
        "format": FORMAT,
        "model": results.model,
        "seed": results.seed,
        "centred": results.centred,
        "homogeneous": results.homogeneous,
        "passes": results.passes,
        "sets": [asdict(s) for s in results.sets],
        "summaries": [asdict(s) for s in results.summaries],
        "verdicts": [asdict(v) for v in results.verdicts],
        "rows": {f.name: getattr(rows, f.name) for f in fields(rows)},
    })


def write_interventions_json(results: InterventionResults, path: str | os.PathLike) -> Path:
    """interventions.json, deterministic (sorted keys, rounded floats, no timings nor the count of passes, which
    follows the chunks: the same bytes however the run was chunked), written atomically."""
    data = {k: v for k, v in interventions_to_dict(results).items() if k != "passes"}
    text = json.dumps(data, sort_keys=True, indent=1, ensure_ascii=False, allow_nan=False) + "\n"
    return atomic_write(path, text)


def interventions_from_dict(data: dict) -> InterventionResults:
    """InterventionResults back from `interventions_to_dict` (null floats read as NaN); ValueError if it is not one."""
    from circuitlang.engine.intervene import (ROW_INT, ROW_TEXT, InterventionResults, InterventionRows, InterventionSummary,
                                              SetInfo, Verdict)

    if data.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} document")
    num = lambda x: float("nan") if x is None else float(x)  # noqa: E731
    tuples = lambda value: tuple(tuples(v) for v in value) if isinstance(value, list) else value  # noqa: E731
    summaries = tuple(InterventionSummary(**{k: num(v) if isinstance(v, (int, float)) or v is None else v for k, v in s.items()
                                             if k != "n_prompts"}, n_prompts=int(s["n_prompts"])) for s in data["summaries"])
    verdicts = tuple(Verdict(**{k: (v if k in ("set", "place", "verdict") or v is None else float(v)) for k, v in x.items()})
                     for x in data["verdicts"])
    rows = InterventionRows(**{k: np.array([num(v) for v in values] if k not in ROW_TEXT + ROW_INT else values,
                                           dtype=np.str_ if k in ROW_TEXT else np.int64 if k in ROW_INT else np.float64)
                               for k, values in data["rows"].items()})
    return InterventionResults(model=data["model"], seed=int(data["seed"]), centred=bool(data["centred"]),
                               homogeneous=bool(data["homogeneous"]), sets=tuple(SetInfo(**{k: tuples(v) for k, v in s.items()}) for s in data["sets"]),
                               rows=rows, summaries=summaries, verdicts=verdicts, passes=int(data["passes"]))


def read_interventions_json(path: str | os.PathLike) -> dict:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file")
    return data


# --- Rich ---------------------------------------------------------------------------------------------


def _num(x: float | None, digits: str = ".3g") -> str:
    return "—" if x is None or not math.isfinite(x) else format(x, digits)


def render_interventions(results: InterventionResults, console: Console) -> None:
    """Per (set, place, kind, control): dF and the score change over the intervened prompts; then the verdicts."""
    sets = list(dict.fromkeys(s.set for s in results.summaries))
    order = {(kind, control): k for k, (kind, control, _, _) in enumerate(CONDITIONS)}
    rank = lambda s: (s.place != "global", order.get((s.kind, s.control), 9))  # noqa: E731
    for name in sets:  # one table per set, so that its name is never squeezed into a column
        table = Table(title=f'intervene "{name}" (section 5.4): dF = F(X, e, h) - F(X), dA\' = change of the '
                      "downstream score", box=box.SIMPLE_HEAD, caption="median [IQR] over the intervened prompts; "
                      "cos and norm: x vs x+h at the downstream head's input")
        for column in ("place", "kind", "n", "dF mean", "dF median [IQR]", "dA' mean", "cos", "norm"):
            table.add_column(column, justify="left" if column in ("place", "kind") else "right")
        for s in sorted((s for s in results.summaries if s.set == name), key=rank):
            kind = s.kind if s.control == "signal" else f"random {s.kind}"
            table.add_row(s.place, kind, str(s.n_prompts), _num(s.delta_f_mean),
                          f"{_num(s.delta_f_median)} [{_num(s.delta_f_q25, '.2g')}, {_num(s.delta_f_q75, '.2g')}]",
                          _num(s.delta_score_mean), _num(s.cosine_mean, ".4f"), _num(s.norm_ratio_mean, ".3f"))
        console.print(table)
    verdicts = Table(title="Verdict: does ablation lower F and boosting raise it, more than the random control?",
                     box=box.SIMPLE_HEAD)
    for name in ("set", "place", "ablate", "random", "boost", "random ", "verdict"):
        verdicts.add_column(name, justify="left" if name in ("set", "place", "verdict") else "right")
    for v in results.verdicts:
        style = VERDICT_STYLE.get(v.verdict, "")
        verdicts.add_row(v.set, v.place, _num(v.ablate), _num(v.ablate_random), _num(v.boost), _num(v.boost_random),
                         f"[{style}]{v.verdict}[/]" if style else v.verdict)
    console.print(verdicts)
    for s in results.sets:
        empty = [sel for sel, n in zip(s.selectors, s.matched) if n == 0]
        if s.n_edge_rows == 0:
            console.print(f'intervene "{s.name}": no traced edge matched; nothing was run', highlight=False)
        elif empty:
            console.print(f'intervene "{s.name}": {", ".join(empty)} matched no traced edge', highlight=False)


# --- plots --------------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "set"


def _figure_groups(results: InterventionResults) -> list[tuple[str, str, list[str]]]:
    """(file stem, title, set names): one figure per downstream head, sets into several heads together."""
    run = {s for s in results.rows.set.tolist()}
    by_head: dict[tuple[int, int], list[str]] = {}
    multi: list[str] = []
    for s in results.sets:
        if s.name not in run:
            continue
        if len(s.downstream) == 1:
            by_head.setdefault(s.downstream[0], []).append(s.name)
        else:
            multi.append(s.name)
    out = [(f"interventions-{l}.{h}", f"Interventions into head {l}.{h}", names) for (l, h), names in sorted(by_head.items())]
    if multi:
        out.append(("interventions-multi", "Multi-edge sets (several downstream heads)", multi))
    return out


def _panel(ax, results: InterventionResults, names: list[str], place: str, column: str, ylabel: str) -> None:
    rows = results.rows
    width = 0.8 / len(CONDITIONS)
    handles = []
    for c, (kind, control, label, colour) in enumerate(CONDITIONS):
        data, positions = [], []
        for g, name in enumerate(names):
            values = getattr(rows, column)[rows.where(set=name, kind=kind, place=place, control=control)]
            values = values[np.isfinite(values)]
            if len(values):
                data.append(values)
                positions.append(g - 0.4 + width * (c + 0.5))
        if not data:
            continue
        parts = ax.boxplot(data, positions=positions, widths=width * 0.85, patch_artist=True, showfliers=False,
                           showmeans=True, meanprops={"marker": "o", "markerfacecolor": "white", "markeredgecolor": "black",
                                                      "markersize": 3})
        for patch in parts["boxes"]:
            patch.set_facecolor(colour)
            patch.set_alpha(0.8)
        for line in parts["medians"]:
            line.set_color("black")
        handles.append((parts["boxes"][0], label))
    ax.axhline(0.0, color="#888888", linewidth=0.8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=20 if len(names) > 2 else 0, ha="right" if len(names) > 2 else "center", fontsize=8)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylabel(ylabel)
    ax.set_title(place)
    if handles:
        ax.legend([h for h, _ in handles], [label for _, label in handles], fontsize=7, loc="best")


def write_intervention_plots(results: InterventionResults, directory: str | os.PathLike) -> list[Path]:
    """A PNG per intervened downstream head (and one for sets into several heads): box plots of dF (top)
    and of the downstream score change (bottom) per set, for ablate / boost / random ablate / random boost,
    the places run side by side. Matplotlib's Agg canvas, no pyplot state; each file written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    directory = Path(directory)
    places = [p for p in ("global", "local") if p in set(results.rows.place.tolist())]
    written = []
    for stem, title, names in _figure_groups(results):
        fig = Figure(figsize=(max(5.0, 1.6 * len(names)) * len(places), 7.0), dpi=100)
        FigureCanvasAgg(fig)
        axes = fig.subplots(2, len(places), squeeze=False)
        for col, place in enumerate(places):
            _panel(axes[0, col], results, names, place, "delta_f", "F(X, e, h) - F(X)")
            _panel(axes[1, col], results, names, place, "delta_score", "change of the downstream score A'")
        fig.suptitle(f"{title}  ·  {results.model}")
        fig.tight_layout()
        path = directory / f"{_slug(stem)}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", metadata={"Software": None})
        written.append(path)
    return written
