"""Models whose circuit is known by construction: the trace must find exactly that circuit."""

from __future__ import annotations

import numpy as np
import pytest

from circuitlang.data.prompts import Prompt, PromptSet
from circuitlang.engine.forward import capture
from circuitlang.models.model import load_model
from circuitlang.models.geometry import attention_geometry
from circuitlang.runner.execute import choose_roots
from circuitlang.engine.trace import trace, writer_contributions
from circuitlang.lang.plan import Root
from tiny_models import build_handbuilt


@pytest.fixture(scope="module")
def tokens(gpt2_tokenizer):
    ids = lambda word: gpt2_tokenizer(word, add_special_tokens=False)["input_ids"][0]  # noqa: E731
    return {w: ids(w) for w in (" the", " went", " Mary", " to", " John", " store", ",")}


@pytest.fixture(scope="module")
def prompts(tokens):
    """Filler, A (= Mary) somewhere, B (= John) later; roles A and B."""
    layouts = [
        (" the", " went", " Mary", " to", " John"),
        (" the", " Mary", " went", " to", " store", " John", ","),
        (" went", " the", " store", " Mary", " to", " the", " John"),
    ]
    out = []
    for words in layouts:
        a, b = words.index(" Mary"), words.index(" John")
        labels = tuple("A" if k == a else "B" if k == b else f"'{w.strip()}'" for k, w in enumerate(words))
        out.append(Prompt(text="".join(words), token_ids=tuple(tokens[w] for w in words), roles=(("A", a), ("B", b)), labels=labels))
    return PromptSet(tuple(out), ("A", "B"), "hand-built")


@pytest.fixture(scope="module")
def two_layer(tmp_path_factory, gpt2_tokenizer, tokens):
    path = build_handbuilt(tmp_path_factory.mktemp("hand2"), gpt2_tokenizer, tokens[" Mary"], tokens[" John"])
    return load_model(str(path))


def communication(graph):
    return {(u, v, d["type"], d["count"]) for u, v, d in graph.edges(data=True) if d["kind"] == "communication"}


def test_two_layer_trace_is_exactly_the_built_circuit(two_layer, prompts):
    t = trace(two_layer, prompts, [Root(1, 0, "B", "A")])
    assert communication(t.graph) == {((0, 0), (1, 0, "A"), "s", 3), ((0, 1), (1, 0, "B"), "d", 3)}
    # The root's Omega has rank 1, so S_ij is that one slice; the trace recursed into both writers.
    root = t.events.layer == 1
    assert root.sum() == 3 and (t.events.n_slices[root] == 1).all()
    assert (t.events.attention[root] > 0.9).all()
    assert sorted(set(zip(t.events.layer.tolist(), t.events.head.tolist()))) == [(0, 0), (0, 1), (1, 0)]
    assert len(t.edges) == 6 and (t.edges.contribution > 0).all()


def test_each_edge_carries_the_whole_signal(two_layer, prompts):
    t = trace(two_layer, prompts, [Root(1, 0, "B", "A")])
    acts = capture(two_layer, prompts, writers=True)
    root = np.nonzero(t.events.layer == 1)[0]
    for side, signal, writer in (("s", t.events.signal_src, "head 0.0"), ("d", t.events.signal_dest, "head 0.1")):
        parts = writer_contributions(acts, attention_geometry(two_layer), t.events, side)
        np.testing.assert_allclose(parts[writer][root], signal[root], rtol=1e-4)
        others = sum(v[root] for k, v in parts.items() if k != writer)
        np.testing.assert_allclose(others, 0, atol=1e-4 * signal[root].max())


def test_one_layer_model_has_the_firing_and_no_edges(tmp_path, gpt2_tokenizer, tokens, prompts):
    model = load_model(str(build_handbuilt(tmp_path, gpt2_tokenizer, tokens[" Mary"], tokens[" John"], n_layer=1)))
    t = trace(model, prompts, [Root(0, 1, "B", "B")])
    assert len(t.events) == 3 and len(t.edges) == 0
    assert t.graph.number_of_edges() == 0 and set(t.graph.nodes) == {(0, 1)}
    assert t.firing.counts[0, 2:].sum() == 0  # heads without queries and keys never fire


def test_auto_roots_pick_the_head_with_the_direct_effect(tmp_path, gpt2_tokenizer, tokens):
    model = load_model(str(build_handbuilt(tmp_path, gpt2_tokenizer, tokens[" Mary"], tokens[" John"], copy=20.0)))
    layouts = [(" the", " went", " Mary", " to", " John"), (" the", " Mary", " went", " to", " store", " John")]
    prompts = PromptSet(tuple(
        Prompt(text="".join(w), token_ids=tuple(tokens[x] for x in w), roles=(("A", w.index(" Mary")), ("B", len(w) - 1)),
               labels=tuple("A" if x == " Mary" else "B" if k == len(w) - 1 else f"'{x.strip()}'" for k, x in enumerate(w)),
               target=tokens[" Mary"], distractor=tokens[" John"])
        for w in layouts), ("A", "B"), "hand-built answers")
    acts = capture(model, prompts)
    assert (acts.logit_diff > 0).all()
    chosen = choose_roots(model, acts, prompts, k=1, threshold=0.5)
    assert [c.root for c in chosen] == [Root(1, 0, "B", "A")]
    assert chosen[0].fired == 2 and chosen[0].direct_effect > 1.0
