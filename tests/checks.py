"""Helpers shared by the engine's tests: roots that surely fire, and the completeness check."""

from __future__ import annotations

import numpy as np

from circuitlang.engine import decompose as dc
from circuitlang.models.geometry import attention_geometry
from circuitlang.engine.trace import writer_contributions
from circuitlang.lang.plan import Root


def busiest_roots(acts, prompts, layer, k=3, *, distinct=True):
    """The k (head, dest role, src role) pairs that fire most often at `layer`: roots that surely fire.

    distinct: leave out a token attending to itself (some tiny random models fire on nothing else)."""
    fires = dc.firing_mask(acts.pattern, acts.scores, acts.lengths, 0.5)[layer]
    counts = {}
    for p, h, i, j in fires.nonzero().tolist():
        dest, src = prompts[p].labels[i], prompts[p].labels[j]
        if dest in prompts.role_names and src in prompts.role_names and (dest != src or not distinct):
            counts[h, dest, src] = counts.get((h, dest, src), 0) + 1
    ranked = sorted(counts, key=lambda key: (-counts[key], key))[:k]
    assert ranked, "no root fires in this tiny model"
    return [Root(layer, h, dest, src) for h, dest, src in ranked]


def assert_writers_complete(model, acts, events, rtol=1e-4) -> None:
    """Every residual writer's eq. (8) contribution sums to each traced event's signal, on both sides,
    and the signals are positive (every slice term in S_ij is, by the sign convention)."""
    geometry = attention_geometry(model)
    for side, signal in (("d", events.signal_dest), ("s", events.signal_src)):
        parts = writer_contributions(acts, geometry, events, side)
        total = np.sum(list(parts.values()), axis=0)
        np.testing.assert_allclose(total, signal, rtol=rtol, atol=rtol * np.abs(signal).max())
        assert (signal > 0).all()


def positions_run(monkeypatch) -> list[tuple[int, int, bool]]:
    """Spy on the engine's passes: each call appends (rows, positions run, resumed after a cached prefix)."""
    from circuitlang.engine import forward

    calls: list[tuple[int, int, bool]] = []
    real = forward.run_to_final_norm

    def spy(model, tokens, hooks=(), *, start=0, resid=None, cache=None):
        ran = tokens if start == 0 else resid
        calls.append((ran.shape[0], ran.shape[1], cache is not None))
        return real(model, tokens, hooks, start=start, resid=resid, cache=cache)

    monkeypatch.setattr(forward, "run_to_final_norm", spy)
    return calls
