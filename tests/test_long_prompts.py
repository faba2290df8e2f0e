"""Long prompts: sparse firings in place of [L, P, H, n, n] tensors, Omega cores per (head, offset) pair, the
per-pair Omega cache, and the induction prompts of specs/induction.circ."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch

from circuitlang.cachefiles import use_caches
from circuitlang.data.induction import induction_records
from circuitlang.data.ioi import ioi_prompts
from circuitlang.engine import omega_cache
from circuitlang.engine.forward import capture
from circuitlang.engine.trace import slices_for, trace
from circuitlang.lang.plan import Root
from circuitlang.models.geometry import attention_geometry
from circuitlang.models.model import load_model
from checks import busiest_roots
from tiny_models import build_rotary

THRESHOLD = 0.5


@pytest.fixture(scope="module", params=("llama", "gemma3"))
def model(request, tmp_path_factory, gpt2_tokenizer):
    return load_model(str(build_rotary(tmp_path_factory.mktemp(request.param), gpt2_tokenizer, request.param)))


@pytest.fixture(scope="module")
def prompts(model, gpt2_tokenizer):
    return ioi_prompts(gpt2_tokenizer, n=8, seed=5, prepend_bos=model.prepend_bos)


@pytest.fixture(scope="module")
def dense(model, prompts):
    return capture(model, prompts, batch_size=3)


@pytest.fixture(scope="module")
def sparse(model, prompts):
    return capture(model, prompts, batch_size=3, firing=THRESHOLD)


def test_the_capture_keeps_the_firings_of_the_dense_tensors_and_not_the_tensors(dense, sparse):
    assert sparse.pattern is None and sparse.scores is None
    want, got = dense.firings_at(THRESHOLD), sparse.firings
    assert len(got) > 0
    for field in ("layer", "prompt", "head", "dest", "src", "attention", "score"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    with pytest.raises(ValueError, match="not 0.3"):
        sparse.firings_at(0.3)


def test_a_trace_of_the_sparse_capture_is_the_dense_one(model, prompts, dense, sparse):
    roots = busiest_roots(dense, prompts, model.n_layers - 1, distinct=False)
    a, b = (trace(model, prompts, roots, threshold=THRESHOLD, activations=acts) for acts in (dense, sparse))
    assert len(a.events) > 0 and len(a.edges) > 0
    assert np.array_equal(a.firing.counts, b.firing.counts) and np.array_equal(a.firing.slice_usage, b.firing.slice_usage)
    for f in dataclasses.fields(a.events):
        x, y = getattr(a.events, f.name), getattr(b.events, f.name)
        assert all(np.array_equal(u, v) for u, v in zip(x, y)) if f.name == "slices" else np.array_equal(x, y, equal_nan=True), f.name
    for f in dataclasses.fields(a.edges):
        assert np.array_equal(getattr(a.edges, f.name), getattr(b.edges, f.name)), f.name


def test_pair_cores_are_the_dense_cores(model, dense):
    geometry = attention_geometry(model)
    full = slices_for(geometry, dense, 1)
    heads, offsets = torch.tensor([1, 0, 1, 1]), torch.tensor([3, 0, 3, 5])
    pairs = slices_for(geometry, dense, 1, heads, offsets)
    assert pairs.U.shape[1] == 3  # the distinct pairs only
    h, k = pairs.index(heads, offsets)
    assert torch.allclose(pairs.U[h, k], full.U[heads, offsets], atol=1e-12)
    assert torch.allclose(pairs.S[h, k], full.S[heads, offsets], atol=1e-12)
    assert torch.allclose(pairs.V[h, k], full.V[heads, offsets], atol=1e-12)
    with pytest.raises(ValueError, match="no core"):
        pairs.index(torch.tensor([0]), torch.tensor([4]))


def test_the_pair_cache_reuses_cores_across_prompts_and_checks_the_tables(model, dense, tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUITLANG_CACHE", str(tmp_path))
    geometry = attention_geometry(model)
    computed = []
    real = omega_cache.pair_cores
    monkeypatch.setattr(omega_cache, "pair_cores", lambda R_a, R_b, rot: computed.append(len(rot)) or real(R_a, R_b, rot))
    cos, sin = dense.cos[2], dense.sin[2]
    fresh = slices_for(geometry, dense, 2, torch.tensor([0, 1, 1]), torch.tensor([1, 2, 4]))
    with use_caches():
        first = omega_cache.cached_pair_slices(geometry, 2, torch.tensor([0, 1]), torch.tensor([1, 2]), cos[:3], sin[:3])
        more = omega_cache.cached_pair_slices(geometry, 2, torch.tensor([0, 1, 1]), torch.tensor([1, 2, 4]), cos, sin)
        again = omega_cache.cached_pair_slices(geometry, 2, torch.tensor([1, 0]), torch.tensor([4, 1]), cos, sin)
        assert computed == [3, 2, 1]  # outside the cache 3; then 2; then only the new pair; then nothing
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # other tables are a miss, not a bad entry
            other = omega_cache.cached_pair_slices(geometry, 2, torch.tensor([0]), torch.tensor([1]), cos * 2, sin)
    assert computed == [3, 2, 1, 1]
    for got, heads, offsets in ((more, [0, 1, 1], [1, 2, 4]), (again, [1, 0], [4, 1])):
        h, k = got.index(torch.tensor(heads), torch.tensor(offsets))
        hf, kf = fresh.index(torch.tensor(heads), torch.tensor(offsets))
        assert torch.equal(got.U[h, k], fresh.U[hf, kf]) and torch.equal(got.S[h, k], fresh.S[hf, kf])
    assert torch.equal(first.Q_a, fresh.Q_a) and not torch.equal(other.S[0, 0], fresh.S[0, 0])
    shard = next((tmp_path / "omega").rglob("cores-*.pt"))
    shard.write_bytes(shard.read_bytes()[:-8] + b"12345678")  # a damaged shard: discarded and recomputed
    with use_caches(), pytest.warns(Warning, match="Omega cache shard"):
        omega_cache.cached_pair_slices(geometry, 2, torch.tensor([0, 1, 1]), torch.tensor([1, 2, 4]), cos, sin)


def test_induction_prompts_repeat_the_sequence_with_their_roles(gpt2_tokenizer):
    from circuitlang.data.prompts import encode

    (record,) = induction_records(gpt2_tokenizer, 40, 1, seed=3)
    ids = encode(gpt2_tokenizer, record["text"])
    assert len(ids) == 39  # 40 with the BOS
    roles = record["roles"]
    assert ids[roles["end"]] == ids[roles["match"]] and roles["next"] == roles["match"] + 1
    assert encode(gpt2_tokenizer, record["target"]) == [ids[roles["next"]]]
    assert len(set(ids[: roles["end"] - roles["match"]])) == roles["end"] - roles["match"]  # the first copy: distinct words
    assert induction_records(gpt2_tokenizer, 40, 1, seed=3) == [record]


def test_passes_resume_after_a_prefix_longer_than_a_sliding_window(tmp_path_factory, gpt2_tokenizer, monkeypatch):
    """Gemma 3's sliding layers (window 8 in the tiny model, 512 in the real one) keep their window only in a
    cache laid out for the model; the captured keys and values keep every position, so passes still resume
    after the clean prefix, with the numbers of whole-model passes."""
    from circuitlang.engine import forward
    from circuitlang.engine.intervene import run_interventions
    from circuitlang.lang.plan import EdgeSelector, InterventionSet

    model = load_model(str(build_rotary(tmp_path_factory.mktemp("gemma3-window"), gpt2_tokenizer, "gemma3")))
    assert model.bridge.original_model.config.sliding_window < 12
    prompts = ioi_prompts(gpt2_tokenizer, n=6, seed=2, prepend_bos=True)
    acts = capture(model, prompts, resid_layers=range(model.n_layers), kv=True, firing=THRESHOLD)
    assert acts.kv is not None and acts.kv[0].shape[-2] == acts.tokens.shape[1] > 12
    f = acts.firings  # a root firing from `end` (past the window), onto the named role it fires on most
    at_end = [(l, h, prompts[p].labels[j]) for l, p, h, i, j in zip(*(t.tolist() for t in (f.layer, f.prompt, f.head, f.dest, f.src)))
              if l > 0 and i == len(prompts[p].token_ids) - 1 and prompts[p].labels[j] in prompts.role_names]
    layer, head, src = max(set(at_end), key=lambda key: (at_end.count(key), key))
    roots = [Root(layer, head, "end", src)]
    t = trace(model, prompts, roots, threshold=THRESHOLD, activations=acts)
    sets = [InterventionSet("dest", (EdgeSelector("into", root=1, side="d"),), random_control=True)]
    resumed = []
    real = forward.prefix_cache
    monkeypatch.setattr(forward, "prefix_cache", lambda *a, **k: resumed.append(a[3]) or real(*a, **k))
    partial = run_interventions(model, prompts, t, sets, roots, seed=0, acts=acts)
    assert resumed and len(partial.rows) > 0 and max(resumed) > model.bridge.original_model.config.sliding_window
    whole = run_interventions(model, prompts, t, sets, roots, seed=0, acts=acts, partial=False)
    for f in ("f_after", "score_after", "cosine", "norm_ratio"):
        np.testing.assert_allclose(getattr(partial.rows, f), getattr(whole.rows, f), rtol=1e-4, atol=1e-5)


def test_long_prompts_decompose_the_traced_events_only(model, prompts, dense, sparse, monkeypatch):
    """Past STATS_TOKENS the Omega cores are those of the traced events' (head, offset) pairs, the walk and its
    edges are unchanged, and the firing statistics count the traced events' slices."""
    from circuitlang.engine import trace as trace_module

    roots = busiest_roots(dense, prompts, model.n_layers - 1, distinct=False)
    full = trace(model, prompts, roots, threshold=THRESHOLD, activations=sparse)
    computed = []
    real = omega_cache.pair_cores
    monkeypatch.setattr(omega_cache, "pair_cores", lambda R_a, R_b, rot: computed.append(len(rot)) or real(R_a, R_b, rot))
    monkeypatch.setattr(trace_module, "STATS_TOKENS", 4)
    short = trace(model, prompts, roots, threshold=THRESHOLD, activations=sparse)
    # The same events and edges; floats to rounding (float32 GEMMs over other batches of events).
    for f in ("prompt", "layer", "head", "dest", "src", "n_slices"):
        assert np.array_equal(getattr(full.events, f), getattr(short.events, f)), f
    for f in ("score", "signal_dest", "signal_src"):
        np.testing.assert_allclose(getattr(short.events, f), getattr(full.events, f), rtol=1e-5, atol=1e-6)
    for f in ("event", "up_layer", "up_head"):
        assert np.array_equal(getattr(full.edges, f), getattr(short.edges, f)), f
    np.testing.assert_allclose(short.edges.contribution, full.edges.contribution, rtol=1e-5, atol=1e-6)
    assert np.array_equal(full.firing.counts, short.firing.counts)
    assert sum(len(c) for layer in short.firing.slice_counts for c in layer) == len(short.events) < full.firing.counts.sum()
    ev = short.events
    traced_pairs = {(l, h, d - s) for l, h, d, s in zip(ev.layer, ev.head, ev.dest, ev.src)}
    assert sum(computed) == len(traced_pairs)
