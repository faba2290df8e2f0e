"""The run cache (a second run of an unchanged spec reuses its trace) and the Omega cache."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

import circuitlang.runner.execute as run_module
from circuitlang.engine import omega_cache as cache
from circuitlang.cachefiles import caches_on, use_caches
from circuitlang.engine.omega_cache import cached_layer_slices
from circuitlang.runner.cache import REUSED, load_run, model_identity, run_key
from circuitlang.runner.execute import cached_run
from circuitlang.engine.omega import layer_slices
from circuitlang.models.geometry import AttentionGeometry
from circuitlang.models.model import load_model
from circuitlang.lang import format_plan, parse_text
from circuitlang.report import trace_to_dict, write_trace_json
from tiny_models import build_gpt2

SPEC = 'model "{model}"\nprompts ioi 12 mixed seed 3\ntrace from auto 2\nkeep mass {mass}\nshow edges in >= {show} prompts\n'


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, gpt2_tokenizer):
    directory = build_gpt2(tmp_path_factory.mktemp("cache") / "tiny", gpt2_tokenizer, n_layer=4, n_head=8, n_embd=64, seed=2)
    return directory, load_model(str(directory))


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUITLANG_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def traces(tiny, root, monkeypatch):
    """Runs use the preloaded tiny model; the list records each trace computed and whether the Omega cache was on."""
    _, model = tiny
    computed = []
    real = run_module.merge_chunks

    def counting(*args, **kwargs):
        computed.append(caches_on())
        return real(*args, **kwargs)

    monkeypatch.setattr(run_module, "resolve_model", lambda spec, device=None, progress=None: model)
    monkeypatch.setattr(run_module, "merge_chunks", counting)
    return computed


def plan_for(tiny, mass=0.7, show=1):
    return parse_text(SPEC.format(model=tiny[0], mass=mass, show=show))


def test_second_run_reuses_the_trace(tiny, traces, tmp_path):
    plan = plan_for(tiny)
    first, reused = cached_run(plan)
    assert reused is None and traces == [True]  # computed, with the Omega cache on
    second, reused = cached_run(plan)
    assert traces == [True] and reused == run_key(plan, model_identity(str(tiny[0])))
    assert REUSED.format(what="trace", key=reused) == f"reusing cached trace {reused[:12]} (spec and model unchanged); --no-cache to recompute"
    assert second.reused == ("trace",) and first.reused == ()
    assert second.plan is plan and second.auto_roots == first.auto_roots and second.logit_diff == first.logit_diff
    assert first.auto_roots and len(first.logit_diff) == 12
    text = format_plan(plan)
    assert trace_to_dict(second.trace, text) == trace_to_dict(first.trace, text)
    write_trace_json(first.trace, tmp_path / "first.json", text)
    write_trace_json(second.trace, tmp_path / "second.json", text)
    assert (tmp_path / "first.json").read_bytes() == (tmp_path / "second.json").read_bytes()
    # What cannot change the trace does not change the key: show, output, the file the spec was read from.
    other = dataclasses.replace(plan_for(tiny, show=5), output=dataclasses.replace(plan.output, directory="elsewhere"),
                                sources=("other.circ",))
    assert cached_run(other)[1] == reused and traces == [True]


def test_a_changed_plan_is_recomputed(tiny, traces):
    cached_run(plan_for(tiny, mass=0.7))
    assert cached_run(plan_for(tiny, mass=0.9))[1] is None and len(traces) == 2
    assert cached_run(plan_for(tiny, mass=0.9))[1] is not None and len(traces) == 2
    # A --device override is part of what ran.
    assert run_key(plan_for(tiny), "m") != run_key(dataclasses.replace(plan_for(tiny), model=dataclasses.replace(
        plan_for(tiny).model, device="cuda")), "m")


def test_a_changed_weight_file_is_recomputed(tiny, traces):
    plan = plan_for(tiny)
    cached_run(plan)
    weights = tiny[0] / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # touched
    assert cached_run(plan)[1] is None and len(traces) == 2
    weights.write_bytes(weights.read_bytes())  # rewritten
    assert cached_run(plan)[1] is None and len(traces) == 3
    assert cached_run(plan)[1] is not None and len(traces) == 3


def test_no_cache_recomputes_and_writes_nothing(tiny, traces, root):
    plan = plan_for(tiny)
    cached_run(plan)
    entries = sorted(root.rglob("*"))
    result, reused = cached_run(plan, use_cache=False)
    assert reused is None and traces == [True, False] and sorted(root.rglob("*")) == entries
    assert load_run(run_key(plan, model_identity(str(tiny[0])))) is not None


def test_model_identity(tmp_path, monkeypatch):
    import huggingface_hub.constants

    assert model_identity(str(tmp_path / "missing")) is None  # the load reports the missing directory
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert model_identity("gpt9") is None  # not downloaded: not cached this time
    repo = tmp_path / "hub" / "models--gpt9"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "config.json").write_text("{}")
    assert model_identity("gpt9") == "hub:gpt9@abc123"


# --- The Omega cache ---------------------------------------------------------------------------------


def geometry(rotary: bool) -> AttentionGeometry:
    torch.manual_seed(0)
    L, H, d, r = 2, 3, 16, 8
    return AttentionGeometry(
        W_Q=torch.randn(L, H, d, r), b_Q=torch.randn(L, H, r), W_K=torch.randn(L, H, d, r), b_K=torch.randn(L, H, r),
        q_gain=torch.ones(L, H, r), k_gain=torch.ones(L, H, r), W_O=torch.randn(L, H, r, d), b_O=torch.zeros(L, d),
        rotary=rotary, has_qk_norm=False, has_post_norm=False)


def rotary_tables(n: int, rotary_dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.arange(n)[:, None] / 10000 ** (torch.arange(0, rotary_dim, 2) / rotary_dim)
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos(), emb.sin()


def same(a, b) -> bool:
    pairs = [(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)]
    return all(x is y is None or (x is not None and y is not None and torch.equal(x, y)) for x, y in pairs)


@pytest.fixture
def computed(root, monkeypatch):
    """Layers whose slices were computed (not read from the cache)."""
    layers = []

    def counting(g, layer, cos=None, sin=None):
        layers.append((layer, None if cos is None else len(cos)))
        return layer_slices(g, layer, cos, sin)

    monkeypatch.setattr(cache, "layer_slices", counting)
    return layers


def test_omega_cache_returns_the_fresh_slices(computed, root):
    g = geometry(rotary=False)
    fresh = [layer_slices(g, layer) for layer in range(2)]
    with use_caches():
        first = [cached_layer_slices(g, layer) for layer in range(2)]
        again = [cached_layer_slices(g, layer) for layer in range(2)]
    assert computed == [(0, None), (1, None)] and len(list((root / "omega").glob("*.pt"))) == 2
    assert all(same(x, y) and same(x, z) for x, y, z in zip(fresh, first, again))
    assert again[0].Q_a.dtype == torch.float64
    cached_layer_slices(g, 0)  # outside use_caches(): computed, as the Python API always does
    assert len(computed) == 3
    changed = dataclasses.replace(g, b_K=g.b_K + 1)  # other weights, another key
    with use_caches():
        assert same(cached_layer_slices(changed, 0), layer_slices(changed, 0)) and len(computed) == 4


def test_omega_cache_keeps_the_most_offsets_for_rotary_models(computed):
    g = geometry(rotary=True)
    cos, sin = rotary_tables(10)
    with use_caches():
        cached_layer_slices(g, 0, cos[:8], sin[:8])
        shorter = cached_layer_slices(g, 0, cos[:5], sin[:5])  # the first 5 offsets of the cached 8
        assert computed == [(0, 8)] and shorter.offsets == 5
        assert same(shorter, layer_slices(g, 0, cos[:5], sin[:5]))
        longer = cached_layer_slices(g, 0, cos, sin)  # more offsets than cached: recomputed, and kept
        assert computed == [(0, 8), (0, 10)] and same(longer, layer_slices(g, 0, cos, sin))
        cached_layer_slices(g, 0, cos[:8], sin[:8])
        assert len(computed) == 2
        cached_layer_slices(g, 0, cos[:5] * 2, sin[:5])  # other rotary tables (e.g. another rope scaling)
        assert len(computed) == 3
