"""Edge circuits scored by the trace's own interventions (engine/edge_circuits.py): the stacked, resumed passes
against one pass per prompt and variant through the whole model, and a one-firing case computed by hand."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from rich.console import Console

from circuitlang.data.ioi import ioi_prompts
from circuitlang.engine.edge_circuits import EdgeCircuits, edge_circuits, graph_edges
from circuitlang.engine.forward import capture
from circuitlang.engine.graph import aggregate
from circuitlang.engine.trace import slices_for, trace
from circuitlang.lang.compiler import format_plan, parse_text
from circuitlang.lang.errors import SpecError
from circuitlang.lang.plan import Root
from circuitlang.models.geometry import attention_geometry
from circuitlang.models.model import load_model
from checks import busiest_roots
from tiny_models import READER, build_gpt2, build_handbuilt, build_rotary, reader_prompts, word_ids


@pytest.fixture(scope="module")
def words(gpt2_tokenizer):
    return word_ids(gpt2_tokenizer, (" the", " went", " Mary", " to", " John", " store", ",", " and"))


@pytest.fixture(scope="module")
def reader(tmp_path_factory, gpt2_tokenizer, words):
    return load_model(str(build_handbuilt(tmp_path_factory.mktemp("reader"), gpt2_tokenizer, words[" Mary"], words[" John"], **READER)))


@pytest.fixture(scope="module")
def prompts(words):
    layouts = [(" the", " went", " Mary", " to", " John"), (" the", " Mary", " went", " to", " store", " John"),
               (" went", " the", " store", " Mary", " to", " the", " John"), (" Mary", " and", " the", " store", " John")]
    return reader_prompts(words, layouts, "hand-built readers")


def only_events(t, keep: np.ndarray):
    """The trace cut down to the events `keep` (bool) and their edges, the graph aggregated again."""
    ev, e = t.events, t.edges
    number = np.cumsum(keep) - 1
    events = dataclasses.replace(ev, **{f.name: (tuple(ev.slices[k] for k in np.nonzero(keep)[0]) if f.name == "slices"
                                                 else getattr(ev, f.name)[keep]) for f in dataclasses.fields(ev)})
    rows = keep[e.event]
    edges = dataclasses.replace(e, **{f.name: getattr(e, f.name)[rows] for f in dataclasses.fields(e)})
    edges = dataclasses.replace(edges, event=number[edges.event])
    return dataclasses.replace(t, events=events, edges=edges, graph=aggregate(events, edges, t.labels, t.firing.counts))


def _tiny_cases(gpt2_tokenizer, tmp_path_factory):
    gpt2 = load_model(str(build_gpt2(tmp_path_factory.mktemp("ec-gpt2"), gpt2_tokenizer, n_layer=3, n_head=4, n_embd=64, seed=0)))
    llama = load_model(str(build_rotary(tmp_path_factory.mktemp("ec-llama"), gpt2_tokenizer, "llama")))
    for model in (gpt2, llama):
        ps = ioi_prompts(gpt2_tokenizer, n=6, seed=3, prepend_bos=model.prepend_bos)
        roots = busiest_roots(capture(model, ps), ps, model.n_layers - 1, k=2, distinct=False)
        yield model, ps, trace(model, ps, roots)


def test_stacked_resumed_passes_equal_one_whole_model_pass_per_prompt_and_variant(gpt2_tokenizer, tmp_path_factory):
    """Every edge kept, none kept and the sizes between, on a random GPT-2 and a rotary GQA llama: the variants
    stacked in one resumed pass from the lowest traced layer give the numbers of one pass per prompt and
    variant from the tokens; f runs from 0 with no edge to 1 with every edge."""
    for model, ps, t in _tiny_cases(gpt2_tokenizer, tmp_path_factory):
        n_edges = len(graph_edges(t)[0])
        assert n_edges >= 4 and (t.events.layer < model.n_layers - 1).any(), "a trace deep enough to test"
        stacked = edge_circuits(model, ps, t, [1, 3])
        alone = edge_circuits(model, ps, t, [1, 3], partial=False, batch_rows=1)
        assert stacked.sizes == alone.sizes == (0, 1, 3, n_edges) and alone.passes > stacked.passes
        for a, b in zip(stacked.curves, alone.curves):
            assert a.edges == b.edges
            np.testing.assert_allclose(a.m, b.m, rtol=1e-4, atol=1e-4)
            assert a.f[0] == 0 and a.f[-1] == 1
        assert stacked.m_all != stacked.m_none and np.isfinite(stacked.f_clean)
        # the clean run is m_all only where the writers the trace left out carry nothing: measured, not assumed
        assert stacked.m_clean == pytest.approx(float(capture(model, ps).logit_diff.double().mean()), rel=1e-5)


def test_one_firing_with_one_kept_edge_equals_a_projection_computed_by_hand(reader, prompts):
    """One firing (the root 1.0 B -> A of prompt 0), two traced edges into it (0.0 through A, 0.1 through B): with
    k = 0, 1, 2 kept, each of its two subspaces of the query (at B) and key (at A) input is replaced by the kept
    edges' signal, P = U_S U_S^T on the explicit singular vectors, the writes read from the model's own hooks."""
    full = trace(reader, prompts, [Root(1, 0, "B", "A")])
    ev = full.events
    one = only_events(full, (ev.prompt == 0) & (ev.layer == 1))
    assert len(one.events) == 1 and len(one.edges) == 2
    res = edge_circuits(reader, prompts, one, [1])
    assert res.sizes == (0, 1, 2) and res.n_sites == 2

    b = reader.bridge
    tokens = capture(reader, prompts).tokens
    names = ["blocks.1.hook_resid_pre", "blocks.1.ln1.hook_scale", "blocks.0.attn.hook_z"]
    with torch.inference_mode():
        _, cache = b.run_with_cache(tokens, names_filter=lambda n: n in names)
    p, i, j = 0, int(one.events.dest[0]), int(one.events.src[0])
    S = one.events.slices[0]
    slices = slices_for(attention_geometry(reader), None, 1)
    d = b.cfg.d_model

    def projected(side: str, token: int, kept_heads: list[int]) -> torch.Tensor:
        U = (slices.left() if side == "d" else slices.right())[0, 0][:, S].double()  # [d+1, |S|], the head's u_k or v_k
        torch.testing.assert_close(U.T @ U, torch.eye(len(S), dtype=torch.float64), atol=1e-6, rtol=0)
        resid = cache["blocks.1.hook_resid_pre"][p, token].double()
        kept = sum((cache["blocks.0.attn.hook_z"][p, token, u].double() @ b.W_O[0, u].double() for u in kept_heads),
                   torch.zeros(d, dtype=torch.float64))
        h = (U @ (U.T @ torch.cat([kept - resid, torch.zeros(1, dtype=torch.float64)])))[:d]
        return (h - h.mean()) / cache["blocks.1.ln1.hook_scale"][p, token, 0].double()  # LayerNorm: centred

    def expected_m(kept_heads: list[int]) -> float:
        dq = projected("d", i, [u for u in kept_heads if u == 1]).float() @ b.W_Q[1, 0].detach()
        dk = projected("s", j, [u for u in kept_heads if u == 0]).float() @ b.W_K[1, 0].detach()

        def add(delta, token):
            def hook(t, hook):
                t = t.clone()
                view = t.view(*t.shape[:2], reader.n_heads, -1) if t.dim() == 3 else t
                view[p, token, 0] += delta
                return t
            return hook

        with torch.inference_mode():
            logits = b.run_with_hooks(tokens, fwd_hooks=[("blocks.1.attn.hook_q", add(dq, i)), ("blocks.1.attn.hook_k", add(dk, j))])
        last = logits[torch.arange(len(prompts)), capture(reader, prompts).lengths - 1]
        mary, john = (tokens[0, j], tokens[0, i])
        return float((last[:, mary] - last[:, john]).double().mean())

    for curve in res.curves:
        ups = [int(e.split(" -> ")[0].split(".")[1]) for e in curve.edges]  # upstream heads 0.x, best first
        for s, k in enumerate(res.sizes):
            assert curve.m[s] == pytest.approx(expected_m(ups[:k]), rel=1e-4, abs=1e-4), (curve.ranking, k)
    assert res.m_none != res.m_all


def test_the_edges_option_round_trips_through_spec_results_and_report(reader, prompts, tmp_path):
    plan = parse_text("model gpt2\nprompts ioi 8\nevaluate faithfulness against abc random 2 edges 50, 10\n", str(tmp_path / "s.circ"))
    assert plan.evaluate.edges == (10, 50) and "edges 10, 50" in format_plan(plan)
    assert parse_text("model gpt2\nprompts ioi 8\nevaluate faithfulness against abc\n", "x.circ").evaluate.edges is None
    with pytest.raises(SpecError, match="edge circuit size must be at least 1"):
        parse_text("model gpt2\nprompts ioi 8\nevaluate faithfulness against abc edges 0\n", "x.circ")
    from circuitlang.engine import evaluate as ev
    from circuitlang.report.faithfulness import faithfulness_from_dict, faithfulness_to_dict, render_faithfulness

    t = trace(reader, prompts, [Root(1, 0, "B", "A")])
    edges = edge_circuits(reader, prompts, t, [1])
    res = ev.FaithfulnessResults("abc", "counterfactual", 4, 8, (0, 8), 1.0, 0.0, 0.0, (), edge_circuits=edges)
    back = faithfulness_from_dict(json.loads(json.dumps(faithfulness_to_dict(res))))
    assert isinstance(back.edge_circuits, EdgeCircuits) and back.edge_circuits.sizes == edges.sizes
    np.testing.assert_allclose(back.edge_circuits.curve("count").f, edges.curve("count").f, rtol=1e-5)  # JSON keeps 6 digits
    out = io.StringIO()
    render_faithfulness(back, Console(file=out, width=100))
    text = out.getvalue()
    assert "Edge circuits" in text and f"{edges.n_edges} edges" in text and "f (influence)" in text


def test_the_report_says_when_every_edge_moves_f_away_from_the_clean_run():
    """As on Gemma IOI: m(every edge) below m(no edge), the clean run above both: f rising to 1 is not behaviour kept."""
    from circuitlang.engine.edge_circuits import EdgeCurve
    from circuitlang.report.faithfulness import render_edge_circuits

    def said(m_all: float) -> str:
        curve = EdgeCurve("influence", ("1.0 -> 2.0@end",), np.array([1.3, m_all]), np.array([0.0, 1.0]))
        out = io.StringIO()
        render_edge_circuits(EdgeCircuits((0, 1), 1, 1, 2, 4, 5.1, m_all, 1.3, (curve,)), Console(file=out, width=200))
        return out.getvalue()

    assert "every edge kept moves F away from the clean run (1.300 -> -0.800, clean 5.100)" in said(-0.8)
    assert "moves F away" not in said(3.0)
