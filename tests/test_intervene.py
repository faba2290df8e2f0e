"""Edge interventions (section 5.4) on models whose circuit is known by construction."""

from __future__ import annotations

import collections
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from circuitlang.engine.forward import capture
from circuitlang.models.geometry import attention_geometry
from circuitlang.engine.intervene import (
    InterventionError,
    edge_groups,
    intervention_hooks,
    pass_batches,
    run_interventions,
    select_edges,
    set_seed,
)
from circuitlang.models.model import load_model
from circuitlang.engine.trace import trace
from circuitlang.lang.plan import EdgeSelector, InterventionSet, Root
from checks import busiest_roots, positions_run
from tiny_models import READER, build_handbuilt, reader_prompts, word_ids

@pytest.fixture(scope="module")
def words(gpt2_tokenizer):
    return word_ids(gpt2_tokenizer, (" the", " went", " Mary", " to", " John", " store", ",", " and"))


@pytest.fixture(scope="module")
def prompts(words):
    """A (Mary) somewhere, B (John) last; F = logit(Mary) - logit(John) at B."""
    layouts = [
        (" the", " went", " Mary", " to", " John"),
        (" the", " Mary", " went", " to", " store", " John"),
        (" went", " the", " store", " Mary", " to", " the", " John"),
        (" Mary", " and", " the", " store", " John"),
    ]
    return reader_prompts(words, layouts, "hand-built readers")


def _load(tmp_path_factory, tokenizer, words, name, **options):
    path = build_handbuilt(tmp_path_factory.mktemp(name), tokenizer, words[" Mary"], words[" John"], **READER, **options)
    return load_model(str(path))


@pytest.fixture(scope="module")
def reader(tmp_path_factory, gpt2_tokenizer, words):
    return _load(tmp_path_factory, gpt2_tokenizer, words, "reader")


@pytest.fixture(scope="module")
def two_readers(tmp_path_factory, gpt2_tokenizer, words):
    return _load(tmp_path_factory, gpt2_tokenizer, words, "readers", second_reader=True)


ROOT = Root(1, 0, "B", "A")
EDGE = EdgeSelector("edge", up=(0, 0), down=(1, 0))


def traced(model, prompts):
    acts = capture(model, prompts)
    return acts, trace(model, prompts, [ROOT], activations=acts)


def one_set(name="edge", edges=(EDGE,), *args, **options):
    return InterventionSet(name, tuple(edges), *args, **options)


def rows_of(results, control="signal", **match):
    mask = results.rows.where(control=control, **match)
    return {f: getattr(results.rows, f)[mask] for f in ("prompt", "score_before", "score_after", "delta_f", "f_before",
                                                          "f_after", "cosine", "norm_ratio", "n_edges")}


# --- the hand-built circuit ---------------------------------------------------------------------------


def test_ablating_the_whole_signal_removes_the_score_and_boosting_doubles_it(reader, prompts):
    acts, t = traced(reader, prompts)
    root = t.events.layer == 1
    # The root's Omega has rank 1: S_ij is its one slice, and the remainder of the score is ~0.
    assert (t.events.n_slices[root] == 1).all() and (t.events.attention[root] > 0.5).all()
    res = run_interventions(reader, prompts, t, [one_set(random_control=False)], [ROOT], seed=0, acts=acts)
    score = t.events.score[root]
    for place in ("global", "local"):
        ab = rows_of(res, kind="ablate", place=place)
        bo = rows_of(res, kind="boost", place=place)
        # Mary is the first token of prompt 3, so 1.0 can't fire B -> A there: no edge, no intervention.
        assert ab["prompt"].tolist() == [0, 1, 2] and (ab["n_edges"] == 1).all()
        np.testing.assert_allclose(ab["score_before"], score, rtol=1e-4)
        assert np.abs(ab["score_after"]).max() < 1e-3 * score.max()
        assert (ab["delta_f"] < -0.3 * ab["f_before"]).all(), "without its source signal 1.0 stops copying A"
        assert (bo["delta_f"] > 0).all()
    local, glob = rows_of(res, kind="boost", place="local"), rows_of(res, kind="boost", place="global")
    np.testing.assert_allclose(local["score_after"], 2 * local["score_before"], rtol=1e-3)
    # Globally the residual is renormalised after the write: roughly, not exactly, double.
    assert (glob["score_after"] > 1.6 * glob["score_before"]).all() and (glob["score_after"] < 2 * glob["score_before"]).all()
    # Nothing else reads the signal: global and local ablation agree.
    ab_l, ab_g = rows_of(res, kind="ablate", place="local"), rows_of(res, kind="ablate", place="global")
    np.testing.assert_allclose(ab_g["delta_f"], ab_l["delta_f"], rtol=0.1)
    assert [v.verdict for v in res.verdicts] == ["yes", "yes"]


def _scores_with(model, geometry, groups, kind, place, acts, batch):
    hooks = intervention_hooks(model, geometry, groups, kind, place, "signal", batch, acts.tokens.shape[1])
    seen = {}
    hooks.append(("blocks.1.attn.hook_attn_scores", lambda t, hook: seen.update(s=t.detach().clone())))
    with torch.inference_mode():
        model.bridge.run_with_hooks(acts.tokens[batch], fwd_hooks=hooks)
    return seen["s"] * model.attn_scale


def test_global_reaches_every_reader_local_only_the_downstream_head(two_readers, prompts):
    acts, t = traced(two_readers, prompts)
    rows = np.nonzero(select_edges(t, prompts, EDGE))[0]
    geometry = attention_geometry(two_readers)
    groups = edge_groups(acts, geometry, t, rows, seed=0, centre=True)
    batch = [0, 1, 2]
    a = [p.role("A") for p in prompts][:3]
    b = [p.role("B") for p in prompts][:3]
    clean = acts.scores[1, batch] * two_readers.attn_scale
    score = lambda s, head: s[torch.arange(3), head, b, a]  # noqa: E731
    assert (score(clean, 1) > 5).all(), "head 1.1 reads m1 at A too"
    local = _scores_with(two_readers, geometry, groups, "ablate", "local", acts, batch)
    glob = _scores_with(two_readers, geometry, groups, "ablate", "global", acts, batch)
    for s in (local, glob):
        assert score(s, 0).abs().max() < 1e-3 * score(clean, 0).max()  # the downstream head: both remove its signal
    torch.testing.assert_close(score(local, 1), score(clean, 1), rtol=1e-4, atol=1e-4)  # local: 1.1 untouched
    assert score(glob, 1).abs().max() < 1e-3 * score(clean, 1).max()  # global: 1.1 loses the signal too


def test_random_controls_are_seeded_disjoint_and_carry_none_of_this_score(reader, prompts):
    acts, t = traced(reader, prompts)
    rows = np.nonzero(select_edges(t, prompts, EdgeSelector("into", down=(1, 0))))[0]
    geometry = attention_geometry(reader)
    draw = lambda seed: edge_groups(acts, geometry, t, rows, seed=seed, centre=True)  # noqa: E731
    g0, again, other = draw(set_seed(0, "x")), draw(set_seed(0, "x")), draw(set_seed(1, "x"))
    assert torch.equal(g0.random_slices, again.random_slices) and torch.equal(g0.h_random, again.h_random)
    assert not torch.equal(g0.random_slices, other.random_slices)
    assert set_seed(0, "x") != set_seed(0, "y")
    assert torch.equal(g0.random_slices.sum(-1), g0.slices.sum(-1))
    assert not (g0.random_slices & g0.slices).any()
    res = run_interventions(reader, prompts, t, [one_set(random_control=True)], [ROOT], seed=0, acts=acts)
    for kind in ("ablate", "boost"):
        for place in ("global", "local"):
            rnd, sig = rows_of(res, kind=kind, place=place, control="random"), rows_of(res, kind=kind, place=place)
            assert np.abs(rnd["score_after"] - rnd["score_before"]).max() < 1e-3 * rnd["score_before"].max()
            assert np.abs(rnd["delta_f"]).max() < 0.01 * np.abs(sig["delta_f"]).max()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, gpt2_tokenizer):
    from tiny_models import build_gpt2

    return load_model(str(build_gpt2(tmp_path_factory.mktemp("tiny-iv"), gpt2_tokenizer, n_layer=3, n_head=4, n_embd=64, seed=0)))


@pytest.fixture(scope="module")
def tiny_run(tiny, gpt2_tokenizer):
    from circuitlang.data.ioi import ioi_prompts

    ps = ioi_prompts(gpt2_tokenizer, n=8, seed=3)
    acts = capture(tiny, ps)
    roots = busiest_roots(acts, ps, tiny.n_layers - 1, k=2)
    return ps, acts, roots, trace(tiny, ps, roots, activations=acts)


def test_random_controls_are_reproducible_for_a_seed_on_a_random_model(tiny, tiny_run):
    ps, acts, roots, t = tiny_run
    sets = [InterventionSet("root", (EdgeSelector("into", root=1),), ("ablate",), ("local",), True)]
    run = lambda seed: run_interventions(tiny, ps, t, sets, roots, seed=seed, acts=acts)  # noqa: E731
    a, b, c = run(0), run(0), run(7)
    assert len(a.rows) > 0
    for column in ("delta_f", "score_after", "cosine", "norm_ratio"):
        np.testing.assert_array_equal(getattr(a.rows, column), getattr(b.rows, column))
    signal, random = a.rows.where(control="signal"), a.rows.where(control="random")
    np.testing.assert_array_equal(a.rows.delta_f[signal], c.rows.delta_f[signal])  # the signal doesn't depend on the seed
    assert not np.array_equal(a.rows.delta_f[random], c.rows.delta_f[random])
    # Ablating the upstream heads' own signal (h from [o; 0], the default) lowers the downstream score.
    # In this tiny random model the residual's scale is ~0.03, so the authors' appended 1 of [o; 1]
    # would dominate h instead.
    own = a
    paper = run_interventions(tiny, ps, t, sets, roots, seed=0, acts=acts, homogeneous=True)
    assert paper.homogeneous and not own.homogeneous
    assert not np.allclose(paper.rows.delta_score, own.rows.delta_score)
    signal = own.rows.where(control="signal")
    assert (own.rows.delta_score[signal] < 0).mean() > 0.8
    assert own.summary("root", "ablate", "local").delta_score_mean < -abs(own.summary("root", "ablate", "local", "random").delta_score_mean)


# --- the measures ----------------------------------------------------------------------------------------


def test_delta_f_comes_from_the_models_logits(reader, prompts):
    """Redo the global ablation by hand: the projector from a dense SVD of Omega, one hook, the logits."""
    from circuitlang.engine.omega import omega_matrix

    acts, t = traced(reader, prompts)
    res = run_interventions(reader, prompts, t, [one_set(actions=("ablate",), places=("global",), random_control=False)],
                            [ROOT], seed=0, acts=acts)
    b = reader.bridge
    omega = omega_matrix(*(w[1, 0].detach().double() for w in (b.W_Q, b.b_Q, b.W_K, b.b_K)))
    _, _, Vh = torch.linalg.svd(omega)
    v = Vh[0]  # the one slice with a non-zero singular value: S_ij
    delta = torch.zeros(3, acts.tokens.shape[1], reader.d_model)
    for p in range(3):
        j = prompts[p].role("A")
        o = (acts.z[p, j, 0, 0].double() @ b.W_O[0, 0].detach().double())
        h = (v * (v @ torch.cat([o, torch.zeros(1, dtype=torch.float64)])))[: reader.d_model]
        delta[p, j] = (h - h.mean()).float()
    with torch.inference_mode():
        logits = b.run_with_hooks(acts.tokens[:3], fwd_hooks=[("blocks.0.hook_attn_out", lambda x, hook: x - delta)])
    last = logits[torch.arange(3), acts.lengths[:3] - 1]
    f = last[:, prompts[0].target] - last[:, prompts[0].distractor]
    np.testing.assert_allclose(res.rows.f_after, f.numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(res.rows.f_before, acts.logit_diff[:3].numpy(), rtol=1e-6)
    np.testing.assert_allclose(res.rows.delta_f, res.rows.f_after - res.rows.f_before, rtol=1e-12)


def test_magnitudes_are_cosines_and_norm_ratios_of_the_downstream_input(reader, prompts):
    acts, t = traced(reader, prompts)
    res = run_interventions(reader, prompts, t, [one_set(random_control=True)], [ROOT], seed=0, acts=acts)
    assert (res.rows.cosine <= 1 + 1e-9).all() and (res.rows.cosine > 0.9).all()
    assert (res.rows.norm_ratio > 0.9).all() and (res.rows.norm_ratio < 1.15).all()
    # Local: x' = x -/+ h / scale exactly; ablation shrinks x (the marker goes), boosting grows it.
    geometry = attention_geometry(reader)
    groups = edge_groups(acts, geometry, t, np.nonzero(select_edges(t, prompts, EDGE))[0], set_seed(0, "edge"), True)
    for g in range(len(groups)):
        p, m = int(groups.prompt[g]), int(groups.token[g])
        x = acts.x[1, p, m].double()
        for kind, sign in (("ablate", -1), ("boost", 1)):
            x_new = x + sign * groups.h[g].double() / groups.scale[g]
            row = rows_of(res, kind=kind, place="local", control="signal")
            k = row["prompt"].tolist().index(p)
            assert row["cosine"][k] == pytest.approx(float(torch.cosine_similarity(x, x_new, dim=0)), rel=1e-6)
            assert row["norm_ratio"][k] == pytest.approx(float(x_new.norm() / x.norm()), rel=1e-6)
    assert (rows_of(res, kind="ablate", place="local", control="signal")["norm_ratio"] < 1).all()
    assert (rows_of(res, kind="boost", place="local", control="signal")["norm_ratio"] > 1).all()
    assert (rows_of(res, kind="ablate", place="global", control="random")["cosine"] > 1 - 1e-6).all()


def test_variants_of_a_set_stack_into_one_pass_per_start_layer(reader, prompts, monkeypatch):
    acts, t = traced(reader, prompts)
    bridge = reader.bridge
    calls = []
    forward = bridge.forward

    def counting(*args, **kwargs):
        calls.append((args[0].shape[0] if args else None, kwargs.get("start_at_layer")))
        return forward(*args, **kwargs)

    monkeypatch.setattr(bridge, "forward", counting)
    sets = [one_set("a", random_control=True), one_set("b", (EdgeSelector("into", down=(1, 0)),), ("ablate",), ("local",), False)]
    e = t.edges
    token = np.where(e.side == "d", e.dest, e.src)
    # A pass holds the prompts that share their first changed token (it runs from there): per set, the
    # prompts' earliest edge token; each of the 3 prompts of "a" (edge 0.0 -> 1.0 on the A token) has its own.
    firsts = lambda rows: {p: token[rows][e.prompt[rows] == p].min() for p in np.unique(e.prompt[rows])}  # noqa: E731
    first_a, first_b = firsts(np.nonzero(e.up_head == 0)[0]), firsts(np.arange(len(e)))
    assert len(set(first_a.values())) == 3 == len(first_a)
    res = run_interventions(reader, prompts, t, sets, [ROOT], seed=0, acts=acts)
    # One capture for the residual where the passes start (acts came without it), then per set, start layer
    # and first changed token one pass of variants x prompts rows: "a" global from 0.0's layer (4 variants),
    # "a" local and "b" from 1.0's layer, skipping layer 0.
    b_passes = sorted(collections.Counter(first_b.values()).values())
    assert calls[0] == (4, None) and res.passes == len(calls) - 1 == 3 + 3 + len(b_passes)
    assert calls[1:4] == [(4, None)] * 3 and calls[4:7] == [(4, 1)] * 3 and sorted(calls[7:]) == [(k, 1) for k in b_passes]
    assert len(res.rows) == 3 * (8 + 1)
    # At most `step` prompts a batch, those of one first token together, in prompt order.
    batches = pass_batches(np.array([3, 1, 3, 3, 1, 3]), step=2)
    assert [b.tolist() for b in batches] == [[1, 4], [0, 2], [3, 5]]


def test_partial_passes_equal_whole_model_passes(reader, tiny, tiny_run, prompts, monkeypatch):
    """Starting each variant at its first changed layer from the captured residual, and at its first changed
    position after the captured keys and values, gives the numbers of a pass through the whole model, on
    the hand-built reader and on a random GPT-2."""
    acts, t = traced(reader, prompts)
    ps, tiny_acts, roots, tiny_trace = tiny_run
    cases = ((reader, prompts, t, [ROOT], [one_set("a", random_control=True)]),
             (tiny, ps, tiny_trace, roots, [one_set("x", (EdgeSelector("into", root=1),), random_control=True)]),
             (tiny, ps, tiny_trace, roots, [one_set("dest", (EdgeSelector("into", root=1, side="d"),), random_control=True)]))
    calls = positions_run(monkeypatch)
    for model, p, tr, rs, sets in cases:
        resumable = capture(model, p, resid_layers=range(model.n_layers), kv=True)
        assert resumable.kv is not None and resumable.kv[0].shape[:2] == (model.n_layers, len(p))
        calls.clear()
        partial = run_interventions(model, p, tr, sets, rs, seed=0, acts=resumable)
        resumed = [c for c in calls if c[2]]
        assert resumed and all(positions < resumable.tokens.shape[1] for _, positions, _ in resumed)
        whole = run_interventions(model, p, tr, sets, rs, seed=0, acts=resumable, partial=False)
        assert len(partial.rows) > 0 and np.isfinite(partial.rows.f_after).all()
        for f in ("f_after", "score_after", "cosine", "norm_ratio"):
            np.testing.assert_allclose(getattr(partial.rows, f), getattr(whole.rows, f), rtol=1e-4, atol=1e-5)


# --- selecting edges --------------------------------------------------------------------------------------


def test_selectors_pick_the_traced_edge_rows(reader, prompts):
    _, t = traced(reader, prompts)
    e = t.edges
    pick = lambda sel: np.nonzero(select_edges(t, prompts, sel, [ROOT]))[0].tolist()  # noqa: E731
    everything = list(range(len(e)))
    assert pick(EdgeSelector("into", down=(1, 0))) == everything == pick(EdgeSelector("into", root=1))
    assert pick(EDGE) == pick(EdgeSelector("into", root=1, side="s")) == pick(EdgeSelector("into", down=(1, 0), role="A"))
    assert all(e.side[k] == "s" and e.up_head[k] == 0 for k in pick(EDGE)) and len(pick(EDGE)) == 3
    assert pick(EdgeSelector("from", up=(0, 1))) == pick(EdgeSelector("into", down=(1, 0), side="d"))
    heaviest = max(((u, v, d) for u, v, d in t.graph.edges(data=True) if d["kind"] == "communication"), key=lambda x: x[2]["total"])
    top = pick(EdgeSelector("top", k=1))
    assert {(e.up_layer[k], e.up_head[k]) for k in top} == {heaviest[0]} and len(top) == heaviest[2]["count"]
    assert sorted(pick(EdgeSelector("top", k=5))) == everything
    assert pick(EdgeSelector("edge", up=(0, 2), down=(1, 0))) == []
    with pytest.raises(InterventionError, match="root 2"):
        pick(EdgeSelector("into", root=2))
    with pytest.raises(InterventionError, match="role 'IO'"):
        pick(EdgeSelector("into", down=(1, 0), role="IO"))


def test_a_set_that_matches_nothing_runs_nothing(reader, prompts):
    acts, t = traced(reader, prompts)
    res = run_interventions(reader, prompts, t, [one_set("none", (EdgeSelector("from", up=(0, 3)),))], [ROOT], seed=0, acts=acts)
    assert res.passes == 0 and len(res.rows) == 0 and res.sets[0].matched == (0,)


# --- rotary family: local interventions through q/k/v hooks with GQA and rotary positions -----------------


def test_local_intervention_on_a_rotary_gqa_model_matches_the_bilinear_form(tmp_path, gpt2_tokenizer):
    from circuitlang.data.ioi import ioi_prompts
    from circuitlang.engine.trace import slices_for
    from tiny_models import build_rotary


    model = load_model(str(build_rotary(tmp_path, gpt2_tokenizer, "llama")))
    ps = ioi_prompts(gpt2_tokenizer, n=8, seed=5, prepend_bos=model.prepend_bos)
    acts = capture(model, ps)
    top = model.n_layers - 1
    roots = busiest_roots(acts, ps, top, distinct=False)
    t = trace(model, ps, roots, activations=acts)
    e = t.edges
    assert len(e) > 0
    up, down = (int(e.up_layer[0]), int(e.up_head[0])), (int(e.layer[0]), int(e.head[0]))
    selector = EdgeSelector("edge", up=up, down=down)
    res = run_interventions(model, ps, t, [one_set("one", (selector,), ("ablate",), ("local",), False)], roots, seed=0, acts=acts)
    assert not res.centred  # RMSNorm: h is not centred
    geometry = attention_geometry(model)
    groups = edge_groups(acts, geometry, t, np.nonzero(select_edges(t, ps, selector))[0], set_seed(0, "one"), False)
    slices = slices_for(geometry, acts, down[0])
    left, right = slices.left()[down[1]], slices.right()[down[1]]  # [M, d+1, r]
    x = acts.x[down[0]].double().clone()
    for g in range(len(groups)):
        x[groups.prompt[g], groups.token[g]] -= groups.h[g].double() / groups.scale[g]
    rows = select_edges(t, ps, selector)
    for p in np.unique(e.prompt[rows]).tolist():
        events = {(i, j) for i, j in zip(e.dest[rows & (e.prompt == p)].tolist(), e.src[rows & (e.prompt == p)].tolist())}
        tilde = lambda k: torch.cat([x[p, k], torch.ones(1, dtype=torch.float64)])  # noqa: E731
        expected = np.mean([float((tilde(i) @ left[i - j]) * slices.S[down[1], i - j] @ (right[i - j].T @ tilde(j))) for i, j in events])
        got = res.rows.score_after[res.rows.prompt == p][0]
        assert got == pytest.approx(expected, rel=1e-3, abs=1e-3)
    assert np.abs(res.rows.delta_score).max() > 1e-2 * np.abs(res.rows.score_before).max()


# --- the report: JSON, table, plots -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def results(reader, prompts):
    acts, t = traced(reader, prompts)
    sets = [one_set("edge 0.0 -> 1.0", random_control=True), one_set("into 1.0", (EdgeSelector("into", down=(1, 0)),), ("ablate",), ("global", "local"), True),
            one_set("nothing", (EdgeSelector("from", up=(0, 3)),))]
    return run_interventions(reader, prompts, t, sets, [ROOT], seed=0, acts=acts)


def test_json_is_deterministic_and_round_trips(results, tmp_path):
    from circuitlang.report.interventions import interventions_to_dict, read_interventions_json, write_interventions_json

    a, b = write_interventions_json(results, tmp_path / "a.json"), write_interventions_json(results, tmp_path / "b.json")
    assert a.read_bytes() == b.read_bytes()
    data = read_interventions_json(a)
    # Everything but the count of passes, which follows the chunks (the cache keeps it; the file is the same bytes).
    assert data == {k: v for k, v in json.loads(json.dumps(interventions_to_dict(results))).items() if k != "passes"}
    assert data["rows"]["delta_f"] == pytest.approx(results.rows.delta_f.tolist(), rel=1e-6)
    assert [s["name"] for s in data["sets"]] == ["edge 0.0 -> 1.0", "into 1.0", "nothing"]
    assert {v["verdict"] for v in data["verdicts"]} <= {"yes", "ablate only", "boost only", "reversed", "no", "n/a"}
    assert not list(tmp_path.glob(".*.tmp"))


def test_table_shows_the_verdicts(results):
    from rich.console import Console

    from circuitlang.report.interventions import render_interventions

    console = Console(record=True, width=120, file=io.StringIO())
    render_interventions(results, console)
    text = console.export_text()
    assert "Verdict" in text and "random ablate" in text and "yes" in text
    assert 'intervene "nothing": no traced edge matched' in text


def test_plots_are_pngs_per_downstream_head(results, tmp_path):
    from circuitlang.report.interventions import write_intervention_plots

    paths = write_intervention_plots(results, tmp_path / "plots")
    assert [p.name for p in paths] == ["interventions-1.0.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)


def test_report_module_never_imports_torch():
    code = ("import sys, types; sys.modules['torch'] = None; pkg = types.ModuleType('circuitlang'); "
            f"pkg.__path__ = [{str(Path(__file__).parents[1] / 'circuitlang')!r}]; sys.modules['circuitlang'] = pkg; "
            "import circuitlang.report.interventions, circuitlang.engine.intervene")
    subprocess.run([sys.executable, "-c", code], check=True)
