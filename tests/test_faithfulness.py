"""Faithfulness curves (engine/evaluate.py): a hand-built model whose circuit is known, TransformerLens 4's
attribution patching on a GPT-2-style model, the spec statement and the counterfactual prompts."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from circuitlang.data.ioi import ioi_counterfactuals, ioi_prompts
from circuitlang.data.prompts import DataError, load_prompt_file, read_prompt_file
from circuitlang.engine import evaluate as ev
from circuitlang.models.model import load_model
from circuitlang.engine.trace import trace
from circuitlang.lang.compiler import format_plan, parse_text
from circuitlang.lang.errors import SpecError
from circuitlang.lang.plan import Evaluation, Root
from tiny_models import READER, build_gpt2, build_handbuilt, reader_prompts, word_ids

@pytest.fixture(scope="module")
def words(gpt2_tokenizer):
    return word_ids(gpt2_tokenizer, (" the", " went", " Mary", " to", " John", " store", ",", " and", " Paris"))


@pytest.fixture(scope="module")
def handbuilt(tmp_path_factory, gpt2_tokenizer, words):
    path = build_handbuilt(tmp_path_factory.mktemp("hb"), gpt2_tokenizer, words[" Mary"], words[" John"], **READER)
    return load_model(str(path))


@pytest.fixture(scope="module")
def hb_prompts(words):
    """A (Mary) before B (John, last); the counterfactual writes Paris where Mary was: nothing marks A."""
    layouts = [
        (" the", " went", " Mary", " to", " John"),
        (" the", " Mary", " went", " to", " store", " John"),
        (" went", " the", " store", " Mary", " to", " the", " John"),
        (" the", " Mary", " and", " the", " store", " John"),
    ]
    return reader_prompts(words, layouts, "hand-built", counterfactual=" Paris")


@pytest.fixture(scope="module")
def hb_result(handbuilt, hb_prompts):
    t = trace(handbuilt, hb_prompts, [Root(1, 0, "B", "A")])
    return t, ev.evaluate_faithfulness(handbuilt, hb_prompts, t, against="file", sizes="all", random_draws=8, seed=0,
                                       references={"true": {"0.0", "0.1", "1.0"}}, check_tl=True)


def _full_logit_f(model, tokens, lengths, answers, hooks=()):
    """F from the model's full logits (an independent path: no final-norm stop, no two-column read)."""
    with torch.inference_mode():
        logits = model.bridge.run_with_hooks(tokens, fwd_hooks=list(hooks))
    last = logits[torch.arange(len(lengths)), lengths - 1]
    answers = answers.flatten(1)  # [P, 2, 1]: one target, one distractor
    return (last.gather(1, answers[:, :1]) - last.gather(1, answers[:, 1:])).squeeze(1)


# --- the hand-built circuit ---------------------------------------------------------------------------


def test_the_true_circuit_keeps_everything_and_random_circuits_of_its_size_do_not(hb_result):
    t, res = hb_result
    sizes = list(res.sizes)
    assert sizes == list(range(9))
    # The trace of 1.0 B->A reaches exactly 0.0 (through A) and 0.1 (through B): both SVT rankings' top 3 is
    # the circuit, and influence puts the root first.
    assert res.method("influence").ranking[0] == "1.0"
    for name in ("influence", "count"):
        svt = res.method(name)
        assert set(svt.ranking[:3]) == {"0.0", "0.1", "1.0"}, name
        assert svt.f[3] == pytest.approx(1.0, abs=1e-5)
        assert np.allclose(svt.f[3:], 1.0, atol=1e-5), "heads that write nothing change nothing"
        assert svt.f_signed is None and svt.mean_f == pytest.approx(float(np.minimum(svt.f[1:], 1).mean()))
    rnd = res.method("random")
    assert rnd.f[3] < 0.5 and rnd.cpr < svt.cpr - 0.2
    # Only 1.0 writes toward the answer: direct attribution puts it first, and alone it keeps part of F only.
    assert res.method("dla").ranking[0] == "1.0"
    assert 0 < res.method("dla").f[1] < 0.99
    assert res.m_full - res.m_empty > 0.5
    truth = {o.k: o for o in res.overlap if o.method == "count" and o.reference == "true"}
    assert truth[5].recall == 1.0 and truth[5].precision == pytest.approx(3 / 5)


def test_every_curve_runs_from_zero_with_nothing_to_one_with_everything(handbuilt, hb_prompts, hb_result):
    _, res = hb_result
    for curve in res.methods:
        assert curve.f[0] == pytest.approx(0.0, abs=1e-9) and curve.f[-1] == pytest.approx(1.0, abs=1e-9), curve.method
    # The ends against numbers computed independently: full logits, every head patched by hand.
    batch = ev.Batch.of(handbuilt, hb_prompts)
    clean = _full_logit_f(handbuilt, batch.tokens, batch.lengths, batch.answers)
    cf_z = {}
    _full_logit_f(handbuilt, batch.cf_tokens, batch.lengths, batch.answers,
                  [(f"blocks.{l}.attn.hook_z", lambda z, hook, l=l: cf_z.__setitem__(l, z.clone())) for l in range(2)])
    empty = _full_logit_f(handbuilt, batch.tokens, batch.lengths, batch.answers,
                          [(f"blocks.{l}.attn.hook_z", lambda z, hook, l=l: cf_z[l]) for l in range(2)])
    assert res.m_full == pytest.approx(float(clean.mean()), rel=1e-4)
    assert res.m_empty == pytest.approx(float(empty.mean()), rel=1e-4, abs=1e-5)
    # CPR (signed circuits) and CMD (|score| circuits) of every curve: the trapezoids over the fraction of heads
    # kept, recomputed here.
    for curve in res.methods:
        x = np.arange(9) / 8
        signed = curve.f if curve.f_signed is None else curve.f_signed
        assert curve.cpr == pytest.approx(float(np.sum((signed[1:] + signed[:-1]) / 2 * np.diff(x))))
        assert curve.cmd == pytest.approx(float(np.sum((np.abs(1 - curve.f[1:]) + np.abs(1 - curve.f[:-1])) / 2 * np.diff(x))))


def test_the_runs_own_clean_f_spares_the_clean_pass_and_changes_nothing(handbuilt, hb_prompts, hb_result, monkeypatch):
    t, res = hb_result
    batch = ev.Batch.of(handbuilt, hb_prompts)
    clean = _full_logit_f(handbuilt, batch.tokens, batch.lengths, batch.answers)
    captured = []
    real = ev.head_outputs
    monkeypatch.setattr(ev, "head_outputs", lambda model, tokens, *a, **k: captured.append(tokens) or real(model, tokens, *a, **k))
    alone = ev.evaluate_faithfulness(handbuilt, hb_prompts, t, against="file", sizes="all", rankings=("influence",),
                                     random_draws=0, f_clean=clean.tolist())
    assert len(captured) == 1 and torch.equal(captured[0], batch.cf_tokens), "only the counterfactual run is captured"
    assert [c.method for c in alone.methods] == ["influence"] and alone.timings["passes"] == 8
    assert alone.m_full == pytest.approx(res.m_full, rel=1e-5)
    np.testing.assert_allclose(alone.method("influence").f, res.method("influence").f, atol=1e-5)


def test_one_patched_pass_equals_patching_each_circuit_alone(handbuilt, hb_prompts):
    batch = ev.Batch.of(handbuilt, hb_prompts)
    z_clean, _, _ = ev.head_outputs(handbuilt, batch.tokens, batch.lengths, batch.answers)
    z_cf, f_cf, _ = ev.head_outputs(handbuilt, batch.cf_tokens, batch.lengths, batch.answers)
    gen = torch.Generator().manual_seed(3)
    keep = torch.rand(5, 2, 4, generator=gen) > 0.5
    stacked = ev.patched_logit_diff(handbuilt, batch, z_cf, keep, row_chunk=7)  # chunks cut across circuits
    for c in range(5):
        alone = _full_logit_f(handbuilt, batch.tokens, batch.lengths, batch.answers,
                              [(f"blocks.{l}.attn.hook_z", lambda z, hook, l=l: torch.where(keep[c, l][None, None, :, None], z, z_cf[:, : z.shape[1], l]))
                               for l in range(2)])
        np.testing.assert_allclose(stacked[c].numpy(), alone.numpy(), rtol=1e-4, atol=1e-5)
    # mean ablation: the mean over the counterfactual prompts, per position
    mean = z_cf.mean(0)
    none = ev.patched_logit_diff(handbuilt, batch, mean, torch.zeros(1, 2, 4, dtype=torch.bool))
    by_hand = _full_logit_f(handbuilt, batch.tokens, batch.lengths, batch.answers,
                            [(f"blocks.{l}.attn.hook_z", lambda z, hook, l=l: mean[None, : z.shape[1], l].expand_as(z).contiguous()) for l in range(2)])
    np.testing.assert_allclose(none[0].numpy(), by_hand.numpy(), rtol=1e-4, atol=1e-5)


def test_masks_rankings_and_areas():
    rankings = torch.tensor([[2, 0, 1, 3], [3, 2, 1, 0]])
    masks = ev.circuit_masks(rankings, [0, 1, 3, 4])
    assert masks[0, 1].tolist() == [False, False, True, False] and masks[1, 2].tolist() == [False, True, True, True]
    assert masks[:, 0].sum() == 0 and masks[:, 3].all()
    assert ev.rank_scores(torch.tensor([[0.5, -2.0], [1.0, 0.5]])).tolist() == [1, 2, 0, 3]
    assert ev.areas(np.array([0, 0.5, 1.0]), [0, 1, 2], 2) == (0.5, 0.5)
    assert ev.areas(np.array([0, 1.0, 1.0]), [0, 1, 2], 2) == (0.75, 0.25)
    assert ev.rank_scores(torch.tensor([[0.5, -2.0], [1.0, 0.5]]), signed=True).tolist() == [2, 0, 3, 1]
    # MIB's fractions of 72 heads rounded to whole heads (.01 -> 1, .05 -> 4, .1 -> 7, .2 -> 14, .5 -> 36), every
    # size up to 20, all heads
    assert ev.default_sizes(72) == (*range(21), 36, 72)
    assert ev.default_sizes(8) == tuple(range(9))
    assert ev.curve_summary(np.array([0.0, 0.5, 1.5, 0.9, 1.0]), [0, 1, 2, 20, 21]) == (pytest.approx(0.8), 1.5)
    assert ev.top_k_overlap(["1.0", "0.0", "2.2"], {"1.0", "3.3"}, 2) == (0.5, 0.5, 0.5)


# --- the influence ranking ------------------------------------------------------------------------------


def _columns(cls, **columns):
    return cls(**{f.name: np.asarray(columns[f.name]) if f.name in columns else () for f in dataclasses.fields(cls)})


def test_influence_is_the_flow_of_normalised_edge_weights_from_the_roots():
    from types import SimpleNamespace

    from circuitlang.engine.results import MLP, TracedEdges, TracedEvents

    # One prompt; the root 2.0 fires on (5, 2). Its dest side (signal 4) reads 1.1 at token 5 (c = 2: weight
    # 2 / (2 * 4)); its src side (signal 2) reads 0.0 at token 2 (c = 1: 1 / (2 * 2)). 1.1 fires from token 5 on
    # 3 and 4 (attention .6 and .2: 3/4 and 1/4 of its node's inflow); through src 3 (signal 1, less than its
    # traced edges' 1.5: they share 1.5) 0.0 at token 3 (c = .5: .5 / 3) and 0.1 at token 3 (c = 1: 1 / 3), and
    # 0.1 at token 5 through dest with a negative contribution (no share); through src 4, 0.1 at token 5 on
    # the dest side (c = 1, signal 1: .5); an MLP edge is a leaf.
    events = _columns(TracedEvents, prompt=[0, 0, 0], layer=[2, 1, 1], head=[0, 1, 1], dest=[5, 5, 5], src=[2, 3, 4],
                      attention=[0.8, 0.6, 0.2], signal_dest=[4.0, 1.0, 1.0], signal_src=[2.0, 1.0, 1.0])
    edges = _columns(TracedEdges, event=[0, 0, 1, 1, 2, 0, 1], prompt=[0] * 7, up_layer=[1, 0, 0, 0, 0, 1, 0],
                     up_head=[1, 0, 0, 1, 1, MLP, 1], layer=[2, 2, 1, 1, 1, 2, 1], head=[0, 0, 1, 1, 1, 0, 1],
                     dest=[5] * 7, src=[2, 2, 3, 3, 4, 2, 3], side=["d", "s", "s", "d", "d", "d", "s"],
                     contribution=[2.0, 1.0, 0.5, -0.3, 1.0, 1.0, 1.0])
    trace = SimpleNamespace(events=events, edges=edges, config=SimpleNamespace(roots=("2.0 end->A",)),
                            firing=SimpleNamespace(counts=np.zeros((3, 2))))
    prompts = [SimpleNamespace(role=lambda name: {"end": 5, "A": 2}[name])]
    influence = ev.influence_scores(trace, prompts, 3, 2)
    expected = np.zeros((3, 2))
    expected[2, 0] = 1.0
    expected[1, 1] = 0.25
    expected[0, 0] = 0.25 + 0.25 * 0.75 * 0.5 / 3
    expected[0, 1] = 0.25 * 0.75 * 1 / 3 + 0.25 * 0.25 * 0.5
    np.testing.assert_allclose(influence, expected)
    # the same numbers as the roots' rows of (I - A)^-1 on the node graph, written out: nodes 2.0@5, 1.1@5
    # (through its events), 0.0@2, 0.0@3, 0.1@5, 0.1@3
    A = np.zeros((6, 6))
    A[0, 1], A[0, 2] = 0.25, 0.25
    A[1, 3], A[1, 5], A[1, 4] = 0.75 * 0.5 / 3, 0.75 / 3, 0.25 * 0.5
    flow = np.linalg.inv(np.eye(6) - A)[0]
    assert influence[0, 0] == pytest.approx(flow[2] + flow[3]) and influence[0, 1] == pytest.approx(flow[4] + flow[5])
    # two prompts, the second without a traced event: the mean over prompts halves every influence
    two = [prompts[0], prompts[0]]
    np.testing.assert_allclose(ev.influence_scores(trace, two, 3, 2), expected / 2)
    # the ranking: roots first, then by influence, then (ties) the count ranking's order
    order, scores = ev.influence_ranking(influence, {4}, torch.tensor([3, 0, 1, 2, 4, 5]))
    assert order.tolist() == [4, 0, 3, 1, 2, 5] and scores[2, 0] == 1.0


def test_influence_puts_the_roots_first_on_a_real_trace(tmp_path_factory, gpt2_tokenizer):
    from checks import busiest_roots
    from circuitlang.engine.forward import capture

    model = load_model(str(build_gpt2(tmp_path_factory.mktemp("inf"), gpt2_tokenizer, n_layer=3)))
    prompts = ioi_prompts(gpt2_tokenizer, 6, seed=1)
    acts = capture(model, prompts)
    roots = busiest_roots(acts, prompts, 2, k=2)
    t = trace(model, prompts, roots, activations=acts)
    influence = ev.influence_scores(t, prompts, model.n_layers, model.n_heads)
    heads = {r.layer * model.n_heads + r.head for r in roots}
    order, _ = ev.influence_ranking(influence, heads, ev.count_ranking(t, model.n_layers, model.n_heads)[0])
    assert set(order[: len(heads)].tolist()) == heads
    reached = {int(l) * model.n_heads + int(h) for l, h in zip(t.edges.up_layer, t.edges.up_head)} - heads
    flat = influence.reshape(-1)
    assert reached and all(0 < flat[i] < 1 for i in reached), "every upstream head reached carries some flow, less than all"
    assert set(order[len(heads) : len(heads) + len(reached)].tolist()) == reached


# --- attribution patching against TransformerLens 4 -------------------------------------------------


def test_our_gradient_times_difference_equals_transformer_lens_attribution_patch(tmp_path_factory, gpt2_tokenizer):
    from transformer_lens.tools.analysis.attribution_patching import EdgeAttributionConfig, attribution_patch

    model = load_model(str(build_gpt2(tmp_path_factory.mktemp("g2"), gpt2_tokenizer, n_layer=2, n_head=4, n_embd=64)))
    prompts = ioi_counterfactuals(ioi_prompts(gpt2_tokenizer, 4, seed=1), gpt2_tokenizer, "abc", seed=2)
    batch = ev.Batch.of(model, prompts)
    z_clean, _, _ = ev.head_outputs(model, batch.tokens, batch.lengths, batch.answers)
    z_cf, _, _ = ev.head_outputs(model, batch.cf_tokens, batch.lengths, batch.answers)
    ours = ev.gradient_times_difference(model, batch, z_clean, z_cf, batch_size=3)  # [P, L, H]
    for row in range(len(prompts)):
        n = int(batch.lengths[row])
        t, d = batch.answers[row].flatten().tolist()  # one target, one distractor
        result = attribution_patch(model.bridge, batch.tokens[row : row + 1, :n], batch.cf_tokens[row : row + 1, :n],
                                   lambda logits: logits[0, -1, t] - logits[0, -1, d], EdgeAttributionConfig(granularity="node"))
        theirs = torch.zeros(2, 4)
        for node, score in result.node_scores.items():
            if node.kind == "attn_head_out":
                theirs[node.layer, node.head] += score
        assert theirs.abs().max() > 1e-3
        torch.testing.assert_close(ours[row], theirs, rtol=1e-4, atol=1e-5 * float(theirs.abs().max()))
    # TL's faithfulness accepts GPT-2: no refusal
    assert ev.tl_edge_support(model) is None


# --- counterfactual prompts, prompt files, the statement --------------------------------------------


def test_ioi_counterfactuals_keep_positions_and_change_only_the_names(gpt2_tokenizer):
    prompts = ioi_prompts(gpt2_tokenizer, 20, seed=4)
    abc = ioi_counterfactuals(prompts, gpt2_tokenizer, "abc", seed=1)
    flipped = ioi_counterfactuals(prompts, gpt2_tokenizer, "flipped")
    for p, a, f in zip(prompts, abc, flipped):
        io, s1, s2 = p.role("IO"), p.role("S1"), p.role("S2")
        assert len(a.counterfactual) == len(p.token_ids) == len(f.counterfactual)
        changed = {i for i, (x, y) in enumerate(zip(p.token_ids, a.counterfactual)) if x != y}
        assert changed == {io, s1, s2}
        names = {a.counterfactual[i] for i in (io, s1, s2)}
        assert len(names) == 3 and not names & {p.target, p.distractor}
        assert [i for i, (x, y) in enumerate(zip(p.token_ids, f.counterfactual)) if x != y] == [s2]
        assert f.counterfactual[s2] == p.target
        assert gpt2_tokenizer(dict(a.meta)["counterfactual"], add_special_tokens=False)["input_ids"] == list(a.counterfactual)
    assert ioi_counterfactuals(prompts, gpt2_tokenizer, "abc", seed=1) == abc
    with pytest.raises(DataError, match="unknown IOI counterfactual"):
        ioi_counterfactuals(prompts, gpt2_tokenizer, "abd")


def test_prompt_files_carry_an_aligned_counterfactual(tmp_path, gpt2_tokenizer):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "Alice met Bob and Bob thanked", "target": " Alice", "distractor": " Bob",
                                "counterfactual": "Alice met Bob and Carl thanked"}) + "\n")
    (prompt,) = load_prompt_file(good, gpt2_tokenizer)
    assert len(prompt.counterfactual) == len(prompt.token_ids) and prompt.counterfactual[:4] == prompt.token_ids[:4]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "Alice met Bob", "counterfactual": "Alice met Bob Smith"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1:27: counterfactual has 4 tokens and the text 3"):
        load_prompt_file(bad, gpt2_tokenizer)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "Alice", "counterfactual": ""}\n')
    with pytest.raises(DataError, match=r"empty.jsonl:1:19: 'counterfactual' must be a non-empty string"):
        read_prompt_file(empty)


def test_the_evaluate_statement(tmp_path):
    plan = parse_text("evaluate faithfulness against abc")
    assert plan.evaluate == Evaluation("abc", False, None, 10)
    plan = parse_text("model gpt2\nevaluate faithfulness against flipped mean sizes 20, 5, 10 random 3")
    assert plan.evaluate == Evaluation("flipped", True, (5, 10, 20), 3)
    assert parse_text(format_plan(plan)) == plan
    assert parse_text("evaluate faithfulness against abc sizes all random 0").evaluate == Evaluation("abc", False, "all", 0)
    plan = parse_text("evaluate faithfulness against abc sizes 5 rank influence, dla, influence random 0 check tl")
    assert plan.evaluate == Evaluation("abc", False, (5,), 0, ("influence", "dla"), True)
    assert parse_text(format_plan(plan)) == plan
    cases = {
        "evaluate faithfulness against file": "against file takes each prompt's counterfactual from a prompts file",
        "evaluate faithfulness against abd": 'expected "abc", "counterfactual", "file" or "flipped", found "abd"; did you mean "abc"?',
        "evaluate faithfulness against abc sizes 73": "circuit size 73 is more than the 72 heads of gemma-3-270m",
        "evaluate faithfulness against abc sizes 0": "a circuit size must be at least 1",
        "evaluate faithfulness against abc rank influnce": 'unknown ranking "influnce"; rankings are influence, count, '
        'attribution_clean, attribution_cf and dla; did you mean "influence"?',
        "evaluate faithfulness against abc check transformerlens": 'unknown check "transformerlens"; the check is "tl"',
    }
    for text, message in cases.items():
        with pytest.raises(SpecError, match=message.replace("(", r"\(").replace("?", r"\?")):
            parse_text(text)
    no_cf = tmp_path / "p.jsonl"
    no_cf.write_text('{"text": "Alice met Bob", "target": " Alice", "distractor": " Bob"}\n')
    spec = tmp_path / "s.circ"
    spec.write_text('prompts file "p.jsonl"\nevaluate faithfulness against abc\n')
    with pytest.raises(SpecError, match="made for the ioi prompts; with p.jsonl write `against file`"):
        from circuitlang.lang.compiler import parse_spec
        parse_spec(spec)
    spec.write_text('prompts file "p.jsonl"\nevaluate faithfulness against file\n')
    with pytest.raises(SpecError, match=r"p.jsonl:1: evaluate ... against file needs 'counterfactual' in every prompt"):
        parse_spec(spec)


def test_results_round_trip_through_json(hb_result):
    _, res = hb_result
    back = ev.FaithfulnessResults.from_dict(json.loads(json.dumps(res.to_dict())))
    assert back.sizes == res.sizes and back.methods[0].ranking == res.methods[0].ranking
    np.testing.assert_array_equal(back.method("random").f_std, res.method("random").f_std)
    assert dataclasses.replace(back, methods=res.methods, overlap=res.overlap) == dataclasses.replace(res, methods=res.methods)


def test_report_table_json_and_plot(hb_result, tmp_path):
    from rich.console import Console

    from circuitlang.report.faithfulness import (faithfulness_from_dict, render_faithfulness, write_faithfulness_json,
                                                 write_faithfulness_plot)

    _, res = hb_result
    console = Console(record=True, width=160)
    render_faithfulness(res, console)
    text = console.export_text()
    svt = res.method("influence")
    assert "SVT influence (trace)" in text and f"{svt.cpr:.2f}" in text and "random (8 draws)" in text and "±" in text
    assert "EAP" in text and "mean f" in text
    assert f"full model {res.m_full:.3f}" in text and "attribution_patch" in text
    path = write_faithfulness_json(res, tmp_path / "faithfulness.json")
    back = faithfulness_from_dict(json.loads(path.read_text()))
    assert back.sizes == res.sizes and back.method("influence").ranking == svt.ranking and back.timings == {}
    first = path.read_text()
    assert write_faithfulness_json(dataclasses.replace(res, timings={"evaluation": 1.0}), path).read_text() == first
    png = write_faithfulness_plot(res, tmp_path / "faithfulness.png")
    assert png.read_bytes()[:4] == b"\x89PNG"



# --- the embedded real model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma():
    """The embedded model from the user cache (converted there on first use; $CIRCUITLANG_CACHE moves it)."""
    from circuitlang.models.embedded import resolve_embedded

    return load_model(resolve_embedded("gemma-3-270m"))


def _stub_trace(n_layers, n_heads, heads):
    """What the SVT ranking reads of a trace, as if it had reached `heads` (layer, head) in prompt 0: the real
    trace is tested in test_gemma.py; here it would only add its fixed cost (the per-offset Omega slices)."""
    from types import SimpleNamespace

    one = lambda values: np.array(values)  # noqa: E731
    layers, hs = one([h[0] for h in heads]), one([h[1] for h in heads])
    return SimpleNamespace(
        events=SimpleNamespace(prompt=np.zeros(1, int), layer=layers[:1], head=hs[:1]),
        edges=SimpleNamespace(prompt=np.zeros(len(heads) - 1, int), up_layer=layers[1:], up_head=hs[1:],
                              contribution=np.arange(len(heads) - 1, 0, -1.0)),
        firing=SimpleNamespace(counts=np.zeros((n_layers, n_heads))))


def test_gemma_numbers_are_finite_and_reproducible(gemma):
    prompts = ioi_counterfactuals(ioi_prompts(gemma.tokenizer, 16, prepend_bos=True), gemma.tokenizer, "abc")
    t = _stub_trace(18, 4, [(11, 3), (12, 1), (15, 3), (9, 0), (8, 1)])
    res = ev.evaluate_faithfulness(gemma, prompts, t, against="abc", sizes=(5,), random_draws=2, seed=0,
                                   rankings=("count", "attribution_clean", "attribution_cf", "dla"))
    assert res.method("count").ranking[:5] == ("12.1", "15.3", "9.0", "8.1", "11.3")  # prompts, then contribution
    # TransformerLens 4's edge-level faithfulness refuses Gemma 3: grouped KV heads, a post-attention norm.
    assert "blocks.0" in ev.tl_edge_support(gemma)
    assert res.m_full > 1.0 and res.m_full - res.m_empty > 1.0
    for curve in res.methods:
        assert np.isfinite(curve.f).all() and np.isfinite([curve.cpr, curve.cmd]).all(), curve.method
        assert curve.f[0] == 0.0 and curve.f[-1] == 1.0
    # Reproducible: the SVT circuit of 5 heads again, alone in its pass, and the attribution scores again.
    batch = ev.Batch.of(gemma, prompts)
    z_clean, f_clean, _ = ev.head_outputs(gemma, batch.tokens, batch.lengths, batch.answers)
    z_cf, _, _ = ev.head_outputs(gemma, batch.cf_tokens, batch.lengths, batch.answers)
    assert float(f_clean.double().mean()) == res.m_full
    svt = ev.circuit_masks(ev.count_ranking(t, 18, 4)[0][None], [5])[0].view(1, 18, 4)
    again = float(ev.patched_logit_diff(gemma, batch, z_cf, svt).double().mean())
    assert again == pytest.approx(res.method("count").m[1], rel=1e-5)
    ap = ev.gradient_times_difference(gemma, batch, z_clean, z_cf)
    index = lambda heads: torch.tensor([int(l) * 4 + int(h) for l, h in (x.split(".") for x in heads)])  # noqa: E731
    assert torch.equal(ev.rank_scores(ap.mean(0))[:10], index(res.method("attribution_cf").ranking[:10]))
    assert torch.equal(ev.rank_scores(ap.mean(0), signed=True)[:10], index(res.method("attribution_cf").signed[:10]))
    # the clean gradient (MIB's EAP) ranks differently from the counterfactual one (TransformerLens's)
    eap = ev.gradient_times_difference(gemma, batch, z_clean, z_cf, at="clean")
    assert torch.equal(ev.rank_scores(eap.mean(0))[:10], index(res.method("attribution_clean").ranking[:10]))
    assert not torch.allclose(eap, ap, rtol=0.05)
    # TransformerLens 4's attribution_patch accepts Gemma at node granularity and agrees with ours (2 prompts).
    few = ev.Batch(batch.tokens[:2], batch.cf_tokens[:2], batch.lengths[:2], batch.answers[:2])
    tl = ev.tl_attribution(gemma, few)
    torch.testing.assert_close(ap[:2], tl, rtol=1e-3, atol=1e-3 * float(tl.abs().max()))


def test_edge_level_scores_the_traces_own_edges_with_transformer_lens(tmp_path_factory, gpt2_tokenizer):
    from transformer_lens.tools.analysis.attribution_patching import faithfulness as tl_faithfulness

    from checks import busiest_roots
    from circuitlang.engine.forward import capture

    model = load_model(str(build_gpt2(tmp_path_factory.mktemp("edges"), gpt2_tokenizer, n_layer=3)))
    prompts = ioi_counterfactuals(ioi_prompts(gpt2_tokenizer, 4, seed=1), gpt2_tokenizer, "abc", seed=2)
    acts = capture(model, prompts)
    t = trace(model, prompts, busiest_roots(acts, prompts, 2, k=2), activations=acts)
    # the mapping: side d -> the downstream head's query input at dest, side s -> its key input at src
    circuit = ev.trace_edge_circuit(t, 0, int(acts.lengths[0]) - 1, model.n_layers)
    rows = np.nonzero(t.edges.prompt == 0)[0]
    assert len(rows) and len(circuit) > len(rows) // 2
    for k in rows:
        side, (l, h) = t.edges.side[k], (t.edges.layer[k], t.edges.head[k])
        token = t.edges.dest[k] if side == "d" else t.edges.src[k]
        readers = {(r.kind, r.layer, r.head, r.position) for w, r in circuit if (w.layer, w.head) == (t.edges.up_layer[k], t.edges.up_head[k])}
        assert ("q_input" if side == "d" else "k_input", l, h, token) in readers
    assert {r.kind for _, r in circuit} >= {"logits"}
    assert ev.evaluate_faithfulness(model, prompts, t, against="abc", sizes=(5,), random_draws=0).edge_level == {}
    res = ev.evaluate_faithfulness(model, prompts, t, against="abc", sizes=(5,), random_draws=2, seed=0, check_tl=True)
    edge = res.edge_level
    assert edge["supported"] and edge["n_prompts"] + edge["skipped_prompts"] == 4 and np.isfinite(edge["recovered"])
    # the mean is of TransformerLens's own per-prompt numbers
    batch = ev.Batch.of(model, prompts)
    own = []
    for row in range(4):
        n = int(batch.lengths[row])
        t_id, d_id = batch.answers[row].flatten().tolist()
        own.append(tl_faithfulness(model.bridge, batch.tokens[row : row + 1, :n], batch.cf_tokens[row : row + 1, :n],
                                   lambda logits: logits[0, -1, t_id] - logits[0, -1, d_id],
                                   ev.trace_edge_circuit(t, row, n - 1, model.n_layers)).recovered)
    assert edge["recovered"] == pytest.approx(float(np.mean(own)), abs=1e-6)


def test_report_fits_80_columns_and_leaves_out_the_circular_overlap(hb_result):
    """Issue 26, item 11: method names whole at 80 columns; SVT's top k against its own trace is not a result."""
    import io

    from rich.console import Console

    from circuitlang.report.faithfulness import render_faithfulness

    _, res = hb_result
    res = dataclasses.replace(res, overlap=(ev.Overlap("influence", "trace", 5, 1.0, 1.0, 1.0),
                                            ev.Overlap("attribution_clean", "trace", 5, 0.4, 0.5, 0.44)))
    console = Console(record=True, width=80, file=io.StringIO())
    render_faithfulness(res, console)
    text = console.export_text()
    rows = [line.split("  ")[0].strip() for line in text.splitlines()]
    from circuitlang.report.faithfulness import LABELS

    assert {r.method for r in res.methods} >= {"influence", "attribution_clean"}
    assert {LABELS[c.method] for c in res.methods if c.method != "random"} <= set(rows)
    assert "…" not in text.split("m = mean F")[0]
    table = text.split("Top-k heads against reference sets")[1]
    assert "SVT influence (trace)" not in table and "attrib. patching (EAP)" in table and "left out" in table
