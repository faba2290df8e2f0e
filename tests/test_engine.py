"""The engine's invariants on tiny offline models: Omega's SVD, slice sums, completeness, tracing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from circuitlang.data.ioi import ioi_prompts
from circuitlang.data.prompts import PromptSet
from circuitlang.engine import decompose as dc
from circuitlang.engine.forward import capture
from circuitlang.models.model import ModelLoadError, load_model
from circuitlang.engine.omega import OmegaSlices, omega_matrix
from circuitlang.engine.omega import layer_slices
from circuitlang.models.geometry import attention_geometry
from circuitlang.engine.trace import TraceError, root_events, trace, writer_contributions
from circuitlang.lang.plan import Readings, Root, RootSet, SliceRule, parse_root
from checks import assert_writers_complete, busiest_roots
from tiny_models import build_gpt2

SHAPES = {  # name: (layers, heads, width, seed)
    "3x4x64": (3, 4, 64, 0),
    "2x2x32": (2, 2, 32, 1),
    "4x8x64": (4, 8, 64, 2),
}


@pytest.fixture(scope="session", params=list(SHAPES))
def tiny(request, tmp_path_factory, gpt2_tokenizer):
    layers, heads, width, seed = SHAPES[request.param]
    path = build_gpt2(tmp_path_factory.mktemp(request.param), gpt2_tokenizer, n_layer=layers, n_head=heads, n_embd=width, seed=seed)
    return load_model(str(path))


@pytest.fixture(scope="session")
def prompts(gpt2_tokenizer):
    return ioi_prompts(gpt2_tokenizer, n=12, seed=3)


@pytest.fixture(scope="session")
def acts(tiny, prompts):
    return capture(tiny, prompts, writers=True, batch_size=5)


def model_slices(model) -> OmegaSlices:
    """Every layer's slices stacked (offset-free models): U, V [L, H, d+1, r], S [L, H, r]."""
    geometry = attention_geometry(model)
    per_layer = [layer_slices(geometry, l) for l in range(model.n_layers)]
    return OmegaSlices(*(torch.stack([getattr(s, f) for s in per_layer]) for f in ("Q_a", "Q_b", "U", "S", "V")))


# --- Omega and its slices (eqs. 2, 5) --------------------------------------------------------------


def test_omega_rebuilds_from_its_slices(tiny):
    b = tiny.bridge
    omega = omega_matrix(*(w.detach().double() for w in (b.W_Q, b.b_Q, b.W_K, b.b_K)))
    s = model_slices(tiny)
    U, S, V = s.left()[..., 0, :, :], s.S[..., 0, :], s.right()[..., 0, :, :]
    rebuilt = U @ torch.diag_embed(S) @ V.transpose(-1, -2)
    assert ((rebuilt - omega).norm(dim=(-2, -1)) / omega.norm(dim=(-2, -1))).max() < 1e-5
    eye = torch.eye(tiny.d_head, dtype=torch.float64)
    assert torch.allclose(U.transpose(-1, -2) @ U, eye.expand_as(U.transpose(-1, -2) @ U), atol=1e-10)
    assert torch.allclose(V.transpose(-1, -2) @ V, eye.expand_as(V.transpose(-1, -2) @ V), atol=1e-10)
    assert (S[..., :-1] >= S[..., 1:]).all()


def test_slices_match_a_dense_svd(tiny):
    b = tiny.bridge
    omega = omega_matrix(*(w.detach().double() for w in (b.W_Q, b.b_Q, b.W_K, b.b_K)))
    s = model_slices(tiny)
    sU, sS, sV = s.left()[..., 0, :, :], s.S[..., 0, :], s.right()[..., 0, :, :]
    U, S, Vh = torch.linalg.svd(omega)
    r = tiny.d_head
    assert torch.allclose(S[..., :r], sS, rtol=1e-8, atol=1e-10)
    assert S[..., r:].abs().max() < 1e-8 * S.max()
    # Same singular vectors up to a shared sign per slice (singular values of random weights are distinct).
    signs = torch.sign((U[..., :r] * sU).sum(-2))
    assert torch.allclose(U[..., :r] * signs[..., None, :], sU, atol=1e-6)
    assert torch.allclose(Vh[..., :r, :].transpose(-1, -2) * signs[..., None, :], sV, atol=1e-6)


# --- Firing and slice terms (sections 4.1, 4.3) ------------------------------------------------------


def test_slice_terms_sum_to_the_models_score_for_every_pair(tiny, acts):
    # Every (dest, src) pair inside a prompt, firing or not: sum_k t_k == A'_ij == hook_attn_scores * scale.
    s = model_slices(tiny)
    U_all, S_all, V_all = s.left()[..., 0, :, :], s.S[..., 0, :], s.right()[..., 0, :, :]
    n = acts.tokens.shape[1]
    inside = torch.arange(n)[None, :] < acts.lengths[:, None]
    pairs = (inside[:, None, :, None] & inside[:, None, None, :] & torch.ones(n, n, dtype=torch.bool).tril())
    fires = dc.firing_mask(acts.pattern, acts.scores, acts.lengths, 0.5)
    for layer in range(tiny.n_layers):
        U, S, V = (t[layer].float() for t in (U_all, S_all, V_all))
        xu, xv = dc.project_tokens(acts.x[layer], U), dc.project_tokens(acts.x[layer], V)
        p, a, i, j = pairs.expand(-1, tiny.n_heads, -1, -1).nonzero(as_tuple=True)
        terms = dc.slice_terms(xu[p, a, i], S[a], xv[p, a, j])
        raw = acts.scores[layer, p, a, i, j] * tiny.attn_scale
        assert torch.allclose(terms.sum(-1), raw, rtol=1e-4, atol=1e-4 * raw.abs().max())
        assert (raw[fires[layer, p, a, i, j]] > 0).all()
    assert fires.sum() > 10


def test_firing_mask_excludes_src_zero_padding_and_negative_scores():
    pattern = torch.zeros(1, 1, 4, 4)
    scores = torch.ones(1, 1, 4, 4)
    pattern[0, 0, 1, 0] = 0.9  # src 0
    pattern[0, 0, 2, 1] = 0.9  # fires
    pattern[0, 0, 3, 2] = 0.9  # dest is padding (length 3)
    pattern[0, 0, 1, 1] = 0.6
    scores[0, 0, 1, 1] = -0.5  # negative raw score
    pattern[0, 0, 2, 2] = 0.5  # not above the threshold
    fires = dc.firing_mask(pattern, scores, torch.tensor([3]), 0.5)
    assert fires.nonzero().tolist() == [[0, 0, 2, 1]]


def test_sparse_set_rules():
    terms = torch.tensor([[0.5, 4.0, -1.0, 2.0, -3.0, 0.2]])
    mask, order = dc.sparse_set(terms, SliceRule())
    # Dropping {-3, -1, 0.2, 0.5, 2.0} sums to -1.3 <= 0; dropping 4.0 too would be positive: S = {4.0}.
    assert mask.nonzero()[:, 1].tolist() == [1]
    assert order[0].tolist() == [1, 3, 0, 5, 2, 4]
    terms = torch.tensor([[1.0, 4.0, -1.0, 2.0, -1.5, 0.2]])
    mask, _ = dc.sparse_set(terms, SliceRule())
    assert mask.nonzero()[:, 1].tolist() == [1, 3]  # remainder 1 + 0.2 - 1 - 1.5 = -1.3 <= 0
    mask, _ = dc.sparse_set(terms, SliceRule("top", 3))
    assert mask.nonzero()[:, 1].tolist() == [0, 1, 3]
    mask, _ = dc.sparse_set(terms, SliceRule("all"))
    assert mask.all()


def test_select_upstream_keeps_the_smallest_set_holding_the_mass():
    c = torch.tensor([[5.0, 1.0, 3.0, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0, 0.0]])
    chosen = dc.select_upstream(c, 0.7)
    # Row 0: total 10, 5 + 3 = 8 > 7. Row 1: total 4, running sums 1, 2, 3 > 2.8 at the third; ties kept.
    assert chosen.tolist() == [[True, False, True, False, False], [True, True, True, True, False]]


# --- Contributions: completeness (eq. 8 for every writer) -------------------------------------------


def test_all_writers_sum_to_the_signal_projection(tiny, acts, prompts):
    roots = busiest_roots(acts, prompts, tiny.n_layers - 1)
    t = trace(tiny, prompts, roots, activations=acts)
    assert len(t.events) > len(roots)
    assert_writers_complete(tiny, acts, t.events)
    # The edges the trace reports are those heads' contributions, from the same events.
    parts = writer_contributions(acts, attention_geometry(tiny), t.events, "d")
    d = t.edges.side == "d"
    expected = [parts[f"head {l}.{h}"][e] for e, l, h in zip(t.edges.event[d], t.edges.up_layer[d], t.edges.up_head[d])]
    np.testing.assert_allclose(t.edges.contribution[d], expected, rtol=1e-4, atol=1e-6)


# --- The trace (Algorithm 1) ------------------------------------------------------------------------


def test_trace_recurses_into_firing_upstream_heads_once_each(tiny, acts, prompts):
    roots = busiest_roots(acts, prompts, tiny.n_layers - 1)
    t = trace(tiny, prompts, roots, activations=acts)
    keys = list(zip(t.events.prompt, t.events.layer, t.events.head, t.events.dest, t.events.src))
    assert len(keys) == len(set(keys)), "an event was decomposed twice"
    fires = dc.firing_mask(acts.pattern, acts.scores, acts.lengths, 0.5)
    assert all(fires[l, p, h, i, j] for p, l, h, i, j in keys)
    # Every non-root event was reached from an edge into a head firing with that token as destination.
    reached = {(p, ul, uh, i if side == "d" else j) for p, ul, uh, i, j, side in zip(
        t.edges.prompt, t.edges.up_layer, t.edges.up_head, t.edges.dest, t.edges.src, t.edges.side)}
    root_events = {(p, r.layer, r.head, prompts[p].role(r.dest), prompts[p].role(r.src)) for r in roots for p in range(len(prompts))}
    for p, l, h, i, j in keys:
        assert (p, l, h, i, j) in root_events or (p, l, h, i) in reached
    # And conversely: every firing that an edge leads to was traced.
    for p, l, h, i in reached:
        for j in fires[l, p, h, i].nonzero().flatten().tolist():
            assert (p, l, h, i, j) in set(keys)


def test_graph_counts_prompts_once(tiny, acts, prompts):
    roots = busiest_roots(acts, prompts, tiny.n_layers - 1)
    t = trace(tiny, prompts, roots, activations=acts)
    g = t.graph
    comm = [(u, v, d) for u, v, d in g.edges(data=True) if d["kind"] == "communication"]
    assert comm
    for u, v, data in comm:
        rows = (t.edges.up_layer == u[0]) & (t.edges.up_head == u[1]) & (t.edges.layer == v[0]) & (t.edges.head == v[1])
        token = np.where(t.edges.side == "d", t.edges.dest, t.edges.src)
        rows &= np.array([t.labels[p][k] == v[2] for p, k in zip(t.edges.prompt, token)], dtype=bool)
        assert data["count"] == len(set(t.edges.prompt[rows].tolist())) <= len(prompts)
        assert data["total"] == pytest.approx(t.edges.contribution[rows].sum())
        assert g.has_edge(v, v[:2])
    for node, data in g.nodes(data=True):
        if data["kind"] == "head":
            assert data["firing"] == int(t.firing.counts[node])


def test_trace_is_deterministic_and_rules_change_it(tiny, acts, prompts):
    roots = busiest_roots(acts, prompts, tiny.n_layers - 1)
    a = trace(tiny, prompts, roots, activations=acts)
    b = trace(tiny, prompts, roots, activations=acts)
    assert np.array_equal(a.edges.contribution, b.edges.contribution)
    assert list(a.graph.edges(data=True)) == list(b.graph.edges(data=True))
    wide = trace(tiny, prompts, roots, activations=acts, slices="all")
    assert (wide.events.n_slices == tiny.d_head).all()
    assert (a.events.n_slices <= tiny.d_head).all() and a.events.n_slices.min() >= 1
    more = trace(tiny, prompts, roots, activations=acts, mass=0.95)
    assert len(more.edges) >= len(a.edges)


def test_firing_stats_cover_every_firing(tiny, acts, prompts):
    roots = busiest_roots(acts, prompts, tiny.n_layers - 1)
    t = trace(tiny, prompts, roots, activations=acts)
    fires = dc.firing_mask(acts.pattern, acts.scores, acts.lengths, 0.5)
    assert np.array_equal(t.firing.counts, fires.sum(dim=(1, 3, 4)).numpy())
    for l in range(tiny.n_layers):
        for h in range(tiny.n_heads):
            sizes = t.firing.slice_counts[l][h]
            assert len(sizes) == t.firing.counts[l, h]
            assert t.firing.slice_usage[l, h].sum() == sizes.sum()


def test_bad_roots_are_clear_errors(tiny, prompts):
    with pytest.raises(TraceError, match=r"outside the model"):
        trace(tiny, prompts, [Root(tiny.n_layers, 0, "end", "IO")])
    with pytest.raises(TraceError, match=r"role 'IO2' is not defined by the prompts"):
        trace(tiny, prompts, [Root(0, 0, "end", "IO2")])


def test_missing_model_is_one_clear_sentence(tmp_path):
    with pytest.raises(ModelLoadError, match=r"^model directory '.*nowhere' does not exist$"):
        load_model(str(tmp_path / "nowhere"))


# --- root sets (`trace from every firing of layers A-B ...`, `L.* DEST->SRC`) ---------------------------


def _same_trace(a, b) -> None:
    """The same events and edges row for row, and the same graph."""
    for table in ("events", "edges"):
        for f in type(getattr(a, table)).__dataclass_fields__:
            x, y = getattr(getattr(a, table), f), getattr(getattr(b, table), f)
            if f == "slices":
                assert len(x) == len(y) and all(np.array_equal(u, v) for u, v in zip(x, y))
            else:
                assert np.array_equal(x, y), f"{table}.{f}"
    assert sorted(a.graph.edges(data=True)) == sorted(b.graph.edges(data=True))


@pytest.mark.parametrize("count", ["prompts", "events"])
def test_a_head_wildcard_is_its_explicit_list(tiny, acts, prompts, count):
    """`L.* end->S2` traces what `L.0 end->S2, L.1 end->S2, ...` does, `count events` included (root order)."""
    readings = Readings(count=count)
    for root in busiest_roots(acts, prompts, tiny.n_layers - 1)[:2]:
        explicit = [Root(root.layer, h, root.dest, root.src) for h in range(tiny.n_heads)]
        wild = trace(tiny, prompts, [f"{root.layer}.* {root.dest}->{root.src}"], activations=acts, readings=readings)
        listed = trace(tiny, prompts, explicit, activations=acts, readings=readings)
        assert len(wild.events) > 0 and wild.config.roots == (f"{root.layer}.* {root.dest}->{root.src}",)
        _same_trace(wild, listed)


def _with_positions(prompts):
    """The prompts of the commonest length, each position also a role p0, p1, ... (the explicit form of every firing)."""
    lengths = [len(p.token_ids) for p in prompts]
    n = max(set(lengths), key=lengths.count)
    kept = tuple(dataclasses.replace(p, roles=p.roles + tuple((f"p{i}", i) for i in range(n)))
                 for p in prompts if len(p.token_ids) == n)
    return PromptSet(kept, prompts.role_names + tuple(f"p{i}" for i in range(n)), prompts.description), n


@pytest.mark.parametrize("count", ["prompts", "events"])
def test_every_firing_of_layers_is_its_explicit_list(tiny, gpt2_tokenizer, count):
    """`every firing of layers A-B except source 1` gives the roots of the explicit list of every (head, dest,
    src) of those layers, in the documented order (layer, head, dest, src): the same events, edges and graph."""
    same, n = _with_positions(ioi_prompts(gpt2_tokenizer, n=40, seed=3))
    assert len(same) >= 3
    acts = capture(tiny, same)
    first, last = max(tiny.n_layers - 2, 0), tiny.n_layers - 1
    explicit = [Root(l, h, f"p{i}", f"p{j}") for l in range(first, last + 1) for h in range(tiny.n_heads)
                for i in range(n) for j in range(i + 1) if j != 1]
    readings = Readings(count=count)
    text = f"every firing of layers {first}-{last} except source 1"
    whole = trace(tiny, same, [text], activations=acts, readings=readings)
    listed = trace(tiny, same, explicit, activations=acts, readings=readings)
    _same_trace(whole, listed)
    fires = dc.firing_mask(acts.pattern, acts.scores, acts.lengths, 0.5)
    roots = root_events(whole.events, same, [parse_root(text)])
    # every firing of those layers whose source is not 1 is a root, per prompt by (layer, head, dest, src)
    for p, rows in enumerate(roots):
        keys = [(int(whole.events.layer[e]), int(whole.events.head[e]), int(whole.events.dest[e]), int(whole.events.src[e]))
                for e in rows]
        wanted = [(l, h, i, j) for l, h, i, j in fires[:, p].nonzero().tolist() if first <= l <= last and j != 1]
        assert keys == sorted(wanted)
    assert sum(map(len, roots)) > 0
    assert root_events(whole.events, same, [parse_root(text)]) == root_events(listed.events, same, explicit)


def test_root_set_filters_and_errors(tiny, acts, prompts):
    """`from ROLE` / `to ROLE` keep the firings on those tokens; a set outside the model or naming an unknown
    role is a clear error."""
    last = tiny.n_layers - 1
    whole = trace(tiny, prompts, [f"every firing of layer {last}"], activations=acts)
    to_end = trace(tiny, prompts, [f"every firing of layer {last} from end"], activations=acts)
    rows = root_events(to_end.events, prompts, [RootSet(last, last, "end")])
    assert all(to_end.events.dest[e] == prompts[p].role("end") for p, found in enumerate(rows) for e in found)
    assert sum(map(len, rows)) == sum(1 for p, found in enumerate(root_events(whole.events, prompts, [RootSet(last, last)]))
                                      for e in found if whole.events.dest[e] == prompts[p].role("end"))
    with pytest.raises(TraceError, match=r"outside the model"):
        trace(tiny, prompts, [RootSet(tiny.n_layers - 1, tiny.n_layers)], activations=acts)
    with pytest.raises(TraceError, match=r"role 'IO2' is not defined by the prompts"):
        trace(tiny, prompts, [RootSet(0, 0, "end", "IO2")], activations=acts)
    with pytest.raises(ValueError, match=r"is not of the form"):
        parse_root("every firing of layers 9")
