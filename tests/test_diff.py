"""`circ diff`: the diff of two traces, its Rich summary, diff.json and the union drawing."""

from __future__ import annotations

import io
import json
import re
import shutil

import networkx as nx
import numpy as np
import pytest
from rich.console import Console

from circuitlang.models.model import load_model
from circuitlang.engine.results import FiringStats, Trace, TraceConfig, TracedEdges, TracedEvents
from circuitlang.runner.execute import run_plan
from circuitlang.lang import parse_spec
from circuitlang.report import write_trace_json
from circuitlang.report.diff import BOTH, ONLY_A, ONLY_B, build_diff_dot, diff_inputs, diff_traces, render_diff, write_diff
from tiny_models import build_gpt2

SPEC = 'model "{model}"\nprompts ioi 16 mixed seed 3\ntrace from auto 2\nkeep mass {mass}\nshow edges in >= {show} prompts\n'


@pytest.fixture(scope="module")
def specs(tmp_path_factory, gpt2_tokenizer):
    """A tiny GPT-2 and three specs on it: a.circ and same.circ (mass 0.7, show 1), more.circ (mass 0.95, show 2)."""
    root = tmp_path_factory.mktemp("diff")
    model_dir = build_gpt2(root / "tiny", gpt2_tokenizer, n_layer=4, n_head=8, n_embd=64, seed=2)
    for name, mass, show in (("a", 0.7, 1), ("same", 0.7, 1), ("more", 0.95, 2)):
        (root / f"{name}.circ").write_text(SPEC.format(model=model_dir, mass=mass, show=show))
    return root, load_model(str(model_dir))


@pytest.fixture(scope="module")
def traced(specs):
    """Each spec traced once, through the `load` callable the CLI passes (here without the run cache)."""
    root, model = specs
    traces = {}

    def load(path: str) -> Trace:
        if path not in traces:
            traces[path] = run_plan(parse_spec(path), model=model).trace
        return traces[path]

    return root, load


def test_identical_specs_give_an_empty_diff(traced):
    root, load = traced
    diff = diff_inputs(str(root / "a.circ"), str(root / "same.circ"), load)
    assert load(str(root / "a.circ")) is not load(str(root / "same.circ"))  # two independent runs
    assert diff.min_count == 1 and diff.jaccard_nodes == diff.jaccard_edges == 1.0
    assert diff.nodes_only_a == diff.nodes_only_b == diff.edges_only_a == diff.edges_only_b == ()
    assert len(diff.edges_both) == len(diff.changes) > 0
    assert all(c.delta_count == 0 and c.delta_total == 0.0 for c in diff.changes)
    assert all(x == y for _, x, y in diff.settings)


def test_more_mass_only_adds_edges(traced):
    """Mass 0.95 keeps a superset of each event's upstream heads, so every edge of A is in B and B has more."""
    root, load = traced
    a, b = str(root / "a.circ"), str(root / "more.circ")
    diff = diff_inputs(a, b, load, min_count=1)
    assert diff.nodes_only_a == diff.edges_only_a == () and diff.edges_only_b and diff.nodes_only_b
    comm_a = {(u, v) for u, v, d in load(a).graph.edges(data=True) if d["kind"] == "communication"}
    comm_b = {(u, v) for u, v, d in load(b).graph.edges(data=True) if d["kind"] == "communication"}
    assert set(diff.edges_both) == comm_a and set(diff.edges_only_b) == comm_b - comm_a
    assert diff.jaccard_edges == pytest.approx(len(comm_a) / len(comm_b)) and diff.jaccard_nodes < 1
    assert all(c.count_b >= c.count_a for c in diff.changes)
    only_b = [c for c in diff.changes if (c.up, c.down) in set(diff.edges_only_b)]
    assert only_b and all(c.count_a == 0 and c.total_a == 0.0 and c.total_b == load(b).graph.edges[c.up, c.down]["total"]
                          for c in only_b)
    deltas = [abs(c.delta_total) for c in diff.changes]
    assert deltas == sorted(deltas, reverse=True) and deltas[0] > 0
    assert [row for row in diff.settings if row[1] != row[2]] == [("mass", "0.7", "0.95")]
    # Without --min-count: the larger of the two specs' `show` filters.
    assert diff_inputs(a, b, load).min_count == 2


def test_report_lists_overlap_and_largest_changes(traced):
    root, load = traced
    diff = diff_inputs(str(root / "a.circ"), str(root / "more.circ"), load, min_count=1)
    console = Console(record=True, width=110, file=io.StringIO())
    render_diff(diff, console)
    text = console.export_text()
    assert re.search(r"mass +0\.7 +0\.95", text)
    assert re.search(rf"communication edges +{len(diff.edges_both)} +0 +{len(diff.edges_only_b)} +{diff.jaccard_edges:.2f}", text)
    top = diff.changes[0]
    assert re.search(rf"{top.up[0]}\.{top.up[1]} +{top.down[0]}\.{top.down[1]} {re.escape(top.down[2])} +{top.type} "
                     rf"+{top.count_a} +{top.count_b} ", text)
    assert "Largest changes of prompt count" in text


def test_diff_json_is_deterministic(traced, tmp_path):
    root, load = traced
    a, b = str(root / "a.circ"), str(root / "more.circ")
    write_diff(diff_inputs(a, b, load), tmp_path / "one")
    write_diff(diff_inputs(a, b, load), tmp_path / "two")
    assert (tmp_path / "one" / "diff.json").read_bytes() == (tmp_path / "two" / "diff.json").read_bytes()
    data = json.loads((tmp_path / "one" / "diff.json").read_text())
    assert data["format"] == "circuitlang.diff/1" and data["min_count"] == 2 and data["edges"]["only_a"] == []
    assert data["settings"]["mass"] == {"a": "0.7", "b": "0.95"}
    assert all(re.fullmatch(r"\d+\.\d+", e["source"]) and re.fullmatch(r"\d+\.\d+:.+", e["target"]) for e in data["changes"])


def test_trace_json_inputs_carry_their_show_filter(traced, tmp_path):
    root, load = traced
    for name, show in (("a", 3), ("b", 2)):
        plan = SPEC.format(model="tiny", mass=0.7, show=show)
        write_trace_json(load(str(root / "a.circ")), tmp_path / f"{name}.json", plan_text=plan)
    write_trace_json(load(str(root / "a.circ")), tmp_path / "bare.json")
    never = lambda path: pytest.fail("a trace.json input is read, not run")  # noqa: E731
    diff = diff_inputs(str(tmp_path / "a.json"), str(tmp_path / "b.json"), never)
    assert diff.min_count == 3 and diff.edges_only_a == diff.edges_only_b == ()
    assert diff_inputs(str(tmp_path / "bare.json"), str(tmp_path / "bare.json"), never).min_count == 1
    assert diff_inputs(str(tmp_path / "a.json"), str(root / "more.circ"), load).min_count == 3


# --- The drawing ---------------------------------------------------------------------------------------


def hand_trace(edges: list[tuple]) -> Trace:
    """A Trace around a hand-made graph of communication edges (up, token, side, count, total)."""
    g = nx.DiGraph()
    for up, token, side, count, total in edges:
        g.add_edge(up, token, kind="communication", type=side, count=count, total=total, mean=total / count)
        g.add_edge(token, token[:2], kind="attention", count=count)
    for n in g.nodes:
        g.nodes[n].update({"kind": "head", "firing": 4, "traced": 1} if len(n) == 2 else {"kind": "token"})
    ints, floats = np.zeros(0, np.int64), np.zeros(0)
    events = TracedEvents(ints, ints, ints, ints, ints, floats, floats, ints, (), floats, floats, np.zeros((0, 5)), np.zeros((0, 5)), floats, floats)
    traced = TracedEdges(ints, ints, ints, ints, ints, ints, ints, ints, np.zeros(0, np.str_), floats)
    firing = FiringStats(np.zeros((2, 3), np.int64), (((),) * 3,) * 2, np.zeros((2, 3, 1), np.int64))
    return Trace(TraceConfig(0.5, 0.7, "paper", ("1.2 end->IO",)), "hand", 2, 3, "hand-made", (("IO", "end"),) * 10,
                 firing, events, traced, g)


def test_drawing_colours_each_side_and_scales_widths_by_the_change(tmp_path):
    a = hand_trace([((0, 0), (1, 2, "IO"), "s", 9, 4.0), ((0, 1), (1, 2, "end"), "d", 3, 1.0)])
    b = hand_trace([((0, 1), (1, 2, "end"), "d", 5, 3.0), ((0, 2), (1, 1, "end"), "d", 4, 0.5)])
    diff = diff_traces(a, b, min_count=1)
    assert diff.nodes_only_a == ((0, 0), (1, 2, "IO")) and diff.nodes_only_b == ((0, 2), (1, 1), (1, 1, "end"))
    source = build_diff_dot(diff).source
    edge = lambda u, v: re.search(rf"^\s*{u} -> {v} \[(.*)\]$", source, re.M)[1]  # noqa: E731
    only_a, shared, only_b = edge("h0_0", r"t1_2_\d"), edge("h0_1", r"t1_2_\d"), edge("h0_2", r"t1_1_\d")
    assert f'color="{ONLY_A}"' in only_a and "penwidth=6.00" in only_a and "style=solid" in only_a  # |0 - 4| is the largest
    assert f'color="{BOTH}"' in shared and "penwidth=3.25" in shared and "style=dashed" in shared  # 0.5 + 5.5 * 2 / 4
    assert f'color="{ONLY_B}"' in only_b and "penwidth=1.19" in only_b  # 0.5 + 5.5 * 0.5 / 4
    assert re.search(rf'h0_0 \[.*color="{ONLY_A}"', source) and re.search(rf'h1_1 \[.*color="{ONLY_B}"', source)
    assert re.search(rf'h1_2 \[.*color="{BOTH}"', source)
    assert source.index("layer0_heads") < source.index("layer1_tokens") < source.index("layer1_heads")
    drawing = write_diff(diff, tmp_path)
    names = sorted(p.name for p in drawing.paths)
    if shutil.which("dot") is None:
        assert names == ["diff.dot", "diff.json"] and "apt-get install graphviz" in drawing.message
    else:
        assert names == ["diff.dot", "diff.json", "diff.png", "diff.svg"] and drawing.message is None
        assert (tmp_path / "diff.png").read_bytes().startswith(b"\x89PNG") and ONLY_B in (tmp_path / "diff.svg").read_text()


def test_no_change_prints_none_not_empty_tables_and_heads_read_layer_dot_head():
    a = hand_trace([((0, 0), (1, 2, "IO"), "s", 9, 4.0)])
    diff = diff_traces(a, a, min_count=1)
    console = Console(record=True, width=110, file=io.StringIO())
    render_diff(diff, console)
    text = console.export_text()
    assert "Largest changes of total contribution (B - A): none" in text
    assert "Largest changes of prompt count (B - A): none" in text and "count A" not in text
    source = build_diff_dot(diff).source
    assert re.search(r'h0_0 \[label="?0\.0"?[ \]]', source) and "(0, 0)" not in source


def test_the_changes_fit_80_columns_uncut(tmp_path):
    """A file or a narrow terminal is 80 columns: every cell whole, `mlp 10` on one line (issue 26, item 6)."""
    from circuitlang.engine.results import MLP

    a = hand_trace([((10, MLP), (11, 2, "end"), "s", 9, 1.33e-5), ((0, 1), (17, 3, "S2+1"), "d", 3, 1.0)])
    b = hand_trace([((10, MLP), (11, 2, "end"), "s", 205, -12345.6789), ((0, 1), (17, 3, "S2+1"), "d", 5, 3.0)])
    console = Console(record=True, width=80, file=io.StringIO())
    render_diff(diff_traces(a, b, 1), console)
    text = console.export_text()
    assert "…" not in text
    assert re.search(r"^ mlp 10 +11\.2 end +s +9 +205 +1\.33e-05 +-1\.23e\+04 +-1\.23e\+04 *$", text, re.M)
    assert re.search(r"^ 0\.1 +17\.3 S2\+1 +d +3 +5 +1 +3 +\+2 *$", text, re.M)
