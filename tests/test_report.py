"""The report layer: trace.json, GraphML, the Fig. 5 drawing, the Rich report, atomic writes."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
from pathlib import Path

import graphviz
import networkx as nx
import numpy as np
import pytest
from rich.console import Console

from circuitlang.data.ioi import ioi_prompts
from circuitlang.engine.forward import capture
from circuitlang.models.model import load_model
from circuitlang.engine.results import FiringStats, Trace, TraceConfig, TracedEdges, TracedEvents
from circuitlang.engine.trace import trace
from circuitlang.lang.plan import Readings
from circuitlang.report import (
    atomic_path,
    atomic_write,
    build_dot,
    edge_filter,
    known_head_set,
    precision_recall,
    read_trace_json,
    render_report,
    trace_to_dict,
    write_drawing,
    write_graphml,
    write_trace_json,
)
from circuitlang.report.draw import SIDE_COLOURS
from checks import busiest_roots
from tiny_models import build_gpt2

PLAN = "model tiny\ntrace from 3.6 IO->IO-1\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, gpt2_tokenizer):
    """A tiny 4-layer GPT-2, 16 IOI prompts, and the last layer's three most firing (head, dest, src)."""
    path = build_gpt2(tmp_path_factory.mktemp("gpt2"), gpt2_tokenizer, n_layer=4, n_head=8, n_embd=64, seed=2)
    model = load_model(str(path))
    prompts = ioi_prompts(gpt2_tokenizer, n=16, seed=3)
    acts = capture(model, prompts)
    roots = busiest_roots(acts, prompts, model.n_layers - 1)
    return model, prompts, roots


@pytest.fixture(scope="module")
def traced(setup):
    model, prompts, roots = setup
    t = trace(model, prompts, roots)
    assert {d["type"] for *_, d in t.graph.edges(data=True) if d["kind"] == "communication"} == {"s", "d"}
    return t


def hand_trace(graph: nx.DiGraph) -> Trace:
    """A Trace around a hand-made graph: 2 layers x 3 heads, 10 prompts, no event rows."""
    ints, floats = np.zeros(0, np.int64), np.zeros(0)
    events = TracedEvents(ints, ints, ints, ints, ints, floats, floats, ints, (), floats, floats, np.zeros((0, 5)), np.zeros((0, 5)), floats, floats)
    edges = TracedEdges(ints, ints, ints, ints, ints, ints, ints, ints, np.zeros(0, np.str_), floats)
    firing = FiringStats(np.full((2, 3), 4), tuple(tuple(np.array([1, 2, 2, 3]) for _ in range(3)) for _ in range(2)),
                         np.zeros((2, 3, 4), np.int64))
    return Trace(TraceConfig(0.5, 0.7, "paper", ("1.2 end->IO",)), "hand", 2, 3, "hand-made", (("IO", "end"),) * 10,
                 firing, events, edges, graph)


def hand_graph() -> nx.DiGraph:
    """0.0 -s-> (1.2, IO) seen 9 times, 0.1 -d-> (1.2, end) 3 times, 0.2 -d-> (1.1, end) once."""
    g = nx.DiGraph()
    for (u, v, side, count, total) in (((0, 0), (1, 2, "IO"), "s", 9, 4.5), ((0, 1), (1, 2, "end"), "d", 3, 0.9),
                                       ((0, 2), (1, 1, "end"), "d", 1, 0.1)):
        g.add_edge(u, v, kind="communication", type=side, count=count, total=total, mean=total / count)
        g.add_edge(v, v[:2], kind="attention", count=count)
    for n in g.nodes:
        g.nodes[n].update({"kind": "head", "firing": 4, "traced": n[1] + 1} if len(n) == 2 else {"kind": "token"})
    return g


# --- trace.json and GraphML --------------------------------------------------------------------------


def test_trace_json_round_trips_byte_for_byte(traced, tmp_path):
    write_trace_json(traced, tmp_path / "a.json", PLAN)
    back = read_trace_json(tmp_path / "a.json")
    assert trace_to_dict(back) == trace_to_dict(traced, PLAN)
    write_trace_json(back, tmp_path / "b.json")  # the plan text travels with the trace read back
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    # Numpy columns with the engine's dtypes, the graph with tuple ids and the same attributes.
    assert back.edges.side.dtype == traced.edges.side.dtype and back.events.layer.dtype == np.int64
    assert np.array_equal(back.edges.side, traced.edges.side) and np.array_equal(back.firing.counts, traced.firing.counts)
    np.testing.assert_allclose(back.edges.contribution, traced.edges.contribution, rtol=1e-6)
    assert all(np.array_equal(a, b) for a, b in zip(back.events.slices, traced.events.slices))
    assert sorted(back.graph.nodes(data=True)) == sorted(traced.graph.nodes(data=True))
    for u, v, d in traced.graph.edges(data=True):
        e = back.graph.edges[u, v]
        assert e.keys() == d.keys() and all(e[k] == (pytest.approx(x, rel=1e-6) if isinstance(x, float) else x) for k, x in d.items())
    assert back.config == traced.config and back.labels == traced.labels


def test_independent_traces_write_identical_files_and_no_timings(setup, traced, tmp_path):
    again = trace(*setup)  # a fresh forward pass and walk
    write_trace_json(traced, tmp_path / "a.json")
    write_trace_json(again, tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    data = trace_to_dict(traced)
    assert "timings" not in data and data["plan"] is None
    assert set(trace_to_dict(traced, include_timings=True)["timings"]) == set(traced.timings)
    heads = {r["id"] for r in data["graph"]["nodes"] if r["kind"] == "head"}
    assert all(re.fullmatch(r"\d+\.\d+", h) for h in heads)
    assert all(re.fullmatch(r"\d+\.\d+:.+", r["target"]) for r in data["graph"]["edges"] if r["kind"] == "communication")


def test_graphml_reads_back_with_networkx(traced, tmp_path):
    write_graphml(traced, tmp_path / "g.graphml")
    g = nx.read_graphml(tmp_path / "g.graphml")
    assert (g.number_of_nodes(), g.number_of_edges()) == (traced.graph.number_of_nodes(), traced.graph.number_of_edges())
    (u, v, data), = [e for e in traced.graph.edges(data=True) if e[2]["kind"] == "communication"][:1]
    token = f"{v[0]}.{v[1]}:{v[2]}"
    assert g.nodes[token] == {"layer": v[0], "head": v[1], "role": v[2], "kind": "token"}
    assert g.edges[f"{u[0]}.{u[1]}", token]["count"] == data["count"]


def test_edge_filter_keeps_frequent_edges_their_attention_and_nodes():
    g = hand_graph()
    kept = edge_filter(g, 3)
    assert set(kept.edges) == {((0, 0), (1, 2, "IO")), ((1, 2, "IO"), (1, 2)), ((0, 1), (1, 2, "end")), ((1, 2, "end"), (1, 2))}
    assert set(kept.nodes) == {(0, 0), (0, 1), (1, 2), (1, 2, "IO"), (1, 2, "end")}
    assert kept.nodes[0, 1] == g.nodes[0, 1] and kept.edges[(0, 0), (1, 2, "IO")] == g.edges[(0, 0), (1, 2, "IO")]
    assert set(edge_filter(g, 9).nodes) == {(0, 0), (1, 2, "IO"), (1, 2)}
    assert edge_filter(g, 10).number_of_nodes() == 0
    assert nx.utils.graphs_equal(edge_filter(g, 1), g)


def test_known_heads_and_precision_recall():
    ioi = known_head_set("ioi")
    assert {(9, 9), (9, 6), (10, 0), (2, 2), (4, 11)} <= ioi and len(ioi) == 26
    assert known_head_set(("9.6", "10.0")) == {(9, 6), (10, 0)} and known_head_set(None) == set()
    p, r, f1 = precision_recall({(9, 6), (10, 0), (3, 3), (4, 4)}, {(9, 6), (10, 0), (9, 9)})
    assert (p, r) == (0.5, pytest.approx(2 / 3)) and f1 == pytest.approx(4 / 7)
    assert precision_recall(set(), {(9, 6)}) == (0.0, 0.0, 0.0)


# --- The drawing (Fig. 5) ----------------------------------------------------------------------------


def _block(source: str, name: str) -> str:
    return re.search(r"subgraph %s \{(.*?)\}" % name, source, re.S)[1]


def test_dot_encodes_sides_widths_known_heads_and_layers():
    source = build_dot(hand_trace(hand_graph()), min_count=3, known={(0, 0)}).source
    edge = lambda u, v: re.search(rf"^\s*{u} -> {v} \[(.*)\]$", source, re.M)[1]  # noqa: E731
    assert f'color="{SIDE_COLOURS["s"]}"' in edge("h0_0", r"t1_2_\d") and "penwidth=6.00" in edge("h0_0", r"t1_2_\d")
    into_end = edge("h0_1", r"t1_2_\d")
    assert f'color="{SIDE_COLOURS["d"]}"' in into_end and "penwidth=1.60" in into_end  # 0.5 + 5.5 * 0.9 / 4.5
    assert re.search(r"h0_0 \[.*color=green.*penwidth=3", source) and not re.search(r"h0_1 \[.*color=green", source)
    assert "h0_2" not in source and "1.1 end" not in source  # the edge seen once is filtered out
    assert source.count("rank=same") == 3
    assert set(re.findall(r"\b[ht]\d_\d\w*(?= \[)", _block(source, "layer0_heads"))) == {"h0_0", "h0_1"}
    assert set(re.findall(r'label="([^"]+)"', _block(source, "layer1_tokens"))) == {"1.2 IO", "1.2 end"}
    assert re.search(r'h1_2 \[label="?1\.2"?[ \]]', _block(source, "layer1_heads"))  # the paper's notation, as token boxes
    assert source.index("layer0_heads") < source.index("layer1_tokens") < source.index("layer1_heads")
    assert "hand" in source and "1.2 end-&gt;IO" in source and "count ≥ 3 (of 10 prompts)" in source
    assert source == build_dot(hand_trace(hand_graph()), min_count=3, known={(0, 0)}).source


def test_head_nodes_read_layer_dot_head_and_the_legend_names_known_heads_only_when_marked():
    plain, marked = (build_dot(hand_trace(hand_graph()), min_count=3, known=k).source for k in ((), {(0, 0)}))
    assert "(0, 0)" not in plain and "(1, 2)" not in plain and re.search(r'h0_0 \[label="?0\.0"?[ \]]', plain)
    assert "green border: known head" not in plain and "green border: known head" in marked


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot program is not installed")
def test_svg_and_png_are_drawn(traced, tmp_path):
    drawing = write_drawing(traced, tmp_path, "trace", ("json", "svg", "png"), min_count=2, known={(3, 6)})
    assert drawing.message is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace.dot", "trace.png", "trace.svg"]
    assert (tmp_path / "trace.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert "<svg" in (tmp_path / "trace.svg").read_text()


def test_without_dot_only_the_dot_file_is_written(traced, tmp_path, monkeypatch):
    def missing(*args, **kwargs):
        raise graphviz.ExecutableNotFound(["dot"])

    monkeypatch.setattr(graphviz.Source, "pipe", missing)
    drawing = write_drawing(traced, tmp_path, "trace", ("svg", "png"), min_count=1)
    assert [p.name for p in tmp_path.iterdir()] == ["trace.dot"] and drawing.paths == [tmp_path / "trace.dot"]
    assert "apt-get install graphviz" in drawing.message and "brew install graphviz" in drawing.message
    assert write_drawing(traced, tmp_path / "none", "trace", ("json", "graphml")) == ([], None)
    assert not (tmp_path / "none").exists()


# --- Atomic writes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_atomic_write_leaves_nothing_when_the_writer_fails(tmp_path, error):
    with pytest.raises(error):
        with atomic_path(tmp_path / "new.json") as tmp:
            tmp.write_text("half a fi")
            raise error()
    assert list(tmp_path.iterdir()) == []
    atomic_write(tmp_path / "old.json", "complete\n")
    with pytest.raises(error):
        with atomic_path(tmp_path / "old.json") as tmp:
            tmp.write_text("half")
            raise error()
    assert [p.name for p in tmp_path.iterdir()] == ["old.json"] and (tmp_path / "old.json").read_text() == "complete\n"


def test_trace_json_is_not_written_when_serialising_fails(traced, tmp_path, monkeypatch):
    def broken(data):
        raise KeyboardInterrupt

    monkeypatch.setattr("circuitlang.report.export.dumps", broken)
    with pytest.raises(KeyboardInterrupt):
        write_trace_json(traced, tmp_path / "trace.json")
    assert list(tmp_path.iterdir()) == []


# --- The Rich report ---------------------------------------------------------------------------------


def test_report_renders_sections_and_the_top_edge(traced):
    console = Console(record=True, width=100, file=io.StringIO())
    render_report(traced, console, min_count=2, known={(3, 6), (0, 1), (7, 7)})
    text = console.export_text()
    for title in ("Summary", "Firing counts per head", "Top edges by count", "Top edges by total contribution",
                  "|S_ij| per head", "Traced heads vs known heads"):
        assert title in text
    shown = edge_filter(traced.graph, 2)
    comm = [(u, v, d) for u, v, d in shown.edges(data=True) if d["kind"] == "communication"]
    u, v, d = min(comm, key=lambda e: (-e[2]["count"], e[0], e[1]))
    assert re.search(rf"{u[0]}\.{u[1]} +{v[0]}\.{v[1]} {re.escape(v[2])} +{d['type']} +{d['count']} ", text)
    assert re.search(r"missed +7\.7", text) and max(len(line) for line in text.splitlines()) <= 100
    console = Console(record=True, width=100, file=io.StringIO())
    render_report(traced, console, min_count=1)
    assert "Traced heads vs known" not in console.export_text()


def _summary_and_titles(t) -> str:
    console = Console(record=True, width=100, file=io.StringIO())
    render_report(t, console, min_count=1)
    return console.export_text()


def test_a_root_set_and_many_roots_are_summarised_per_head(setup):
    """A root set, or more than 6 roots, is one line of totals and one line per layer with each head's count (its
    root firings / its roots), not a line per root; the count headers say what they count."""
    model, prompts, roots = setup
    last = model.n_layers - 1
    whole = trace(model, prompts, [f"every firing of layer {last} except source 1"])
    text = _summary_and_titles(whole)
    events = whole.events
    firings = (events.layer == last) & (events.src != 1)
    per_head = {h: int(((events.head == h) & firings).sum()) for h in range(model.n_heads)}
    assert f"every firing of layer {last} except source 1: {int(firings.sum())} root firings on " \
           f"{sum(n > 0 for n in per_head.values())} heads" in text
    line = next(line for line in text.splitlines() if f"layer {last}: " in line)
    assert re.findall(rf"{last}\.(\d+) (\d+)", line)[:3] == [(str(h), str(n)) for h, n in per_head.items() if n][:3]
    assert "Top edges by count (of 16 prompts)" in text

    dest, src = roots[0].dest, roots[0].src
    many = trace(model, prompts, [f"{last}.{h} {dest}->{src}" for h in range(model.n_heads)], readings=Readings(count="events"))
    text = _summary_and_titles(many)
    assert f"{model.n_heads} explicit roots on {model.n_heads} heads" in text and f"{last}.1 {dest}->{src}" not in text
    assert re.search(rf"layer {last}: {last}\.0 1, {last}\.1 1,", text)
    assert "Top edges by count (events, over 16 prompts)" in text and "of 16 prompts" not in text
    few = _summary_and_titles(trace(model, prompts, roots))
    assert ", ".join(map(str, roots)) in few


def test_neuronpedia_marks_the_firings_of_a_root_set(setup):
    from circuitlang.report.neuronpedia import prompt_graph

    model, prompts, _ = setup
    last = model.n_layers - 1
    t = trace(model, prompts, [f"every firing of layers {last - 1}-{last} to S2"])
    marked = 0
    for p in range(len(prompts)):
        for node in prompt_graph(t, p, "s")["nodes"]:
            for f in node.get("svt_firings", ()):
                layer = int(node["node_id"].split("_")[0])
                assert f["root"] == (layer >= last - 1 and f["src"] == prompts[p].role("S2"))
                marked += f["root"]
    assert marked > 0


def test_report_layer_never_imports_torch():
    code = ("import sys, types; sys.modules['torch'] = None; pkg = types.ModuleType('circuitlang'); "
            f"pkg.__path__ = [{str(Path(__file__).parents[1] / 'circuitlang')!r}]; sys.modules['circuitlang'] = pkg; "
            "import circuitlang.report")
    subprocess.run([sys.executable, "-c", code], check=True)
