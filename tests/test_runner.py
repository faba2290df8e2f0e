"""The run around the engine: prompt chunks that merge into the unchunked trace, F(X) from two logits,
intervention results in the run cache, and cache entries that are checked before they are used."""

from __future__ import annotations

import dataclasses
import json
import pickle
from collections import Counter

import numpy as np
import pytest
import torch

from circuitlang.cli import main
from circuitlang.engine.forward import answer_logits, capture
from circuitlang.models.model import load_model
from circuitlang.cachefiles import CacheWarning
from circuitlang.engine.roots import RootEvidence, auto_roots
from circuitlang.lang import parse_text
from circuitlang.runner import execute
from circuitlang.runner.cache import run_key, model_identity, runs_dir
from circuitlang.runner.chunks import chunk_size
from circuitlang.runner.execute import build_prompts, cached_run, run_plan
from tiny_models import build_gpt2

SPEC = '''model "{model}"
prompts ioi 20 mixed seed 1
trace from {roots}
firing attention > 0.3
intervene "into the first root" {{
  edges into root 1
  ablate, boost  global, local  against random
}}
'''


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, gpt2_tokenizer):
    directory = build_gpt2(tmp_path_factory.mktemp("runner") / "tiny", gpt2_tokenizer, n_layer=4, n_head=4, n_embd=64, seed=5)
    return directory, load_model(str(directory))


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUITLANG_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def preloaded(tiny, monkeypatch):
    monkeypatch.setattr(execute, "resolve_model", lambda spec, device=None, progress=None: tiny[1])


def plan_for(tiny, roots="auto 2"):
    return parse_text(SPEC.format(model=tiny[0], roots=roots))


def assert_same_trace(a, b):
    for table in ("events", "edges"):
        x, y = getattr(a, table), getattr(b, table)
        assert len(x) == len(y) > 0
        for f in dataclasses.fields(x):
            u, v = getattr(x, f.name), getattr(y, f.name)
            if f.name == "slices":
                assert all(np.array_equal(p, q) for p, q in zip(u, v))
            else:  # every column bit for bit, floats included (issue 22)
                assert np.array_equal(u, v), f"{table}.{f.name}"
    assert np.array_equal(a.firing.counts, b.firing.counts) and np.array_equal(a.firing.slice_usage, b.firing.slice_usage)
    assert all(np.array_equal(p, q) for lp, lq in zip(a.firing.slice_counts, b.firing.slice_counts) for p, q in zip(lp, lq))
    assert sorted(a.graph.edges) == sorted(b.graph.edges)
    for u, v, d in a.graph.edges(data=True):
        assert d == b.graph.edges[u, v]


@pytest.mark.parametrize("roots", ["auto 2", "explicit"])
def test_chunks_merge_into_the_unchunked_trace(tiny, preloaded, roots):
    plan = plan_for(tiny)
    whole = run_plan(plan)
    if roots == "explicit":
        plan = plan_for(tiny, ", ".join(str(r) for r in whole.roots))
        whole = run_plan(plan)
    for size in (1, 7):
        ticks = []
        chunked = run_plan(plan, chunk=size, progress=lambda stage, done, total: ticks.append((done, total)) if stage == "interventions" else None)
        assert ticks[-1] == (chunked.interventions.passes,) * 2  # every pass run, counted, and no more than counted
        assert chunked.roots == whole.roots
        assert [(c.root, c.fired) for c in chunked.auto_roots] == [(c.root, c.fired) for c in whole.auto_roots]
        assert [c.direct_effect for c in chunked.auto_roots] == [c.direct_effect for c in whole.auto_roots]
        assert_same_trace(chunked.trace, whole.trace)
        assert chunked.logit_diff == whole.logit_diff
        a, b = chunked.interventions.rows, whole.interventions.rows
        assert len(a) == len(b) > 0 and a.prompt.tolist() == b.prompt.tolist()
        for f in ("f_after", "score_after", "cosine", "norm_ratio", "delta_f"):
            assert np.array_equal(getattr(a, f), getattr(b, f), equal_nan=True), f


def test_each_layers_omega_is_computed_once_however_many_chunks(tiny, preloaded, monkeypatch, tmp_path):
    """Issue 26, item 10: with the caches off (--no-cache), 12 chunks computed Omega 12 times (233 s against 47.7 s);
    the user's cache is still neither read nor written."""
    import circuitlang.engine.omega_cache as oc

    calls = Counter()
    real = oc.layer_slices

    def counted(geometry, layer, *args):
        calls[layer] += 1
        return real(geometry, layer, *args)

    monkeypatch.setattr(oc, "layer_slices", counted)
    plan = dataclasses.replace(plan_for(tiny), interventions=())
    run_plan(plan, chunk=3)
    assert calls and set(calls.values()) == {1}, calls
    assert not (tmp_path / "cache").exists()


def test_chunk_size_follows_the_budget(tiny):
    prompts = build_prompts(plan_for(tiny), tiny[1])
    assert chunk_size(tiny[1], prompts, budget=1) == 1
    assert chunk_size(tiny[1], prompts, budget=2**40) == len(prompts)


def test_f_is_the_models_logit_difference(tiny):
    model = tiny[1]
    prompts = build_prompts(plan_for(tiny), model)
    acts = capture(model, prompts)
    with torch.inference_mode():
        logits = model.bridge(acts.tokens)
    rows = torch.arange(len(prompts))
    last = logits[rows, acts.lengths - 1]
    answers = torch.tensor([(p.target, p.distractor) for p in prompts])
    np.testing.assert_allclose(acts.logit_diff, last[rows, answers[:, 0]] - last[rows, answers[:, 1]], rtol=1e-4, atol=1e-5)


def test_two_answer_logits_apply_the_soft_cap_as_the_full_vocabulary_would():
    torch.manual_seed(0)
    final, W_U, b_U = torch.randn(5, 8), torch.randn(8, 30), torch.randn(30)
    answers = torch.tensor([[1, 2], [3, 4], [0, 29], [7, 7], [10, 11]])
    cap = lambda x: 2.0 * torch.tanh(x / 2.0)  # noqa: E731
    full = cap(final @ W_U + b_U)
    expected = full.gather(1, answers)
    torch.testing.assert_close(answer_logits(final, W_U, b_U, answers, cap), expected)


def test_auto_roots_name_the_heads_they_skip():
    effects = np.array([[0.1, 5.0], [2.0, 1.0]])  # 0.1 has the largest effect but never fires between roles
    evidence = RootEvidence(np.repeat(effects[None], 4, 0), {(1, 0): Counter({("end", "IO"): 3}), (1, 1): Counter({("end", "S2"): 2})}, {})
    chosen, skipped = auto_roots(evidence, 2)
    assert [str(c.root) for c in chosen] == ["1.0 end->IO", "1.1 end->S2"] and all(c.from_end for c in chosen)
    elsewhere = RootEvidence(effects[None], {}, {(1, 0): Counter({("S2", "S2"): 5})})
    assert auto_roots(elsewhere, 1)[0][0].from_end is False
    assert [(s.layer, s.head, s.direct_effect) for s in skipped] == [(0, 1, 5.0)]
    assert "never fires" in skipped[0].reason
    evidence_b = RootEvidence(np.repeat(effects[None], 2, 0), {(0, 1): Counter({("end", "IO"): 1})}, {})
    merged = evidence.merge(evidence_b)
    assert merged.n_prompts == 6 and merged.at_end[(0, 1)] == Counter({("end", "IO"): 1})
    assert [str(c.root) for c in auto_roots(merged, 1)[0]] == ["0.1 end->IO"]


def test_a_second_run_reuses_trace_and_interventions(tiny, preloaded, monkeypatch):
    plan = plan_for(tiny)
    first, key = cached_run(plan)
    assert key is None and first.interventions is not None
    passes = []
    real = execute.iv.intervene_chunk
    monkeypatch.setattr(execute.iv, "intervene_chunk", lambda *a, **k: passes.append(1) or real(*a, **k))
    second, key = cached_run(plan)
    assert key and second.reused == ("trace", "interventions") and passes == []
    for f in ("delta_f", "score_after", "cosine"):
        np.testing.assert_allclose(getattr(second.interventions.rows, f), getattr(first.interventions.rows, f), rtol=1e-6)
    assert [v.verdict for v in second.interventions.verdicts] == [v.verdict for v in first.interventions.verdicts]
    assert [s.ablate for s in second.interventions.verdicts] == pytest.approx([s.ablate for s in first.interventions.verdicts], rel=1e-6)
    # Other intervene blocks on the same trace: the trace is reused, the new blocks computed and cached.
    other = dataclasses.replace(plan, seed=7)
    third, _ = cached_run(other)
    assert third.reused == ("trace",) and passes == [1]
    assert cached_run(other)[0].reused == ("trace", "interventions") and passes == [1]


@pytest.mark.parametrize("damage", ["{}", "[]", "edit", "truncate"])
def test_a_corrupt_run_entry_is_discarded_and_recomputed(tiny, preloaded, damage):
    plan = plan_for(tiny)
    first, _ = cached_run(plan)
    entry = runs_dir() / run_key(plan, model_identity(str(tiny[0])))
    target = entry / ("trace.json" if damage in ("edit", "truncate") else "run.json")
    if damage == "edit":  # still valid JSON, one count changed: only the checksum notices
        data = json.loads(target.read_text())
        data["firing"]["counts"][0][0] += 1
        target.write_text(json.dumps(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:100])
    else:
        target.write_text(damage)
    with pytest.warns(CacheWarning, match="discarded the cached run"):
        again, key = cached_run(plan)
    assert key is None and again.reused == ()
    assert np.array_equal(again.trace.firing.counts, first.trace.firing.counts)
    assert cached_run(plan)[1] is not None  # stored afresh


def test_a_corrupt_omega_entry_is_recomputed_and_never_unpickled(tiny, preloaded, tmp_path):
    plan = plan_for(tiny)
    first, _ = cached_run(plan)
    omega = sorted((tmp_path / "cache" / "omega").glob("*.pt"))
    assert len(omega) == tiny[1].n_layers
    omega[0].write_text("not a tensor file")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    data = pickle.dumps({"Q_a": Evil()}, protocol=2)
    omega[1].write_bytes(data)
    import hashlib

    omega[1].with_name(omega[1].name + ".sha256").write_text(hashlib.sha256(data).hexdigest())  # a matching checksum
    with pytest.warns(CacheWarning, match="Omega cache entry"):
        again, _ = run_again(plan)
    assert not marker.exists(), "torch.load must read plain tensors only"
    assert_same_trace(again.trace, first.trace)


def run_again(plan):
    from circuitlang.cachefiles import use_caches

    with use_caches():
        return run_plan(plan), None


def test_circ_cache_shows_and_clears(tiny, preloaded, capsys, tmp_path):
    cached_run(plan_for(tiny))
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    assert f"cache: {tmp_path / 'cache'}" in out and "--clear [runs] [omega] [models]" in out
    assert [line.split()[1] for line in out.splitlines() if line.split()[1:2] in (["runs"], ["omega"])] == ["runs", "omega"]
    assert main(["cache", "--clear", "runs"]) == 0
    assert not runs_dir().exists() and (tmp_path / "cache" / "omega").exists()
    assert main(["cache", "--clear"]) == 0 and not (tmp_path / "cache" / "omega").exists()


def test_circ_cache_clear_counts_only_what_it_removed(tiny, preloaded, capsys, monkeypatch):
    import os

    cached_run(plan_for(tiny))
    before = sorted(runs_dir().rglob("*"))

    def refused(*args, **kwargs):  # a read-only mount: every removal fails
        raise PermissionError(30, "Read-only file system")

    with monkeypatch.context() as m:
        m.setattr(os, "unlink", refused)
        m.setattr(os, "rmdir", refused)
        assert main(["cache", "--clear", "runs"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert "could not clear runs" in captured.err and "0.0 MB freed" in captured.err and "read-only file system" in captured.err
    assert sorted(runs_dir().rglob("*")) == before


def test_circ_cache_help_names_every_kind_of_file(capsys):
    with pytest.raises(SystemExit):
        main(["cache", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "processed-" in text and "float32 copy" in text


def test_the_engine_imports_neither_the_report_nor_the_runner():
    import ast
    from pathlib import Path

    import circuitlang.engine

    for path in Path(circuitlang.engine.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.startswith(("circuitlang.report", "circuitlang.runner", "circuitlang.cli")) for n in names), path.name


@pytest.mark.parametrize("settings", ["sources heads mlp embed bias", "readings authors"])
def test_sources_and_readings_chunk_like_the_unchunked_run(tiny, preloaded, settings):
    plan = parse_text(SPEC.format(model=tiny[0], roots="auto 2") + settings + "\n")
    whole = run_plan(plan)
    assert whole.trace.config.sources == " ".join(plan.writers) and whole.trace.config.readings == str(plan.readings)
    if plan.writers != ("heads",):
        assert (whole.trace.edges.up_head < 0).any()
    chunked = run_plan(plan, chunk=7)
    assert_same_trace(chunked.trace, whole.trace)
    for u, v, d in whole.trace.graph.edges(data=True):
        if d["kind"] == "communication":
            assert d == chunked.trace.graph.edges[u, v]


def test_without_ray_one_line_says_how_to_install_it_before_the_model_loads(tiny, tmp_path, monkeypatch, capsys):
    import sys

    spec = tmp_path / "tiny.circ"
    spec.write_text(SPEC.format(model=tiny[0], roots="auto 2"))
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    monkeypatch.setattr(execute, "resolve_model", lambda *a, **k: pytest.fail("the model must not load"))
    code = main(["run", str(spec), "--ray", "--quiet", "--no-cache", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and not (tmp_path / "out").exists()
    assert len(err.splitlines()) == 1 and err.endswith('Ray is not installed: pip install "circuitlang[ray]"'), err
