"""Writers beyond heads (`sources`), the split of each signal by writer class, and the readings of the
paper (`readings`), on a GPT-2-style model with nonzero query/key and value biases."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from circuitlang.data.ioi import ioi_prompts
from circuitlang.engine import decompose as dc
from circuitlang.engine.forward import capture
from circuitlang.models.geometry import attention_geometry
from circuitlang.models.model import load_model
from circuitlang.engine.results import EMBED, MLP, WRITER_CLASSES
from circuitlang.engine.trace import trace, writer_contributions
from circuitlang.lang import SpecError, parse_text
from circuitlang.lang.plan import READING_SETS, Readings
from circuitlang.report.draw import build_dot
from circuitlang.report.export import graph_heads, read_trace_json, write_graphml, write_trace_json, writer_shares
from checks import busiest_roots
from tiny_models import build_gpt2

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from reference import reference_trace  # noqa: E402

ALL = ("heads", "mlp", "embed", "bias")


@pytest.fixture(scope="module")
def biased(tmp_path_factory, gpt2_tokenizer):
    """Four layers with random query/key biases and value biases (real GPT-2 has both)."""
    path = build_gpt2(tmp_path_factory.mktemp("biased"), gpt2_tokenizer, n_layer=4, value_bias=0.05, seed=0)
    return path, load_model(str(path))


@pytest.fixture(scope="module")
def prompts(gpt2_tokenizer):
    return ioi_prompts(gpt2_tokenizer, n=8, seed=5)


@pytest.fixture(scope="module")
def acts(biased, prompts):
    return capture(biased[1], prompts, writers=True)


@pytest.fixture(scope="module")
def roots(acts, prompts, biased):
    return busiest_roots(acts, prompts, biased[1].n_layers - 1, k=2, distinct=False)


def test_the_value_bias_is_read_before_it_is_folded(biased):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(biased[0]), device="cpu", dtype=torch.float32)
    bridge.enable_compatibility_mode(fold_value_biases=False, disable_warnings=True)
    assert biased[1].value_bias is not None and biased[1].value_bias.abs().max() > 0.01
    torch.testing.assert_close(biased[1].value_bias, bridge.b_V.detach().float(), rtol=1e-5, atol=1e-5)


def test_writer_nodes_are_leaves_and_every_writer_adds_up_to_the_signal(biased, acts, prompts, roots):
    model = biased[1]
    t = trace(model, prompts, roots, writers=ALL, activations=acts)
    up = t.edges.up_head
    assert (up == MLP).any() and (up == EMBED).any(), "MLPs and embeddings carry much of this model's signal"
    assert (t.events.head >= 0).all()  # the walk never recurses into a writer node
    kinds = {t.graph.nodes[n]["kind"] for n in t.graph.nodes}
    assert {"head", "token", "mlp", "embed"} <= kinds
    # Completeness with writer nodes: the candidates' contributions plus the homogeneous term are the signal,
    # and the kept writers' rows are among them (each MLP and the embeddings read from their own writes).
    geometry = attention_geometry(model)
    for side, column in (("d", "dest"), ("s", "src")):
        parts = writer_contributions(acts, geometry, t.events, side)
        signal = getattr(t.events, f"signal_{column}")
        np.testing.assert_allclose(sum(parts.values()), signal, rtol=1e-4, atol=1e-4 * np.abs(signal).max())
        split = getattr(t.events, f"split_{column}")
        np.testing.assert_allclose(split.sum(1), signal, rtol=1e-4, atol=1e-4 * np.abs(signal).max())
        mlp = sum(v for k, v in parts.items() if k.startswith("mlp"))
        heads = sum(v for k, v in parts.items() if k.startswith("head"))
        np.testing.assert_allclose(split[:, WRITER_CLASSES.index("mlp")], mlp, atol=1e-4 * np.abs(signal).max())
        np.testing.assert_allclose(split[:, WRITER_CLASSES.index("heads")], heads, atol=1e-4 * np.abs(signal).max())
        rows = t.edges.side == side
        for e, ul, uh, c in zip(t.edges.event[rows], t.edges.up_layer[rows], t.edges.up_head[rows], t.edges.contribution[rows]):
            name = {MLP: f"mlp {ul}", EMBED: "embed"}.get(uh, f"head {ul}.{uh}")
            if uh >= -1 or uh == EMBED:
                assert abs(parts[name][e] - c) <= 1e-4 * abs(signal).max()


def test_heads_only_is_the_default_and_the_split_is_the_same_whatever_the_sources(biased, acts, prompts, roots):
    heads_only = trace(biased[1], prompts, roots, activations=acts)
    everything = trace(biased[1], prompts, roots, writers=ALL, activations=acts)
    assert (heads_only.edges.up_head >= 0).all() and heads_only.config.sources == "heads"
    assert len(graph_heads(everything.graph)) <= len(graph_heads(heads_only.graph)) + biased[1].n_heads * biased[1].n_layers
    shares = writer_shares(heads_only, graph_heads(heads_only.graph))
    assert shares and all(abs(sum(by.values()) - 1) < 1e-6 for sides in shares.values() for by in sides.values())
    # the heads carry only part of a random model's signal: that is what the split is there to show
    assert min(sides["d"]["heads"] for sides in shares.values() if "d" in sides) < 0.9


def test_writer_nodes_survive_trace_json_graphml_and_the_drawing(biased, acts, prompts, roots, tmp_path):
    t = trace(biased[1], prompts, roots, writers=ALL, activations=acts)
    back = read_trace_json(write_trace_json(t, tmp_path / "trace.json"))
    assert sorted(back.graph.nodes) == sorted(t.graph.nodes)
    assert back.config.sources == "heads mlp embed bias"
    np.testing.assert_allclose(back.events.split_dest, t.events.split_dest, rtol=1e-6, atol=1e-9)
    text = write_graphml(t, tmp_path / "trace.graphml").read_text()
    assert 'id="embed"' in text and "mlp " in text
    source = build_dot(t).source
    assert "invhouse" in source and "box3d" in source


@pytest.mark.parametrize("negative", ["top", "none"])
def test_a_side_whose_writers_sum_to_at_most_zero(negative):
    contributions = torch.tensor([[3.0, -1.0, -4.0], [2.0, 1.0, 0.5]])
    kept = dc.select_upstream(contributions, 0.7, negative)
    assert kept[1].tolist() == [True, True, False]
    assert kept[0].tolist() == ([True, False, False] if negative == "top" else [False, False, False])


def test_the_authors_readings_give_their_code_s_edges_and_counts(biased, acts, prompts, roots):
    """The reference written the way the authors' code reads eq. (8) ([o; 1]) and builds its graph (an
    unmemoised walk, the first prompt kept) gives the engine's `readings authors` graph, edge for edge."""
    model = biased[1]
    ours = trace(model, prompts, roots, readings=READING_SETS["authors"], activations=acts)
    theirs = reference_trace(model, prompts, roots, acts, authors=True)
    default = trace(model, prompts, roots, activations=acts)
    comm = lambda g: {(u, v): d for u, v, d in g.edges(data=True) if d["kind"] == "communication"}  # noqa: E731
    a, b = comm(ours.graph), comm(theirs.graph)
    assert set(a) == set(b) and a
    for key in a:
        assert (a[key]["count"], a[key]["type"]) == (b[key]["count"], b[key]["type"]), key
        assert a[key]["total"] == pytest.approx(b[key]["total"], rel=1e-4, abs=1e-4)
    attention = lambda g: {(u, v): d["count"] for u, v, d in g.edges(data=True) if d["kind"] == "attention"}  # noqa: E731
    assert attention(ours.graph) == attention(theirs.graph)
    # with query/key biases the homogeneous 1 changes which edges are kept, and events inflate the counts
    assert set(a) != set(comm(default.graph)) or any(a[k]["count"] != d["count"] for k, d in comm(default.graph).items() if k in a)


def test_the_value_bias_reading_moves_contributions_from_b_O_to_the_heads(biased, acts, prompts, roots):
    model = biased[1]
    folded = trace(model, prompts, roots, writers=ALL, activations=acts)
    head = trace(model, prompts, roots, writers=ALL, readings=Readings(value="head"), activations=acts)
    key = lambda ev: list(zip(ev.prompt, ev.layer, ev.head, ev.dest, ev.src))  # noqa: E731
    rows = {k: e for e, k in enumerate(key(folded.events))}
    common = [(rows[k], e) for e, k in enumerate(key(head.events)) if k in rows]  # the kept writers, so the walk, differ
    a, b = np.array([f for f, _ in common]), np.array([h for _, h in common])
    assert len(common) >= 2
    np.testing.assert_allclose(head.events.signal_dest[b], folded.events.signal_dest[a], rtol=1e-6)  # the same signal
    k_heads, k_bias = WRITER_CLASSES.index("heads"), WRITER_CLASSES.index("bias")
    moved = head.events.split_dest[b, k_heads] - folded.events.split_dest[a, k_heads]
    assert np.abs(moved).max() > 1e-3
    np.testing.assert_allclose(moved, folded.events.split_dest[a, k_bias] - head.events.split_dest[b, k_bias], atol=1e-4)


def test_sources_and_readings_in_a_spec():
    plan = parse_text("sources heads mlp embed bias\nreadings authors count prompts\n")
    assert plan.writers == ALL and plan.readings == Readings("one", "folded", "top", "prompts", "authors")
    assert str(plan.readings) == "authors count prompts" and str(READING_SETS["paper"]) == "paper"
    assert str(parse_text("readings authors count prompts labels circuitlang\n").readings) == "circuitlang homogeneous one"
    assert parse_text(f"readings {plan.readings}\n").readings == plan.readings
    for text, message in [("sources mlp", "sources must include heads"), ("sources heads mpl", 'did you mean "mlp"'),
                          ("readings author", 'did you mean "authors"'), ("readings paper count", "needs a value"),
                          ("readings paper value both", "reading value is folded or head")]:
        with pytest.raises(SpecError, match=message):
            parse_text(text + "\n")


def test_circ_diff_shows_writer_nodes_as_such(biased, acts, prompts, roots):
    from rich.console import Console

    from circuitlang.report.diff import build_diff_dot, diff_traces, render_diff

    heads_only = trace(biased[1], prompts, roots, activations=acts)
    everything = trace(biased[1], prompts, roots, writers=ALL, activations=acts)
    diff = diff_traces(heads_only, everything, 1)
    assert any(len(n) == 2 and n[1] < 0 for n in diff.nodes_only_b)
    source = build_diff_dot(diff).source
    assert "invhouse" in source or "box3d" in source
    console = Console(record=True, width=120)
    render_diff(diff, console)
    text = console.export_text()
    assert "embed" in text or "mlp " in text
